"""Tests for the task generator: families, determinism, consistency, datasets."""
import json
import time

import numpy as np
import pytest

from tta.data import synthetic as gen
from tta.data import datasets, tasks
from tta.data.tasks import Pair, Task, grid_key

ALL_COMPOSITIONS = [gen.composition_name(c) for c in gen.TRAIN_COMPOSITIONS + gen.HELD_OUT_COMPOSITIONS]
SEEDS = range(5)


def content_key(task: Task) -> tuple:
    return tuple(grid_key(g) for p in task.train + task.test for g in (p.input, p.output))


def pairs(task: Task):
    return task.train + task.test


@pytest.fixture(scope="module")
def train_set():
    return gen.dataset("gen-train")


@pytest.fixture(scope="module")
def eval_set():
    return gen.dataset("gen-eval")


# ---------------------------------------------------------------- families

def test_at_least_30_families_each_with_a_rule_of_its_own():
    assert len(gen.FAMILIES) >= 30
    for name in ("flip_horizontal", "flip_vertical", "colour_swap", "gravity", "flood_fill",
                 "crop_largest_object", "count_objects", "scale_up_2", "tile_2x2",
                 "symmetry_completion", "denoise", "sort_by_count"):
        assert gen.get_family(name) is gen.FAMILIES[name] and gen.FAMILIES[name].name == name
    # A task of one family follows its own rule and no other family's: two names registered with
    # one rule (a copy-paste slip) would make each family's pairs fit the other's rule.
    tasks = {name: gen.make_task(name, 0) for name in gen.FAMILIES}
    rules = {name: gen.rule_of(task) for name, task in tasks.items()}

    def follows(rule, task):
        try:
            return all(np.array_equal(np.asarray(rule(p.input)), p.output) for p in pairs(task))
        except Exception:   # Unsuitable, or a rule that cannot take this grid at all
            return False
    for name, task in tasks.items():
        assert follows(rules[name], task), name
        assert [other for other in rules if other != name and follows(rules[other], task)] == [], name


def test_a_task_is_the_same_in_every_process():
    """Seeds come from crc32 of the family name, not Python's per-process salted hash()."""
    import subprocess
    import sys
    code = ("from tta.data import synthetic as gen; t = gen.make_task('colour_swap', 5); "
            "print([g.tolist() for p in t.train + t.test for g in (p.input, p.output)])")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**__import__("os").environ, "PYTHONHASHSEED": seed}).stdout
               for seed in ("1", "2")}
    here = gen.make_task("colour_swap", 5)
    assert outputs == {str([g.tolist() for p in pairs(here) for g in (p.input, p.output)]) + "\n"}


@pytest.mark.parametrize("name", list(gen.FAMILIES) + ALL_COMPOSITIONS)
def test_family_makes_consistent_tasks(name):
    for seed in SEEDS:
        task = gen.make_task(name, seed)
        assert task.id == f"gen-{name}-{seed}"
        assert len(task.train) == 3 and len(task.test) == 1
        rule = gen.rule_of(task)
        for p in pairs(task):
            for grid in (p.input, p.output):
                assert grid.dtype == np.int8 and grid.ndim == 2
                assert 1 <= min(grid.shape) and max(grid.shape) <= gen.DEFAULT.max_size
                assert grid.min() >= 0 and grid.max() <= 9
            assert np.array_equal(np.asarray(rule(p.input)), p.output)
            assert grid_key(p.input) != grid_key(p.output)  # no identity pairs at all
        inputs = [grid_key(p.input) for p in pairs(task)]
        assert len(set(inputs)) == len(inputs)
        gen.check_task(task, rule)


def test_same_seed_same_task_other_seed_other_task():
    for name in ("flip_horizontal", "colour_swap", "flood_fill", "denoise+scale_up_2"):
        a, b = gen.make_task(name, 7), gen.make_task(name, 7)
        assert a.id == b.id and content_key(a) == content_key(b) and a.meta == b.meta
        assert content_key(gen.make_task(name, 8)) != content_key(a)
    # The family name is part of the seed, so seed 7 of two families is unrelated.
    assert gen.make_task("flip_horizontal", 7).train[0].input.tobytes() != \
        gen.make_task("flip_vertical", 7).train[0].input.tobytes()


def test_parameters_are_drawn_per_task():
    swaps = {tuple(gen.make_task("colour_swap", s).meta["params"]["swap"]) for s in range(10)}
    directions = {gen.make_task("gravity", s).meta["params"]["direction"] for s in range(20)}
    assert len(swaps) > 5
    assert directions == {"down", "up", "left", "right"}


def test_grids_are_read_only():
    task = gen.make_task("flip_horizontal", 0)
    with pytest.raises(ValueError):
        task.train[0].input[0, 0] = 1


# ---------------------------------------------------------------- semantics, checked independently

def test_geometry_families_do_what_they_say():
    expected = {"flip_horizontal": np.fliplr, "flip_vertical": np.flipud,
                "rotate_90": lambda g: np.rot90(g, -1), "transpose": np.transpose}
    for name, fn in expected.items():
        for p in pairs(gen.make_task(name, 3)):
            assert np.array_equal(p.output, fn(p.input)), name


def test_colour_families_do_what_they_say():
    task = gen.make_task("colour_swap", 4)
    a, b = task.meta["params"]["swap"]
    for p in pairs(task):
        assert np.array_equal(p.output == a, p.input == b) and np.array_equal(p.output == b, p.input == a)
        assert np.array_equal(p.output[(p.input != a) & (p.input != b)], p.input[(p.input != a) & (p.input != b)])
    task = gen.make_task("recolour_single", 4)
    src, dst = task.meta["params"]["from"], task.meta["params"]["to"]
    for p in pairs(task):
        assert (p.input == src).any() and not (p.output == src).any()
        assert np.array_equal(p.output[p.input == src], np.full((p.input == src).sum(), dst))


def test_more_families_do_what_their_names_say():
    """Independent oracles (numpy only, from each task's recorded parameters) for families the
    other semantic tests leave out."""
    def check(name, oracle, seeds=range(3)):
        for seed in seeds:
            task = gen.make_task(name, seed)
            for p in pairs(task):
                assert np.array_equal(p.output, oracle(p.input, task.meta["params"])), (name, seed)

    check("rotate_180", lambda g, _: g[::-1, ::-1])
    check("rotate_270", lambda g, _: g.T[::-1])            # a quarter turn anticlockwise
    check("anti_transpose", lambda g, _: g[::-1, ::-1].T)
    check("scale_up_3", lambda g, _: g.repeat(3, axis=0).repeat(3, axis=1))
    check("scale_down_2", lambda g, _: g[::2, ::2])
    check("remove_colour", lambda g, m: np.where(g == m["colour"], 0, g))
    check("tile_mirror", lambda g, _: np.block([[g, g[:, ::-1]], [g[::-1], g[::-1, ::-1]]]))
    check("mirror_concat", lambda g, m: np.hstack([g, g[:, ::-1]]) if m["axis"] == "right" else np.vstack([g, g[::-1]]))
    check("half_crop", lambda g, m: {"left": g[:, :g.shape[1] // 2], "right": g[:, g.shape[1] // 2:],
                                     "top": g[:g.shape[0] // 2], "bottom": g[g.shape[0] // 2:]}[m["side"]])
    check("shift", lambda g, m: np.roll(g, (m["dy"], m["dx"]), axis=(0, 1)))   # nothing wraps: content stays inside

    def border(g, m):
        out = g.copy()
        out[0], out[-1], out[:, 0], out[:, -1] = m["colour"], m["colour"], m["colour"], m["colour"]
        return out
    check("draw_border", border)
    for p in pairs(gen.make_task("invert_fg_bg", 2)):
        fg = int(p.input.max())
        assert set(np.unique(p.input)) == {0, fg} and np.array_equal(p.output, np.where(p.input == 0, fg, 0))
    for p in pairs(gen.make_task("majority_colour_fill", 2)):
        counts = np.bincount(p.input[p.input != 0], minlength=10)
        assert (p.output == counts.argmax()).all() and p.output.shape == p.input.shape
        assert sorted(counts)[-1] > sorted(counts)[-2]   # a unique majority


def test_gravity_keeps_cells_and_packs_them():
    for seed in range(4):
        task = gen.make_task("gravity", seed)
        direction = task.meta["params"]["direction"]
        for p in pairs(task):
            # Turn so the fall is downward, then every column must be packed at the bottom.
            k = {"down": 0, "left": 1, "up": 2, "right": 3}[direction]
            x, y = np.rot90(p.input, k), np.rot90(p.output, k)
            for c in range(x.shape[1]):
                column_in, column_out = x[:, c][x[:, c] != 0], y[:, c]
                n = len(column_in)
                assert np.array_equal(column_out[len(column_out) - n:], column_in)
                assert not column_out[:len(column_out) - n].any()


def test_size_and_object_families():
    for p in pairs(gen.make_task("scale_up_2", 1)):
        assert np.array_equal(p.output, p.input.repeat(2, axis=0).repeat(2, axis=1))
    for p in pairs(gen.make_task("tile_2x2", 1)):
        assert np.array_equal(p.output, np.tile(p.input, (2, 2)))
    for p in pairs(gen.make_task("crop_object", 1)):
        ys, xs = np.nonzero(p.input)
        assert np.array_equal(p.output, p.input[ys.min():ys.max() + 1, xs.min():xs.max() + 1])
    task = gen.make_task("count_objects", 1)
    for p in pairs(task):
        assert p.output.shape[0] == 1 and (p.output == task.meta["params"]["colour"]).all()
        assert p.output.shape[1] == len(gen.components(p.input))
    for p in pairs(gen.make_task("denoise", 1)):
        lonely = (p.output != 0) & (gen.neighbour_count(p.output != 0) == 0)
        assert not lonely.any() and (p.output != 0).sum() < (p.input != 0).sum()
    for p in pairs(gen.make_task("flood_fill", 1)):
        assert p.output.shape == p.input.shape and (p.output != 0).sum() > (p.input != 0).sum()


def test_compositions_apply_both_steps_in_order():
    for seed in range(10):
        task = gen.make_task("flip_horizontal+recolour_single", seed)
        params = task.meta["params"]["recolour_single"]
        for p in pairs(task):
            flipped = np.fliplr(p.input)
            # Each pair shows both steps: the flip moves something and the source colour occurs.
            assert not np.array_equal(flipped, p.input) and (p.input == params["from"]).any()
            assert np.array_equal(p.output, np.where(flipped == params["from"], params["to"], flipped))
    fam = gen.get_family("flip_vertical+colour_swap")
    assert fam.name == "flip_vertical+colour_swap"
    with pytest.raises(KeyError):
        gen.get_family("no_such_family")


# ---------------------------------------------------------------- checks and knobs

def test_check_task_rejects_bad_tasks():
    task = gen.make_task("flip_horizontal", 0)
    with pytest.raises(gen.GenerationError, match="not rule"):
        gen.check_task(task, np.flipud)
    g = np.array([[1, 2], [3, 4]], np.int8)
    identity = Task("t", (Pair(g, g), Pair(g.T, g.T)), (Pair(g[::-1], g[::-1]),))
    with pytest.raises(gen.GenerationError, match="equals its input"):
        gen.check_task(identity, lambda x: x)
    repeated = Task("t", (Pair(g, g.T), Pair(g, g.T)), (Pair(g[::-1], g[::-1].T),))
    with pytest.raises(gen.GenerationError, match="demonstration inputs"):
        gen.check_task(repeated, lambda x: x.T)


def test_difficulty_bounds_grids_and_more_pairs():
    small = gen.Difficulty(min_size=3, max_size=5, max_objects=1)
    for name in ("rotate_90", "scale_up_2", "tile_mirror", "gravity", "count_objects"):
        task = gen.make_task(name, 0, n_train=4, n_test=2, difficulty=small)
        assert len(task.train) == 4 and len(task.test) == 2
        assert all(max(g.shape) <= 5 for p in pairs(task) for g in (p.input, p.output))
    large = gen.Difficulty(min_size=12, max_size=20, max_objects=6)
    task = gen.make_task("flip_vertical", 0, difficulty=large)
    assert all(12 <= min(p.input.shape) and max(p.input.shape) <= 20 for p in pairs(task))


# ---------------------------------------------------------------- datasets

def test_eval_set_is_fast_small_and_sorted():
    start = time.perf_counter()
    specs = gen.DATASETS["gen-eval"]()
    fresh = [gen.make_task(f, s) for f, s in specs]
    assert time.perf_counter() - start < 2.0
    ids = [t.id for t in gen.dataset("gen-eval")]
    assert len(ids) == 200 == len(set(ids)) and ids == sorted(ids) == sorted(t.id for t in fresh)
    for task in fresh:
        assert task.meta["seed"] >= gen.EVAL_SEED_START
        assert all(max(g.shape) <= 10 for p in pairs(task) for g in (p.input, p.output))


def test_train_and_eval_are_disjoint(train_set, eval_set):
    assert 1000 <= len(train_set) <= 2500
    assert [t.id for t in train_set] == sorted(t.id for t in train_set)
    assert all(t.meta["seed"] < gen.EVAL_SEED_START for t in train_set)
    assert not {t.id for t in train_set} & {t.id for t in eval_set}
    assert not {content_key(t) for t in train_set} & {content_key(t) for t in eval_set}


def test_held_out_compositions_only_in_eval(train_set, eval_set):
    held_out = {gen.composition_name(c) for c in gen.HELD_OUT_COMPOSITIONS}
    train_families = {t.meta["family"] for t in train_set}
    eval_families = {t.meta["family"] for t in eval_set}
    assert len(held_out) >= 5
    assert held_out <= eval_families and not held_out & train_families
    assert set(gen.FAMILIES) <= train_families and set(gen.FAMILIES) <= eval_families
    # Every step of a held-out composition is familiar from gen-train.
    assert {part for c in gen.HELD_OUT_COMPOSITIONS for part in c} <= train_families


def test_load_dataset_returns_generated_tasks(eval_set):
    assert {"gen-train", "gen-eval"} <= set(datasets.dataset_names())
    loaded = datasets.load_dataset("gen-eval")
    assert loaded.ids == [t.id for t in eval_set] and not loaded.failures
    assert all(content_key(a) == content_key(b) for a, b in zip(loaded.tasks, eval_set))
    with pytest.raises(KeyError):
        gen.dataset("gen-nothing")


def test_a_selection_of_a_generated_dataset_generates_only_its_tasks(monkeypatch, tmp_path):
    """`tta run --dataset gen-eval --limit 5` generated all 200 tasks first (1.5 s of every run's
    start-up, in every worker).  Fails if a selection by limit, sample or ids makes the whole
    dataset, or chooses other tasks, or other grids, than selecting from the whole dataset does."""
    whole = datasets.load_dataset("gen-eval")                  # the reference, made before the guard
    monkeypatch.setattr(gen, "_WHOLE", {})
    monkeypatch.setattr(gen, "_generate", lambda name: pytest.fail(f"{name} generated whole"))
    assert gen.ids("gen-eval") == whole.ids and gen.ids("gen-train")[:1] == ["gen-anti_transpose-0"]
    some = [whole.ids[50], whole.ids[3], whole.ids[50]]
    for choice in ({"limit": 5}, {"sample": 7}, {"sample": 10, "limit": 3}, {"task_ids": some}):
        lazy = datasets.load_selection("gen-eval", **choice)
        reference = datasets.select(whole, **choice)
        assert lazy.ids == reference.ids and len(lazy.tasks) == len(reference.tasks) > 0, choice
        for mine, theirs in zip(lazy.tasks, reference.tasks):
            assert mine.id == theirs.id and all(grid_key(a.input) == grid_key(b.input) and grid_key(a.output) == grid_key(b.output)
                                                for a, b in zip(mine.train + mine.test, theirs.train + theirs.test))
    with pytest.raises(tasks.TaskError, match="gen-eval: no task with id nope"):
        datasets.load_selection("gen-eval", task_ids=["nope"])
    from tta.run.runner import RunSpec, run
    out = run(RunSpec(method="copy_input", dataset="gen-eval", sample=3, out=tmp_path / "r"), progress=False)
    assert json.loads((out / "manifest.json").read_text())["task_ids"] == datasets.select(whole, sample=3).ids
