import numpy as np
from hypothesis import given, settings, strategies as st

from tta import augment as A
from tta.tasks import Pair, Task


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


def test_inverse_accepts_malformed_predictions():
    odd = np.ones((3, 5), dtype=np.int8)
    for t in ALL:
        assert t.inverse(odd).size > 0
