"""LESS data selection: (1) it selects by the task's family, and the random projection keeps the
exact ranking; (2) Adam preconditioning, projection and scoring against hand computations;
(3) an end-to-end `less` run records its selections, is charged, reuses its cache, and refuses
a pool that overlaps the evaluated tasks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tta import gradients as G
from tta.budget import Meter
from tta.contamination import ContaminationError
from tta.data import leave_one_out_examples
from tta.generate import make_task
from tta.models import load_model
from tta.training import train

from methods.less import target_examples


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model's matmuls are fastest on one thread (and two threads next to another job are
    hundreds of times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
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


def test_checkpoint_moments_are_adamws_uncorrected_averages():
    """LESS's formula takes the optimiser's stored moments as they are: torch's exp_avg and
    exp_avg_sq are the plain exponential averages (bias correction is applied only in the step)."""
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.0)
    g1, g2 = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])
    for g in (g1, g2):
        w.grad = g.clone()
        opt.step()
    state = opt.state[w]
    assert state["exp_avg"].tolist() == pytest.approx((0.9 * 0.1 * g1 + 0.1 * g2).tolist())   # [0.39, -0.13]
    assert state["exp_avg_sq"].tolist() == pytest.approx((0.999 * 0.001 * g1**2 + 0.001 * g2**2).tolist())


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


# ================================================================ (1) selection works

FAMILIES = ("flip_horizontal", "gravity")


def _plain_examples(task, fmt, n, seed):
    # Colour permutations and demonstration shuffles, but no geometric transforms: a rotated
    # flip is another dihedral map and a rotated "fall down" falls sideways, which would blur
    # the family labels the test checks.
    return leave_one_out_examples(task, fmt, np.random.default_rng(seed), n, transforms=[])


@pytest.fixture(scope="module")
def trained_store(tmp_path_factory):
    """A tiny model trained for 200 steps on the two families (a random one does not separate
    them: its gradients barely depend on the rule), and a datastore of a balanced pool."""
    torch.set_num_threads(1)
    lm = load_model("random:tiny", device="cpu")
    for p in lm.model.parameters():
        p.requires_grad_(True)
    data = [e.encoded for f in FAMILIES for s in range(100, 120)
            for e in _plain_examples(make_task(f, s), lm.format, 4, s)]
    report = train(lm, data, Meter(), lr=3e-3, epochs=5, batch_size=4, warmup_ratio=0.1, seed=0)
    assert report.losses[-1] < report.losses[0] - 1.0
    for p in lm.model.parameters():
        p.requires_grad_(False)
    pool = [e for f in FAMILIES for s in range(6) for e in _plain_examples(make_task(f, s), lm.format, 3, s)]
    settings = G.GradientSettings(min_warmup_examples=8)
    store = G.build(lm, pool, settings, tmp_path_factory.mktemp("less") / "store", progress=False)
    return lm, store


def _family(task_id: str) -> str:
    return next(f for f in FAMILIES if task_id.startswith(f"gen-{f}-"))


def _targets(lm, family, seed):
    return target_examples(make_task(family, seed), lm.format, np.random.default_rng(0), 1, lm.max_context)


def test_selection_prefers_the_targets_family(trained_store):
    lm, store = trained_store
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
    # Chance gives 32 of 64 (P(>= 44 of 64 by chance) < 0.2%); the trained model gives ~50.
    assert same / total >= 0.69, f"only {same}/{total} of the top picks share the target's family"


def test_a_pool_example_as_target_selects_itself(trained_store):
    lm, store = trained_store
    for i in (0, 5, 20, 33):
        feats = store.target_features(lm, [store.encoded(i)])
        assert int(np.argmax(G.score(store.features, store.lrs, feats))) == i


def test_projected_ranking_agrees_with_exact_cosines(trained_store):
    """The same score from unprojected gradients (exact cosines, float32) ranks the same top picks."""
    lm, store = trained_store
    pool = [store.encoded(i) for i in range(len(store))]
    targets = [t.encoded for t in _targets(lm, FAMILIES[0], 1000) + _targets(lm, FAMILIES[1], 1000)]
    exact_scores = np.zeros((2, len(pool)))
    with G.gradient_adapter(lm, store.settings) as params:
        beta1, beta2 = store.meta["betas"]
        for c, lr in enumerate(store.lrs):
            weights, m, v = store.checkpoint(c)
            G.load_weights(params, weights)
            P = np.stack([G.adam_direction(G.example_gradient(lm, params, e), m, v, beta1, beta2).numpy() for e in pool])
            T = np.stack([G.example_gradient(lm, params, e).numpy() for e in targets])
            cos = G.normalise(P) @ G.normalise(T).T            # (pool, targets)
            half = len(targets) // 2
            exact_scores[0] += lr * cos[:, :half].mean(axis=1)
            exact_scores[1] += lr * cos[:, half:].mean(axis=1)
    feats = store.target_features(lm, targets)
    half = len(targets) // 2
    for k, rows in enumerate((slice(0, half), slice(half, None))):
        projected = G.score(store.features, store.lrs, feats[:, rows])
        assert np.corrcoef(projected, exact_scores[k])[0, 1] > 0.9
        top_exact, top_proj = set(np.argsort(-exact_scores[k])[:8]), set(np.argsort(-projected)[:8])
        assert len(top_exact & top_proj) >= 6
        assert int(np.argmax(projected)) in set(np.argsort(-exact_scores[k])[:3])


# ================================================================ (3) end to end

def _spec(tmp_path, out, **extra):
    from tta.runner import RunSpec
    overrides = {"pool": "gen-train", "pool_tasks": 8, "pool_per_task": 2, "datastore_dir": str(tmp_path / "stores"),
                 "gradient_epochs": 2, "min_warmup_examples": 4, "top_k": 4, "epochs": 1,
                 "transforms": ["identity", "flip_h"], "orders": 1, **extra.pop("overrides", {})}
    return RunSpec(method="less", dataset="gen-eval", model="random:tiny", limit=1, overrides=overrides,
                   out=tmp_path / out, device="cpu", **extra)


def test_less_run_records_selections_charges_them_and_reuses_the_store(tmp_path, monkeypatch):
    from tta.budget import Budget
    from tta.runner import read_results, run
    from tta.tasks import load_dataset

    monkeypatch.setattr("tta.runner.set_threads", lambda: None)   # keep this module's one thread
    out = run(_spec(tmp_path, "first"), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    one_off = manifest["one_off"]
    assert one_off["charged"] is False and one_off["cached"] is False
    assert one_off["flops"] > 0 and "LESS gradient datastore" in one_off["what"]
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
    assert record["flops"] > 0

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
    from tta.runner import run

    monkeypatch.setattr("tta.runner.set_threads", lambda: None)
    with pytest.raises(ContaminationError, match="appear in the pool gen-eval"):
        run(_spec(tmp_path, "bad", overrides={"pool": "gen-eval", "pool_tasks": 0}), progress=False)
    assert not (tmp_path / "stores").exists() or not any((tmp_path / "stores").iterdir())   # refused before building

    result = CliRunner().invoke(main, ["run", "--method", "less", "--model", "random:tiny", "--dataset", "gen-eval",
                                       "--limit", "1", "--set", "pool=gen-eval", "--out", str(tmp_path / "cli"),
                                       "--device", "cpu", "--quiet"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: less: ") and "pool gen-eval" in lines[0]
