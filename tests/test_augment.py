import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tta.data import augment as A
from tta.data.tasks import Pair, Task


def grids(max_side=30):
    return st.tuples(st.integers(1, max_side), st.integers(1, max_side), st.integers(0, 2**31 - 1)).map(
        lambda s: np.random.default_rng(s[2]).integers(0, 10, size=(s[0], s[1])).astype(np.int8))


ALL = list(A.DIHEDRAL) + A.training_transforms()


@settings(max_examples=60, deadline=None)
@given(grids(), st.sampled_from(ALL))
def test_inverse_undoes_forward(g, transform):
    assert np.array_equal(transform.inverse(transform.forward(g)), g)


@settings(max_examples=40, deadline=None)
@given(grids(), st.integers(0, 2**31 - 1))
def test_colour_permutation_fixes_background_and_inverts(g, seed):
    perm = A.random_colour_permutation(np.random.default_rng(seed))
    assert perm[0] == 0 and sorted(perm.tolist()) == list(range(10))
    assert np.array_equal(A.apply_colours(A.apply_colours(g, perm), A.invert_colours(perm)), g)
    assert np.array_equal(A.apply_colours(g, perm) == 0, g == 0)


@settings(max_examples=40, deadline=None)
@given(grids(15), st.sampled_from(ALL), st.integers(0, 2**31 - 1))
def test_task_augmentation_inverts_predictions(g, transform, seed):
    aug = A.TaskAugmentation(transform, A.random_colour_permutation(np.random.default_rng(seed)))
    assert np.array_equal(aug.invert_grid(aug.grid(g)), g)


def test_the_eight_dihedral_transforms_are_distinct():
    g = np.arange(6, dtype=np.int8).reshape(2, 3)
    images = {A.grid_key(t.forward(g)) if hasattr(A, "grid_key") else (t.forward(g).shape, t.forward(g).tobytes())
              for t in A.DIHEDRAL}
    assert len(images) == 8
    assert np.array_equal(A.FLIP_H.forward(g), g[:, ::-1])
    assert np.array_equal(A.FLIP_V.forward(g), g[::-1])
    assert np.array_equal(A.TRANSPOSE.forward(g), g.T)


def test_oversized_augmented_task_is_dropped_and_order_applies():
    big = np.zeros((20, 20), dtype=np.int8)
    small = [Pair(np.full((2, 2), i, np.int8), np.full((2, 2), i, np.int8)) for i in range(3)]
    task = Task("t", tuple(small), (Pair(big, big),))
    assert A.TaskAugmentation(A.Upscale(2, 2)).apply(task) is None
    reordered = A.TaskAugmentation(A.IDENTITY, None, (2, 0, 1)).apply(task)
    assert [int(p.input[0, 0]) for p in reordered.train] == [2, 0, 1]


def test_inverse_of_a_malformed_prediction_is_the_expected_crop():
    """A model's answer for an augmented view can have any shape; each inverse must still give a
    definite grid: the dihedral ones undo exactly, the others take what their forward would have
    made and never return an empty grid."""
    odd = (np.arange(15).reshape(3, 5) % 10).astype(np.int8)
    for t in A.DIHEDRAL:
        assert np.array_equal(t.forward(t.inverse(odd)), odd), t.name
    expected = {A.Upscale(2, 2): odd[::2, ::2], A.Upscale(2, 1): odd[::2], A.Upscale(1, 2): odd[:, ::2],
                A.Reflect(1): odd[:, :2], A.Reflect(0): odd[:1],
                A.Translate(1, 1): odd[1:, 1:], A.Translate(0, 1): odd[:, 1:], A.Translate(2, 2): odd[2:, 2:],
                A.Chain((A.ROT90, A.Upscale(2, 2))): np.rot90(odd[::2, ::2], -1)}
    for t, want in expected.items():
        assert np.array_equal(t.inverse(odd), want), t.name
    one = np.array([[7]], dtype=np.int8)
    for t in ALL:   # nothing left to crop: the grid itself, never an empty array
        assert np.array_equal(t.inverse(one), one), t.name
    for shape in ((1, 30), (30, 1), (2, 7), (30, 30)):
        g = np.random.default_rng(0).integers(0, 10, size=shape).astype(np.int8)
        for t in ALL:
            back = t.inverse(g)
            assert back.ndim == 2 and back.size > 0 and back.dtype == np.int8 and max(back.shape) <= 30
            assert set(np.unique(back)) <= set(np.unique(g)), t.name


def test_transforms_have_distinct_names_that_look_them_up():
    names = [t.name for t in A.training_transforms()]
    assert len(set(names)) == len(names)   # names are the vote's groups and the records' keys
    assert A.transforms_from_names([t.name for t in A.DIHEDRAL]) == list(A.DIHEDRAL)
    with pytest.raises(ValueError, match="unknown transform spin"):
        A.transforms_from_names(["rot90", "spin"])


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(ALL), st.integers(0, 2**31 - 1))
def test_augmented_task_is_the_task_seen_through_the_augmentation(transform, seed):
    rng = np.random.default_rng(seed)
    grid = lambda: rng.integers(0, 10, size=tuple(rng.integers(1, 8, size=2))).astype(np.int8)
    task = Task("t", tuple(Pair(grid(), grid()) for _ in range(3)), (Pair(grid(), grid()), Pair(grid(), None)))
    order = tuple(rng.permutation(3).tolist())
    aug = A.TaskAugmentation(transform, A.random_colour_permutation(rng), order)
    out = aug.apply(task)
    assert out.id == "t" and out.meta["augmentation"] == aug.name and len(out.test) == 2
    for i, p in enumerate(out.train):
        source = task.train[order[i]]
        assert np.array_equal(p.input, aug.grid(source.input)) and np.array_equal(p.output, aug.grid(source.output))
        assert np.array_equal(aug.invert_grid(p.output), source.output)
        assert np.array_equal(p.input == 0, transform.forward(source.input) == 0)   # background stays 0
    assert np.array_equal(aug.invert_grid(out.test[0].output), task.test[0].output)
    assert np.array_equal(aug.invert_grid(out.test[1].input), task.test[1].input) and out.test[1].output is None
