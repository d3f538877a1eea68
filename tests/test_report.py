"""Tests for tta.stats and tta.report on hand-built run directories with known answers."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import scipy.stats
from statsmodels.stats.proportion import proportion_confint

from tta import stats
from tta.report import (
    ReportError, accuracy_by_demos, accuracy_by_size, accuracy_table, check_comparable,
    load_runs, paired_table, per_task_table, seed_table, write_report, write_run_report,
)

TASKS = [f"t{i:02d}" for i in range(20)]


# --------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------

def task(task_id, correct, error=None, flops=1e12, n_tokens=500, n_demos=3, cell_acc=None):
    """One results.jsonl record; `correct` is the per-output list."""
    record = {
        "task_id": task_id, "method": "?",
        "attempts": [] if error else [[[[0]], [[1]]] for _ in correct],
        "correct": correct, "score": sum(correct) / len(correct) if correct else 0.0,
        "flops": flops, "seconds": 2.0, "peak_memory_mb": 1000.0, "error": error,
        "n_demos": n_demos, "n_tokens": n_tokens, "budget_exhausted": False, "extra": {},
    }
    if cell_acc is not None:
        record["metrics"] = {"shape_ok": [True] * len(correct), "cell_acc": [cell_acc] * len(correct),
                             "nll": [None] * len(correct), "token_acc": [None] * len(correct)}
    return record


def make_run(root, name, method, records, model="default", dataset="arc1-eval", seed=0,
             budget_flops=1e15, task_ids=None, one_off=None, versions=None):
    """Write manifest.json and results.jsonl for a run directory and return its path."""
    path = root / name
    path.mkdir(parents=True)
    manifest = {
        "method": method, "config": {"k": 1}, "config_hash": f"h-{method}", "model": model,
        "budget": {"flops": budget_flops, "seconds": None}, "dataset": dataset,
        "task_ids": task_ids if task_ids is not None else [r["task_id"] for r in records],
        "seed": seed, "versions": versions or {"torch": "2.5.0"}, "git_commit": "abc",
        "command": f"tta run --method {method}", "started": "2025-01-01T00:00:00",
        "finished": "2025-01-01T01:00:00",
    }
    if one_off:
        manifest["one_off"] = one_off
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def solving(ids_solved, tasks=TASKS, **kw):
    """Single-output records for `tasks`, solved exactly for `ids_solved`."""
    return [task(t, [t in ids_solved], **kw) for t in tasks]


@pytest.fixture
def three_runs(tmp_path):
    """icl solves t00-t03; ttt solves those plus t04-t11 (8 more, loses none);
    less solves t00-t02 and t04-t06 (3 won, 1 lost vs icl)."""
    icl = make_run(tmp_path, "icl", "icl", solving(TASKS[:4], cell_acc=0.5))
    ttt = make_run(tmp_path, "ttt", "ttt_lora", solving(TASKS[:12], cell_acc=0.75),
                   one_off={"flops": 2e13, "seconds": 40.0, "what": "nothing"})
    less = make_run(tmp_path, "less", "less", solving(TASKS[:3] + TASKS[4:7]))
    return [icl, ttt, less]


# --------------------------------------------------------------------------
# stats
# --------------------------------------------------------------------------

def test_wilson_matches_statsmodels():
    assert stats.wilson_interval(4, 20) == pytest.approx(proportion_confint(4, 20, method="wilson"))
    lo, hi = stats.wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.27753279, abs=1e-6)
    assert all(np.isnan(stats.wilson_interval(0, 0)))


def test_bootstrap_mean_ci():
    est = stats.bootstrap_mean_ci([1.0] * 8 + [0.0] * 12)
    assert est.value == pytest.approx(0.4)
    assert 0.15 < est.lo < 0.4 < est.hi < 0.65
    assert est == stats.bootstrap_mean_ci([1.0] * 8 + [0.0] * 12)  # seeded: reproducible
    one = stats.bootstrap_mean_ci([0.3, float("nan")])  # NaN dropped, one value left
    assert one.value == pytest.approx(0.3) and np.isnan(one.lo) and np.isnan(one.hi)


def test_mcnemar_and_holm():
    a = [True] * 4 + [False] * 16
    b = [True] * 12 + [False] * 8
    b_only, a_only, p = stats.mcnemar_exact(a, b)
    assert (b_only, a_only) == (8, 0)
    assert p == pytest.approx(scipy.stats.binomtest(0, 8, 0.5).pvalue)  # 2 * 0.5**8
    assert stats.mcnemar_exact(a, a).p == 1.0
    # Holm by hand: sorted p's times (m, m-1, ...), cumulative max, capped at 1.
    assert stats.holm([0.625, 0.0078125]) == pytest.approx([0.625, 0.015625])
    assert stats.holm([0.01, float("nan"), 0.04]) == pytest.approx([0.02, np.nan, 0.04], nan_ok=True)


# --------------------------------------------------------------------------
# Loading and tables
# --------------------------------------------------------------------------

def test_load_runs_columns_and_errors(tmp_path, three_runs):
    df = load_runs(three_runs)
    assert len(df) == 60
    assert list(df["run"].unique()) == ["icl", "ttt", "less"]
    assert df.loc[df["run"] == "icl", "cell_acc"].tolist() == [0.5] * 20
    assert df.loc[df["run"] == "less", "cell_acc"].isna().all()  # not recorded: NaN, not 0
    assert df["budget_flops"].eq(1e15).all()

    with pytest.raises(ReportError, match=r"nowhere.*not a run directory"):
        load_runs([tmp_path / "nowhere"])
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "manifest.json").write_text("{}")
    with pytest.raises(ReportError, match=r"half.*missing results.jsonl"):
        load_runs([tmp_path / "half"])


def test_accuracy_table_known_answers(three_runs):
    acc = accuracy_table(load_runs(three_runs))
    assert acc.loc["icl", "kaggle"] == pytest.approx(0.2)
    assert acc.loc["ttt", "kaggle"] == pytest.approx(0.6)
    assert acc.loc["less", "all_outputs"] == pytest.approx(0.3)
    assert (acc.loc["icl", "kaggle_lo"], acc.loc["icl", "kaggle_hi"]) == pytest.approx(
        proportion_confint(4, 20, method="wilson"))
    assert acc.loc["ttt", "task_mean"] == pytest.approx(0.6)
    assert acc.loc["ttt", "task_mean_lo"] < 0.6 < acc.loc["ttt", "task_mean_hi"]
    assert acc.loc["ttt", "cell_acc"] == pytest.approx(0.75)
    assert acc.loc["ttt", "cell_acc_n"] == 20 and acc.loc["less", "cell_acc_n"] == 0
    assert acc.loc["ttt", "one_off_flops_per_task"] == pytest.approx(1e12)  # 2e13 / 20
    assert np.isnan(acc.loc["icl", "one_off_flops_per_task"])
    assert acc.loc["icl", "flops_mean"] == pytest.approx(1e12)


def test_paired_table_known_answers(three_runs):
    paired = paired_table(load_runs(three_runs), baseline="icl")
    assert list(paired.index) == ["ttt", "less"]
    ttt, less = paired.loc["ttt"], paired.loc["less"]
    assert (ttt["won"], ttt["lost"], ttt["tied"], ttt["n_paired"]) == (8, 0, 12, 20)
    assert ttt["score_diff"] == pytest.approx(0.4)
    expected_ci = stats.paired_bootstrap_diff([1.0] * 8 + [0.0] * 12, [0.0] * 20)
    assert (ttt["score_diff_lo"], ttt["score_diff_hi"]) == pytest.approx((expected_ci.lo, expected_ci.hi))
    assert ttt["score_diff_lo"] > 0
    assert ttt["mcnemar_p"] == pytest.approx(scipy.stats.binomtest(0, 8, 0.5).pvalue)
    assert (less["won"], less["lost"]) == (3, 1)
    assert less["mcnemar_p"] == pytest.approx(scipy.stats.binomtest(1, 4, 0.5).pvalue)  # 0.625
    # Holm with m=2 by hand: the smaller p doubled, the larger max(own, previous).
    assert ttt["holm_p"] == pytest.approx(2 * 0.0078125)
    assert less["holm_p"] == pytest.approx(0.625)
    assert ttt["cell_acc_diff"] == pytest.approx(0.25) and ttt["cell_acc_n"] == 20
    assert less["cell_acc_n"] == 0 and np.isnan(less["cell_acc_diff"])

    # Absent baseline method: the first run is the baseline.
    assert paired_table(load_runs(three_runs), baseline="sampling")["baseline"].tolist() == ["icl", "icl"]


def test_per_task_table_sorted_by_solvers(three_runs):
    table = per_task_table(load_runs(three_runs))
    assert list(table.columns) == ["icl", "ttt", "less", "solved_by"]
    assert table["solved_by"].tolist() == sorted(table["solved_by"], reverse=True)
    assert table.loc["t00", "solved_by"] == 3 and table.loc["t03", "solved_by"] == 2
    assert table.loc["t19", "solved_by"] == 0 and table.index[0] == "t00"


def test_multi_output_aggregations_differ(tmp_path):
    records = [task("a", [True, True]), task("b", [True, False]),
               task("c", [False, False]), task("d", [True])]
    acc = accuracy_table(load_runs([make_run(tmp_path, "r", "icl", records)])).loc["r"]
    assert (acc["n_outputs"], acc["n_solved_outputs"]) == (7, 4)
    assert acc["kaggle"] == pytest.approx(4 / 7)  # outputs
    assert acc["task_mean"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)  # arc-agi-benchmarking
    assert acc["all_outputs"] == pytest.approx(2 / 4)  # tasks fully solved


def test_failed_and_missing_tasks_count_as_wrong(tmp_path):
    good = make_run(tmp_path, "good", "icl", [task("a", [True, True]), task("b", [True])],
                    task_ids=["a", "b", "c"])  # "c" never finished
    crashed = task("a", [], error="CUDA out of memory")
    bad = make_run(tmp_path, "bad", "ttt", [crashed, task("b", [True]), task("c", [True])])
    other = make_run(tmp_path, "other", "less", [task("a", [True, False]), task("b", [True]),
                                                 task("c", [False])])
    df = load_runs([good, bad, other])
    # The crashed task's output count (2) comes from the other runs of task a.
    assert df.set_index(["run", "task_id"]).loc[("bad", "a"), "n_outputs"] == 2
    acc = accuracy_table(df)
    assert acc.loc["bad", "kaggle"] == pytest.approx(2 / 4)
    assert acc.loc["bad", "n_failed"] == 1
    assert acc.loc["good", "kaggle"] == pytest.approx(3 / 4)  # c missing -> 0 of 1
    assert acc.loc["good", "all_outputs"] == pytest.approx(2 / 3)
    with pytest.raises(ReportError, match=r"good has no result for 1 of its 3 tasks \(c\)"):
        check_comparable(df)


def test_breakdowns_and_seeds(tmp_path):
    small = [task(f"s{i}", [i < 2], n_tokens=800, n_demos=2) for i in range(4)]
    large = [task(f"l{i}", [i < 1], n_tokens=3000, n_demos=4) for i in range(2)]
    a = make_run(tmp_path, "a0", "ttt", small + large, seed=0)
    b = make_run(tmp_path, "a1", "ttt", [task(r["task_id"], [True], n_tokens=r["n_tokens"],
                                              n_demos=r["n_demos"]) for r in small + large], seed=1)
    df = load_runs([a, b])
    size = accuracy_by_size(df).set_index(["run", "group"])
    assert size.loc[("a0", "0-1024"), ["n_tasks", "n_solved"]].tolist() == [4, 2]
    assert size.loc[("a0", "2049-4096"), "acc"] == pytest.approx(0.5)
    assert (size.loc[("a0", "0-1024"), "lo"], size.loc[("a0", "0-1024"), "hi"]) == pytest.approx(
        proportion_confint(2, 4, method="wilson"))
    demos = accuracy_by_demos(df).set_index(["run", "group"])
    assert demos.loc[("a1", "4"), "acc"] == 1.0
    seeds = seed_table(df).iloc[0]
    assert seeds["n_seeds"] == 2
    assert seeds["kaggle_mean"] == pytest.approx((0.5 + 1.0) / 2)
    assert seeds["kaggle_sd"] == pytest.approx(np.std([0.5, 1.0], ddof=1))


# --------------------------------------------------------------------------
# Comparability
# --------------------------------------------------------------------------

def test_mismatched_runs_refused_then_reported(tmp_path):
    a = make_run(tmp_path / "runs", "a", "icl", solving(TASKS[:2]))
    b = make_run(tmp_path / "runs", "b", "ttt", solving(TASKS[:5]), model="x")
    c = make_run(tmp_path / "runs", "c", "less", solving(TASKS[:2], tasks=TASKS[:18]))

    with pytest.raises(ReportError, match=rf"runs differ in model: {a} uses default, {b} uses x"):
        check_comparable(load_runs([a, b]))
    with pytest.raises(ReportError, match=rf"task set: {c} lacks 2 of the 20 tasks \(t18, t19\)"):
        check_comparable(load_runs([a, c]))
    assert check_comparable(load_runs([a])) == []

    diffs = check_comparable(load_runs([a, b, c]), allow_mismatch=True)
    assert len(diffs) == 2 and "model" in diffs[0] and "task set" in diffs[1]

    with pytest.raises(ReportError, match="model"):
        write_report([a, b], tmp_path / "r.md")
    out = write_report([a, b, c], tmp_path / "r.md", allow_mismatch=True)
    text = out.read_text()
    assert "## Differences between runs" in text and diffs[0] in text
    # Paired on the 18 common tasks only.
    assert paired_table(load_runs([a, c])).loc["c", "n_paired"] == 18


def test_different_budget_refused(tmp_path):
    a = make_run(tmp_path, "a", "icl", solving(TASKS[:2]))
    b = make_run(tmp_path, "b", "ttt", solving(TASKS[:2]), budget_flops=1e16)
    with pytest.raises(ReportError, match=r"runs differ in budget: .*1e\+15 FLOPs.*1e\+16 FLOPs"):
        check_comparable(load_runs([a, b]))


# --------------------------------------------------------------------------
# Markdown output
# --------------------------------------------------------------------------

def test_write_report_files_and_contents(tmp_path, three_runs):
    records = solving(TASKS[:4])
    records[7] = task("t07", [False], error="CUDA out of memory | at step 3")
    failed = make_run(tmp_path, "icl_s1", "icl", records, seed=1)
    out = write_report(three_runs + [failed], tmp_path / "reports" / "cmp.md",
                       command="tta compare icl ttt less icl_s1")
    text = out.read_text()
    files = tmp_path / "reports" / "cmp_files"
    assert (files / "accuracy.png").stat().st_size > 1000
    assert (files / "accuracy_vs_flops.png").stat().st_size > 1000
    assert "(cmp_files/accuracy.png)" in text and "(cmp_files/accuracy_vs_flops.png)" in text
    assert "`tta compare icl ttt less icl_s1`" in text
    assert "Dataset: arc1-eval" in text and "torch 2.5.0" in text
    assert "Wilson" in text and "bootstrap" in text
    # Every accuracy with n and interval: icl 4/20 with its Wilson bounds.
    lo, hi = proportion_confint(4, 20, method="wilson")
    assert f"4/20 = 20.0% [{100 * lo:.1f}, {100 * hi:.1f}]" in text
    assert "12/20 = 60.0%" in text
    # Paired row for ttt: +40 pp, 8 won, 0 lost.
    assert "| ttt | ttt_lora | icl | 20 | +40.0 pp [" in text
    # The failed task is listed with its error (pipe escaped) and counted as wrong.
    assert "| icl_s1 | t07 | CUDA out of memory \\| at step 3 |" in text
    assert "0 (failed)" in text
    assert "## Spread across seeds" in text  # icl with seeds 0 and 1


def test_write_run_report(tmp_path):
    records = [task("a", [True, True]), task("b", [True, False]), task("c", [], error="boom")]
    path = make_run(tmp_path, "r", "icl", records[:2] + [dict(records[2], correct=[False])])
    text = write_run_report(path, out=tmp_path / "r.md")
    assert (tmp_path / "r.md").read_text() == text
    assert "Kaggle (solved outputs / outputs): 3/5 = 60.0%" in text
    assert "All outputs solved (tasks): 1/3 = 33.3%" in text
    assert "(n=3 tasks)" in text and "| r | c | boom |" in text


def test_inconsistent_score_rejected(tmp_path):
    record = dict(task("a", [True, False]), score=1.0)
    path = make_run(tmp_path, "r", "icl", [record])
    with pytest.raises(ReportError, match=r"results.jsonl:1: score 1.0 disagrees"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            load_runs([path])


def test_mean_task_score_interval_is_never_zero_width_when_nothing_is_solved(tmp_path):
    df = load_runs([make_run(tmp_path, "none", "icl", solving([]))])
    row = accuracy_table(df).iloc[0]
    lo, hi = proportion_confint(0, 20, method="wilson")
    assert row["task_mean"] == 0 and row["task_mean_lo"] == pytest.approx(lo) and row["task_mean_hi"] == pytest.approx(hi)
    assert row["task_mean_hi"] > 0.1
