"""LESS data selection: (1) it selects by the task's family, and the random projection keeps the
exact ranking; (2) Adam preconditioning, projection and scoring against hand computations, and
gradients, moments and charges of a built datastore against a training forward and the cost
formula; (3) an end-to-end `less` run records its selections, is charged what the formula says,
reuses its cache, and refuses a pool that overlaps the evaluated tasks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from methods.less import gradients as G
from tta.budget import Meter, attention_context, model_shape, training_step_flops
from tta.data.contamination import ContaminationError
from tta.training.examples import leave_one_out_examples
from tta.model.attention import causal_attention
from tta.model.batching import pad_batch, pad_labels
from tta.data.synthetic import make_task
from tta.model.loading import autocast, load_model


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    """The embedded model's gradients on two threads, whatever an earlier module left: this
    module took 146 s on one thread and 106 s on two, on a 2-core host where it runs alone."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


# ================================================================ (2) hand computations

def test_adam_direction_matches_a_hand_computation():
    g = torch.tensor([0.1, -0.2])
    m = torch.tensor([0.01, 0.0])
    v = torch.tensor([1e-4, 4e-4])
    # m' = 0.9 m + 0.1 g = [0.019, -0.02];  v' = 0.999 v + 0.001 g^2 = [1.099e-4, 4.396e-4]
    expected = [0.019 / np.sqrt(1.099e-4 + 1e-8), -0.02 / np.sqrt(4.396e-4 + 1e-8)]   # [1.8123, -0.9539]
    got = G.adam_direction(g, m, v, 0.9, 0.999, 1e-8)
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    assert got.tolist() == pytest.approx([1.8123, -0.9539], abs=1e-4)


def test_projection_of_a_two_parameter_gradient_by_hand():
    proj = G.Projection.random(n_features=2, dim=8, density=1.0, seed=3)   # dense Rademacher
    P = proj.matrix.toarray()
    assert P.shape == (8, 2)
    assert np.allclose(np.abs(P), 1 / np.sqrt(8))            # every entry is +-1/sqrt(dim)
    assert len({tuple(np.sign(row)) for row in P}) > 1        # not one repeated row
    x = np.array([[3.0, 4.0]])
    out = proj(x)[0]
    by_hand = [P[r, 0] * 3 + P[r, 1] * 4 for r in range(8)]
    assert out.tolist() == pytest.approx(by_hand)
    assert set(np.round(np.abs(out) * np.sqrt(8), 5)) <= {7.0, 1.0}   # +-3 +-4
    unit = G.normalise(proj(x))[0]
    assert np.linalg.norm(unit) == pytest.approx(1.0)
    assert unit.tolist() == pytest.approx((out / np.linalg.norm(out)).tolist())


def test_projection_draws_the_matrix_scikit_learns_sparse_random_projection_draws():
    """The scipy draw has scikit-learn's distribution: the same two values +-1/sqrt(density * dim),
    the same density (1/sqrt(n) by default, or the one asked), signs at even odds; a seed gives one
    matrix.  Fails on a wrong scale, density or sign balance, or an unseeded draw."""
    from sklearn.random_projection import SparseRandomProjection

    n, dim = 4096, 512
    for density in (0.0, 0.1):
        ours = G.Projection.random(n, dim, density=density, seed=5).matrix
        reference = SparseRandomProjection(n_components=dim, density=density or "auto", random_state=5)
        reference = reference.fit(np.zeros((1, n), dtype=np.float32)).components_
        assert ours.shape == reference.shape == (dim, n)
        assert np.allclose(np.unique(np.abs(ours.data)), np.unique(np.abs(reference.data)))
        expected = density or 1 / np.sqrt(n)
        for m in (ours, reference):
            assert abs(m.nnz / (n * dim) - expected) < 0.03 * expected
            assert abs((m.data > 0).mean() - 0.5) < 0.01
            assert abs(np.diff(m.indptr).std() - np.sqrt(n * expected * (1 - expected))) < 0.15 * np.sqrt(n * expected)
    again = G.Projection.random(n, dim, seed=5).matrix
    assert (again != G.Projection.random(n, dim, seed=5).matrix).nnz == 0
    assert (again != G.Projection.random(n, dim, seed=6).matrix).nnz > 0


def test_sparse_projection_keeps_cosines_and_survives_a_save():
    rng = np.random.default_rng(0)
    base = rng.normal(size=4096)
    vectors = np.stack([base + s * rng.normal(size=4096) for s in np.linspace(0.2, 3.0, 12)])
    proj = G.Projection.random(4096, 1024, seed=1)
    assert proj.matrix.nnz < 0.05 * 4096 * 1024                 # density 1/sqrt(4096) = 1/64
    exact = G.normalise(vectors) @ G.normalise(vectors).T
    projected = G.normalise(proj(vectors)) @ G.normalise(proj(vectors)).T
    assert np.abs(exact - projected).max() < 0.1
    reloaded = G.Projection(**proj.arrays(), n_features=4096)
    assert np.array_equal(reloaded(vectors), proj(vectors))


def test_score_is_lr_weighted_cosine_mean_or_max_by_hand():
    e0, e1 = [1.0, 0.0], [0.0, 1.0]
    pool = np.array([[e0, e1], [e0, e1]], dtype=np.float16)          # 2 checkpoints x 2 examples
    targets = np.array([[e0, e1], [e1, e1]], dtype=np.float32)        # 2 checkpoints x 2 targets
    lrs = [0.5, 0.25]
    # mean of targets: ckpt0 [0.5, 0.5], ckpt1 [0, 1]
    # example 0: 0.5*0.5 + 0.25*0 = 0.25;  example 1: 0.5*0.5 + 0.25*1 = 0.5
    assert G.score(pool, lrs, targets).tolist() == pytest.approx([0.25, 0.5])
    # max over groups (each target its own group): example 0: max(0.5*1 + 0, 0 + 0) = 0.5
    # example 1: max(0 + 0.25, 0.5 + 0.25) = 0.75
    assert G.score(pool, lrs, targets, groups=[0, 1], aggregate="max").tolist() == pytest.approx([0.5, 0.75])
    # a budget that stopped after the first checkpoint sums over that one only
    assert G.score(pool, lrs, targets[:1]).tolist() == pytest.approx([0.25, 0.25])


# ================================================================ (2b) a built datastore, by hand

def _training_gradient(lm, params, batch, positions=True) -> torch.Tensor:
    """The flattened gradient over `params` of `batch`'s loss from a forward made the way
    `tta.training.finetune.train` makes it: `pad_batch`'s ids, mask and position ids (grid positions for the
    embedded model), bf16 autocast and training's attention kernel (its rounding differs from
    SDPA's by ~3% of the gradient's norm, as much as autocast's own against fp32).
    `positions=False`: one sequence with no position ids at all."""
    model = lm.model
    model.train()
    try:
        with torch.enable_grad(), autocast(lm.device), causal_attention(model):
            if positions:
                ids, mask, numbered = pad_batch([e.input_ids for e in batch], lm.format, lm.device, side="right")
                labels = pad_labels([e.labels for e in batch], lm.device)
                loss = model(input_ids=ids, attention_mask=mask, position_ids=numbered, labels=labels).loss
            else:
                [e] = batch
                loss = model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    finally:
        model.eval()
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                      for g, (_, p) in zip(grads, params)])


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _step(shape, e) -> float:
    """The cost formula's price of one training step (forward and backward) on one sequence."""
    return training_step_flops(shape, len(e), attention_context(0, len(e)))


@pytest.mark.parametrize("spec, unnumbered_gap", [("default", 0.5), ("random:tiny", 2e-3)])
def test_example_gradient_numbers_tokens_as_training_does(spec, unnumbered_gap):
    """The gradient of a gen-eval leave-one-out target is the one training would take: grid position
    ids, not 0, 1, 2, ...  The embedded model learned grid positions, so without them its loss on
    such a target is 7-20x higher (0.2-0.5 vs 3-4 nats a token) and the gradient points elsewhere
    (relative difference 4-8); an untrained model's RoPE still sees the other numbering (~0.5%,
    vs < 1e-5 between two forwards numbered alike)."""
    lm = load_model(spec, device="cpu")
    example = _plain_examples(make_task("flip_horizontal", 1000), lm.format, 1, 0)[0].encoded
    with G.gradient_adapter(lm, G.GradientSettings()) as params:
        got = G.example_gradient(lm, params, example)
        trained = _training_gradient(lm, params, [example])
        unnumbered = _training_gradient(lm, params, [example], positions=False)
    assert got.norm() > 0
    assert _rel(got, trained) < 1e-5, "example_gradient differs from a training forward with pad_batch's positions"
    assert _rel(unnumbered, trained) > unnumbered_gap   # the check above can tell the two apart


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """A datastore of two pool examples with the embedded model: a warm-up of one step (batch 2)
    per epoch, 2 epochs."""
    lm = load_model("default", device="cpu")
    pool = _plain_examples(make_task("flip_horizontal", 3), lm.format, 2, 0)
    assert len(pool) == 2
    settings = G.GradientSettings(min_warmup_examples=2, batch_size=2, epochs=2, proj_dim=256)
    store = G.build(lm, pool, settings, tmp_path_factory.mktemp("less") / "small", progress=False)
    return lm, pool, store


def test_build_keeps_adams_raw_moments_and_preconditions_training_gradients(small_store):
    """LESS's formula takes the optimiser's moments as they are, without bias correction.  The
    warm-up's first learning rate is 0 (a 3% linear warm-up of 2 steps is one step), so both steps
    see the gradient g of the fresh adapter, and the checkpoints hold
    m0 = 0.1 g, v0 = 0.001 g^2 and m1 = 0.9 m0 + 0.1 g = 0.19 g, v1 = 0.999 v0 + 0.001 g^2 = 0.001999 g^2
    (bias-corrected, m0 would be g).  Every feature is the projected, normalised Adam direction of
    the pool example's training-forward gradient at that checkpoint."""
    lm, pool, store = small_store
    settings = store.settings
    assert store.lrs == pytest.approx([0.0, settings.lr])
    assert store.meta["warmup"]["steps"] == 2
    beta1, beta2 = store.meta["betas"]
    with G.gradient_adapter(lm, settings) as params:   # the same seed: the warm-up's starting adapter
        start = {n: p.detach().clone() for n, p in params}
        g = _training_gradient(lm, params, [e.encoded for e in pool])
        (w0, m0, v0), (w1, m1, v1) = store.checkpoint(0), store.checkpoint(1)
        assert all(torch.equal(w0[n], start[n]) for n in start)          # a step at lr 0 moves nothing
        assert not all(torch.equal(w1[n], start[n]) for n in start)
        assert _rel(m0, 0.1 * g) < 1e-3 and _rel(v0, 0.001 * g * g) < 2e-3
        assert _rel(m1, 0.19 * g) < 1e-3 and _rel(v1, 0.001999 * g * g) < 2e-3
        for c, (weights, m, v) in enumerate([(w0, m0, v0), (w1, m1, v1)]):
            G.load_weights(params, weights)
            for i, e in enumerate(pool):
                direction = G.adam_direction(_training_gradient(lm, params, [e.encoded]), m, v, beta1, beta2)
                expected = G.normalise(store.projection(direction.numpy()[None]))[0]
                stored = np.asarray(store.features[c, i], dtype=np.float32)
                assert float(stored @ expected) > 0.99, f"feature of example {i} at checkpoint {c}"


def test_build_is_charged_a_training_step_per_warmup_example_and_per_feature(small_store):
    """The one-off cost in the datastore's record is the formula's: every epoch's warm-up trains on
    each of the 2 examples once, and every checkpoint takes one gradient of each: 2 x 2 x 2 steps."""
    lm, pool, store = small_store
    with G.gradient_adapter(lm, store.settings):
        shape = model_shape(lm.model)
    assert shape.n_trainable == store.meta["n_features"]   # only the adapter is trained
    per_pass = sum(_step(shape, e.encoded) for e in pool)
    assert store.meta["build"]["flops"] == pytest.approx(2 * store.settings.epochs * per_pass, rel=1e-9)


def test_target_gradients_are_charged_one_training_step_each(small_store):
    """Every target gradient is a metered forward and backward, each charged as one training step;
    when `afford` says no, the checkpoint in progress is dropped but what it spent stays charged."""
    lm, pool, store = small_store
    t0, t1 = pool[1].encoded, pool[0].encoded
    with G.gradient_adapter(lm, store.settings):
        shape = model_shape(lm.model)
    meter = Meter()
    meter.attach(lm.model)
    try:
        feats = store.target_features(lm, [t0, t1])
        assert feats.shape == (2, 2, store.projection.dim)
        assert meter.flops == pytest.approx(2 * (_step(shape, t0) + _step(shape, t1)), rel=1e-9)
        asked = []

        def afford(e):
            asked.append(e)
            return len(asked) <= 3   # checkpoint 0 whole, then one target of checkpoint 1

        before = meter.flops
        cut = store.target_features(lm, [t0, t1], afford)
        assert cut.shape == (1, 2, store.projection.dim) and np.allclose(cut[0], feats[0], atol=1e-5)
        assert meter.flops - before == pytest.approx(2 * _step(shape, t0) + _step(shape, t1), rel=1e-9)
    finally:
        meter.detach()


# ================================================================ (1) selection works

FAMILIES = ("flip_horizontal", "flip_vertical")


def _plain_examples(task, fmt, n, seed):
    # Colour permutations and demonstration shuffles, but no geometric transforms, which turn some
    # families into others (a rotated flip is another dihedral map) and would blur the labels.
    return leave_one_out_examples(task, fmt, np.random.default_rng(seed), n, transforms=[])


@pytest.fixture(scope="module")
def family_store(tmp_path_factory):
    """The embedded model, pretrained on generated families, and a datastore of a balanced pool of
    two families whose tasks differ only in the rule (same grids, same sizes, same colours).
    A model must know the rules for its gradients to tell them apart: an untrained one does not,
    nor does a tiny one trained for 200 steps on two families (measured on flip_horizontal vs
    gravity: ~38 of the 64 top picks in the family, chance 32 -- the ~48 it showed while
    gradients were taken without the grid position ids came from the mismatch, not the rule)."""
    lm = load_model("default", device="cpu")
    pool = [e for f in FAMILIES for s in range(6) for e in _plain_examples(make_task(f, s), lm.format, 3, s)]
    # The paper's 8,192 dimensions: the embedded model's gradients are nearly orthogonal (scores
    # spread by ~0.03 in cosine), and at 1,024 the projection's noise is of that size (measured:
    # correlation with the exact scores 0.67 or 0.95 by projection seed; 0.99 at 8,192).
    settings = G.GradientSettings(min_warmup_examples=8, proj_dim=8192)
    store = G.build(lm, pool, settings, tmp_path_factory.mktemp("less") / "store", progress=False)
    return lm, store


def _family(task_id: str) -> str:
    return next(f for f in FAMILIES if task_id.startswith(f"gen-{f}-"))


def _targets(lm, family, seed):
    from methods.less import target_examples
    return target_examples(make_task(family, seed), lm.format, np.random.default_rng(0), 1, lm.max_context)


def test_selection_prefers_the_targets_family(family_store):
    lm, store = family_store
    families = [_family(e["task_id"]) for e in store.examples]
    assert families.count(FAMILIES[0]) == families.count(FAMILIES[1])      # a balanced pool: chance is 1/2
    same = total = 0
    for family in FAMILIES:
        for seed in range(1000, 1004):   # gen-eval's seed range: tasks the pool never saw
            targets = _targets(lm, family, seed)
            scores = G.score(store.features, store.lrs, store.target_features(lm, [t.encoded for t in targets]))
            top = np.argsort(-scores)[:8]
            same += sum(families[i] == family for i in top)
            total += len(top)
    # Chance gives 32 of 64 (P(>= 44 of 64 by chance) < 0.2%); the embedded model gives 53.
    assert same / total >= 0.69, f"only {same}/{total} of the top picks share the target's family"


def test_a_pool_example_as_target_mostly_selects_itself(family_store):
    """A pool example's own (SGD) gradient as the target ranks the example first more often than
    not (chance: 1 in 36).  Not always: the pool's features are Adam directions, the target's a
    plain gradient, so another example's Adam direction can lie closer (measured: all 12 first
    here; on a colour_swap / draw_border pool at 1,024 dimensions, 27 of 36 first, none below 10th)."""
    lm, store = family_store
    ranks = []
    for i in range(0, len(store), 3):
        scores = G.score(store.features, store.lrs, store.target_features(lm, [store.encoded(i)]))
        ranks.append(int((scores > scores[i]).sum()))
    assert sum(r == 0 for r in ranks) >= len(ranks) / 2, ranks
    assert max(ranks) < 8, ranks


def test_projected_ranking_agrees_with_exact_cosines(family_store):
    """The same score from unprojected gradients (exact cosines, float32) ranks the same top picks.
    Over the first and last of the store's checkpoints, to halve the exact gradients' time."""
    lm, store = family_store
    pool = [store.encoded(i) for i in range(len(store))]
    targets = [t.encoded for t in _targets(lm, FAMILIES[0], 1000) + _targets(lm, FAMILIES[1], 1000)]
    half = len(targets) // 2
    checkpoints = [0, len(store.lrs) - 1]
    lrs = [store.lrs[c] for c in checkpoints]
    exact_scores = np.zeros((2, len(pool)))
    with G.gradient_adapter(lm, store.settings) as params:
        beta1, beta2 = store.meta["betas"]
        for c, lr in zip(checkpoints, lrs):
            weights, m, v = store.checkpoint(c)
            G.load_weights(params, weights)
            P = np.stack([G.adam_direction(G.example_gradient(lm, params, e), m, v, beta1, beta2).numpy() for e in pool])
            T = np.stack([G.example_gradient(lm, params, e).numpy() for e in targets])
            cos = G.normalise(P) @ G.normalise(T).T            # (pool, targets)
            exact_scores[0] += lr * cos[:, :half].mean(axis=1)
            exact_scores[1] += lr * cos[:, half:].mean(axis=1)
    feats = store.target_features(lm, targets)[checkpoints]
    for k, rows in enumerate((slice(0, half), slice(half, None))):
        projected = G.score(np.asarray(store.features)[checkpoints], lrs, feats[:, rows])
        assert np.corrcoef(projected, exact_scores[k])[0, 1] > 0.9
        top_exact, top_proj = set(np.argsort(-exact_scores[k])[:8]), set(np.argsort(-projected)[:8])
        assert len(top_exact & top_proj) >= 6
        assert int(np.argmax(projected)) in set(np.argsort(-exact_scores[k])[:3])


# ================================================================ (3) end to end

def _spec(tmp_path, out, **extra):
    from tta.run.runner import RunSpec
    # min_warmup_examples = the whole pool (8 tasks x 2), so the warm-up's cost is known exactly.
    overrides = {"pool": "gen-train", "pool_tasks": 8, "pool_per_task": 2, "datastore_dir": str(tmp_path / "stores"),
                 "gradient_epochs": 2, "min_warmup_examples": 16, "top_k": 4, "max_selected": 4, "epochs": 1,
                 "transforms": ["identity", "flip_h"], "orders": 1, **extra.pop("overrides", {})}
    return RunSpec(method="less", dataset="gen-eval", model="random:tiny", limit=1, overrides=overrides,
                   out=tmp_path / out, device="cpu", **extra)


def test_less_run_records_selections_charges_them_and_reuses_the_store(tmp_path, monkeypatch):
    import dataclasses

    from tta.budget import Budget
    from tta.reporting.report import load_runs
    from tta.run.runner import read_results, run
    from tta.data.datasets import load_dataset

    from methods.less import target_examples

    monkeypatch.setattr("tta.run.solve.set_threads", lambda: None)   # keep this module's one thread
    out = run(_spec(tmp_path, "first"), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    one_off = manifest["one_off"]
    assert one_off["charged"] == "amortised" and one_off["cached"] is False
    assert "LESS gradient datastore" in one_off["what"]
    assert one_off["pool_tasks"] == 8 and one_off["pool_examples"] == 16
    [record] = read_results(out / "results.jsonl")
    assert record["error"] is None
    adapt = record["extra"]["adapt"]
    pool_ids = {t.id for t in load_dataset("gen-train").tasks}
    assert len(adapt["selected"]) == 4 and adapt["checkpoints_used"] == 2
    scores = [p["score"] for p in adapt["selected"]]
    assert scores == sorted(scores, reverse=True)
    for pick in adapt["selected"]:
        assert pick["task_id"] in pool_ids and pick["augmentation"]
    assert adapt["train_examples"] == 4 and adapt["steps"] == 2

    # The one-off cost is the formula's: each of the 16 pool examples is trained on once per
    # warm-up epoch and has one gradient taken per checkpoint, each a training step of the adapter.
    store = G.Datastore(one_off["datastore"])
    lm = load_model("random:tiny", device="cpu")
    with G.gradient_adapter(lm, store.settings):
        gradient_shape = model_shape(lm.model)
    step = lambda shape, n: training_step_flops(shape, n, attention_context(0, n))
    pool_pass = sum(step(gradient_shape, e["length"]) for e in store.examples)
    assert one_off["flops"] == pytest.approx(2 * store.settings.epochs * pool_pass, rel=1e-9)
    # ... and every report adds it, amortised over the run's one task, to the task's own spend.
    assert load_runs(out)["total_flops"].tolist() == pytest.approx([record["flops"] + one_off["flops"]])
    # The task's spend covers at least its target gradients (a training step each per checkpoint)
    # and the training steps on the selected examples (priced without the adapter's weight
    # gradients, so a lower bound); the predictions come on top.
    task = next(t for t in load_dataset("gen-eval").tasks if t.id == record["task_id"])
    targets = target_examples(task, lm.format, np.random.default_rng(0), 1, lm.max_context)
    assert len(targets) == adapt["targets"]
    selection = adapt["checkpoints_used"] * sum(step(gradient_shape, len(t.encoded)) for t in targets)
    frozen = dataclasses.replace(model_shape(lm.model), n_trainable=0)
    training = sum(step(frozen, len(store.encoded(p["index"]))) for p in adapt["selected"])
    assert record["flops"] > selection + training

    # A second run finds the datastore; a budget too small for any target gradient selects nothing.
    out2 = run(_spec(tmp_path, "starved", budget=Budget(flops=1e6)), progress=False)
    manifest2 = json.loads((out2 / "manifest.json").read_text())
    assert manifest2["one_off"]["cached"] is True
    assert manifest2["one_off"]["flops"] == one_off["flops"]
    [starved] = read_results(out2 / "results.jsonl")
    assert starved["extra"]["adapt"]["checkpoints_used"] == 0 and starved["extra"]["adapt"]["selected"] == []
    assert starved["flops"] <= 1e6


def test_less_refuses_a_pool_that_overlaps_the_evaluated_tasks(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from tta.cli import main
    from tta.run.runner import run

    monkeypatch.setattr("tta.run.solve.set_threads", lambda: None)
    with pytest.raises(ContaminationError, match="appear in the pool gen-eval"):
        run(_spec(tmp_path, "bad", overrides={"pool": "gen-eval", "pool_tasks": 0}), progress=False)
    assert not (tmp_path / "stores").exists() or not any((tmp_path / "stores").iterdir())   # refused before building

    result = CliRunner().invoke(main, ["run", "--method", "less", "--model", "random:tiny", "--dataset", "gen-eval",
                                       "--limit", "1", "--set", "pool=gen-eval", "--out", str(tmp_path / "cli"),
                                       "--device", "cpu", "--quiet"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: less: ") and "pool gen-eval" in lines[0]
