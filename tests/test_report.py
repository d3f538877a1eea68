"""Tests for tta.reporting.stats and tta.reporting.report on hand-built run directories with known answers."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from tta.reporting import report
from tta.reporting import stats
from tta.reporting.report import (
    ReportError, accuracy_by_demos, accuracy_by_size, accuracy_table, check_comparable,
    load_runs, paired_table, per_task_table, seed_table, write_report, write_run_report,
)

TASKS = [f"t{i:02d}" for i in range(20)]

# Wilson score intervals computed by hand with z = 1.959964 (97.5% normal quantile):
# centre = (p + z^2/2n) / (1 + z^2/n), half-width = z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n).
# 4/20: centre 0.248338, half 0.167680; 2/4: centre 0.5, half 0.349961; 0/20: [0, (z^2/n)/(1 + z^2/n)].
WILSON_4_20 = (0.080658, 0.416017)
WILSON_2_4 = (0.150039, 0.849961)
WILSON_0_20 = (0.0, 0.161125)
Z_SUM = 1.959964 + 0.841621  # z_{0.975} + z_{0.80}: two-sided alpha 0.05, power 80%


# --------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------

def task(task_id, correct, error=None, flops=1e12, n_tokens=500, n_demos=3, cell_acc=None, **extra):
    """One results.jsonl record; `correct` is the per-output list; `extra` adds keys
    (e.g. stopped_by_budget / out_of_work, which older records lack)."""
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
    record.update(extra)
    return record


def make_run(root, name, method, records, model="default", dataset="arc1-eval", seed=0,
             budget_flops=1e15, task_ids=None, one_off=None, versions=None):
    """Write manifest.json and results.jsonl for a run directory and return its path."""
    path = root / name
    path.mkdir(parents=True)
    manifest = {
        "method": method, "config": {"k": 1}, "config_hash": f"h-{method}", "model": model,
        "budget": {"flops": budget_flops, "seconds": None} if budget_flops else None, "dataset": dataset,
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

def test_wilson_against_hand_computation():
    assert stats.wilson_interval(4, 20) == pytest.approx(WILSON_4_20, abs=1e-6)
    assert stats.wilson_interval(2, 4) == pytest.approx(WILSON_2_4, abs=1e-6)
    # k = 0: the lower end is 0 and the upper end is (z^2/n) / (1 + z^2/n) = 0.384146 / 1.384146.
    lo, hi = stats.wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.277533, abs=1e-6)
    assert all(np.isnan(stats.wilson_interval(0, 0)))


def test_bootstrap_mean_ci_matches_the_exact_bootstrap_distribution():
    # Resampling 20 values of which 8 are 1 gives means distributed as Binomial(20, 0.4) / 20,
    # whose 2.5% and 97.5% quantiles are 4/20 and 12/20 (P(X <= 3) = 0.016, P(X <= 4) = 0.051,
    # P(X <= 11) = 0.943, P(X <= 12) = 0.979); 2000 resamples land on them.
    est = stats.bootstrap_mean_ci([1.0] * 8 + [0.0] * 12)
    assert est.value == pytest.approx(0.4)
    assert (est.lo, est.hi) == pytest.approx((0.2, 0.6), abs=0.025)
    one = stats.bootstrap_mean_ci([0.3, float("nan")])  # NaN dropped, one value left
    assert one.value == pytest.approx(0.3) and np.isnan(one.lo) and np.isnan(one.hi)


def test_mcnemar_and_holm():
    a = [True] * 4 + [False] * 16
    b = [True] * 12 + [False] * 8
    b_only, a_only, p = stats.mcnemar_exact(a, b)
    assert (b_only, a_only) == (8, 0)
    assert p == pytest.approx(2 * 0.5 ** 8)  # two-sided binomial: 0 of 8 discordant, both tails
    # 1 of 4 discordant one way: 2 * P(X <= 1 | n=4, 1/2) = 2 * (1 + 4) / 16.
    assert stats.mcnemar_exact([True, False, False, False], [False, True, True, True]).p == pytest.approx(0.625)
    assert stats.mcnemar_exact(a, a).p == 1.0
    # Holm by hand: sorted p's times (m, m-1, ...), cumulative max, capped at 1.
    assert stats.holm([0.625, 0.0078125]) == pytest.approx([0.625, 0.015625])
    assert stats.holm([0.01, float("nan"), 0.04]) == pytest.approx([0.02, np.nan, 0.04], nan_ok=True)


def test_min_detectable_difference_by_hand():
    # 40 tasks, 8 discordant: p_d = 0.2, (1.959964 + 0.841621) * sqrt(0.2 / 40) = 0.198102.
    assert stats.min_detectable_difference(40, 8) == pytest.approx(0.198102, abs=1e-5)
    assert stats.min_detectable_difference(40, 8) == pytest.approx(Z_SUM * math.sqrt(0.2 / 40), abs=1e-6)
    # No discordant task: the floor is the value at one, 2.801585 * sqrt(1/40 / 40) = 2.801585 / 40.
    assert stats.min_detectable_difference(40, 0) == pytest.approx(0.070040, abs=1e-5)
    assert stats.min_detectable_difference(40, 0) == stats.min_detectable_difference(40, 1)
    # More discordance or fewer tasks: a larger difference is needed.
    assert stats.min_detectable_difference(40, 16) > stats.min_detectable_difference(40, 8)
    assert stats.min_detectable_difference(20, 4) > stats.min_detectable_difference(40, 8)
    assert math.isnan(stats.min_detectable_difference(0, 0))
    with pytest.raises(ValueError):
        stats.min_detectable_difference(10, 11)


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

    with pytest.raises(ReportError, match=r"nowhere: not a run directory \(no such directory\)"):
        load_runs([tmp_path / "nowhere"])
    (tmp_path / "results.jsonl").write_text("")   # a run's file given for its directory
    with pytest.raises(ReportError, match=r"results.jsonl: not a run directory \(a file\)"):
        load_runs([tmp_path / "results.jsonl"])
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "manifest.json").write_text("{}")
    with pytest.raises(ReportError, match=r"half.*missing results.jsonl"):
        load_runs([tmp_path / "half"])


def test_accuracy_table_known_answers(three_runs):
    acc = accuracy_table(load_runs(three_runs))
    assert acc.loc["icl", "kaggle"] == pytest.approx(0.2)
    assert acc.loc["ttt", "kaggle"] == pytest.approx(0.6)
    assert acc.loc["less", "all_outputs"] == pytest.approx(0.3)
    assert (acc.loc["icl", "kaggle_lo"], acc.loc["icl", "kaggle_hi"]) == pytest.approx(WILSON_4_20, abs=1e-6)
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
    # The differences are 8 ones and 12 zeros: the bootstrap means follow Binomial(20, 0.4) / 20,
    # whose 2.5% / 97.5% quantiles are 0.2 and 0.6.
    assert (ttt["score_diff_lo"], ttt["score_diff_hi"]) == pytest.approx((0.2, 0.6), abs=0.025)
    assert ttt["mcnemar_p"] == pytest.approx(2 * 0.5 ** 8)
    assert (less["won"], less["lost"]) == (3, 1)
    assert less["mcnemar_p"] == pytest.approx(2 * (1 + 4) / 2 ** 4)  # 0.625
    # Holm with m=2 by hand: the smaller p doubled, the larger max(own, previous).
    assert ttt["holm_p"] == pytest.approx(2 * 0.0078125)
    assert less["holm_p"] == pytest.approx(0.625)
    assert ttt["cell_acc_diff"] == pytest.approx(0.25) and ttt["cell_acc_n"] == 20
    assert less["cell_acc_n"] == 0 and np.isnan(less["cell_acc_diff"])
    # Smallest detectable difference: 8 of 20 and 4 of 20 tasks discordant.
    assert ttt["mdd"] == pytest.approx(Z_SUM * math.sqrt(0.4 / 20), abs=1e-5)  # 0.396205
    assert less["mdd"] == pytest.approx(Z_SUM * math.sqrt(0.2 / 20), abs=1e-5)  # 0.280159

    # Absent baseline method: the first run is the baseline.
    assert paired_table(load_runs(three_runs), baseline="sampling")["baseline"].tolist() == ["icl", "icl"]


def test_a_baseline_the_user_names_must_name_a_run_or_a_method(tmp_path, three_runs):
    """Fails if `tta compare --baseline sampling` (a typo, or a method none of the runs ran)
    quietly compares with the first run, as it did; the default falls back as before."""
    with pytest.raises(ReportError, match=r"--baseline sampling: no run and no method of these runs has that name "
                                          r"\(methods: icl, less, ttt_lora"):
        write_report(three_runs, tmp_path / "typo.md", baseline="sampling", baseline_given=True)
    assert not (tmp_path / "typo.md").exists()
    assert "baseline: method `icl`" in write_report(three_runs, tmp_path / "r.md", baseline="icl",
                                                    baseline_given=True).read_text()


def test_a_run_as_baseline_compares_two_settings_of_one_method(tmp_path):
    """Fails if `--baseline RUN` is read as a method name (then two runs of one method have
    nothing to compare), or if the paired NLL difference is missing or has the wrong sign."""
    def with_nll(records, nll):
        for r in records:
            r["metrics"]["nll"] = [nll(r["task_id"])]
        return records
    small = make_run(tmp_path, "ttt-2e12", "ttt_full", with_nll(solving(TASKS[:2], cell_acc=0.5), lambda t: 0.4))
    large = make_run(tmp_path, "ttt-4e12", "ttt_full", with_nll(solving(TASKS[:5], cell_acc=0.6),
                                                                 lambda t: 0.3 if t < "t10" else 0.2))
    icl = make_run(tmp_path, "icl", "icl", solving(TASKS[:1], cell_acc=0.4))
    df = load_runs([small, large, icl])
    by_method = paired_table(df, baseline="ttt_full")   # a method: the other ttt_full run is no comparison
    assert list(by_method.index) == ["icl"]
    # A run directory named like a method: the name means the method (a second icl run is then
    # a baseline run, not a comparison), the path means the run (the other icl run is compared).
    icl_seed1 = make_run(tmp_path, "icl-seed1", "icl", solving(TASKS[:3], cell_acc=0.4), seed=1)
    two_icl = load_runs([small, large, icl, icl_seed1])
    assert list(paired_table(two_icl, baseline="icl").index) == ["ttt-2e12", "ttt-4e12"]
    by_path = paired_table(two_icl, baseline=str(icl))
    assert list(by_path.index) == ["ttt-2e12", "ttt-4e12", "icl-seed1"] and set(by_path["baseline"]) == {"icl"}
    for baseline in ("ttt-2e12", str(small)):   # the run's name or its directory
        paired = paired_table(df, baseline=baseline)
        assert list(paired.index) == ["ttt-4e12", "icl"] and set(paired["baseline"]) == {"ttt-2e12"}
        large_row = paired.loc["ttt-4e12"]
        assert (large_row["won"], large_row["lost"], large_row["n_paired"]) == (3, 0, 20)
        assert large_row["nll_diff"] == pytest.approx(-0.15) and large_row["nll_n"] == 20
        assert large_row["nll_diff_lo"] < -0.15 < large_row["nll_diff_hi"] < 0
        assert large_row["cell_acc_diff"] == pytest.approx(0.1)
        assert paired.loc["icl", "nll_n"] == 0   # icl recorded no NLL here
    # Two directories of one name (the same setting with two models): the bare name is ambiguous,
    # so it is refused with the paths to choose from, never read as some method's name.
    other_model = make_run(tmp_path / "other", "ttt-2e12", "ttt_full", solving(TASKS[:3]), model="mine")
    same_names = load_runs([small, other_model])
    with pytest.raises(ReportError, match=r"--baseline ttt-2e12: 2 runs have that name .*give the path"):
        paired_table(same_names, baseline="ttt-2e12")
    assert set(paired_table(same_names, baseline=str(other_model))["baseline"]) == {str(other_model)}
    text = write_report([small, large, icl], tmp_path / "r.md", baseline=str(small)).read_text()
    assert "baseline: run `ttt-2e12`" in text and "Δ true-answer NLL" in text and "-0.150 [" in text
    assert "No run differs significantly from the baseline `ttt-2e12`" in text


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
        WILSON_2_4, abs=1e-6)
    demos = accuracy_by_demos(df).set_index(["run", "group"])
    assert demos.loc[("a1", "4"), "acc"] == 1.0
    seeds = seed_table(df).iloc[0]
    assert seeds["n_seeds"] == 2
    assert seeds["kaggle_mean"] == pytest.approx((0.5 + 1.0) / 2)
    assert seeds["kaggle_sd"] == pytest.approx(0.5 / math.sqrt(2))  # |1.0 - 0.5| / sqrt(2)
    assert (seeds["kaggle_min"], seeds["kaggle_max"]) == (0.5, 1.0)


# --------------------------------------------------------------------------
# Comparability
# --------------------------------------------------------------------------

def test_a_run_without_a_model_compares_with_runs_of_any_model_and_shows_none(tmp_path):
    """copy_input and the floors load no model, yet their manifests name the run's --model: the
    report said "Model: default@..." for two runs that used none.  Fails if such a run shows a
    model, makes runs of different models look comparable, or is refused beside a run of any
    model."""
    floor = make_run(tmp_path / "runs", "floor", "copy_input", solving(TASKS[:1]), model="default")
    manifest = json.loads((floor / "manifest.json").read_text())
    (floor / "manifest.json").write_text(json.dumps({**manifest, "uses_model": False}))
    x = make_run(tmp_path / "runs", "x", "icl", solving(TASKS[:2]), model="x")
    y = make_run(tmp_path / "runs", "y", "ttt", solving(TASKS[:2]), model="y")
    assert check_comparable(load_runs([floor, x])) == []
    with pytest.raises(ReportError, match=rf"runs differ in model: {x} uses x, {y} uses y \(allow"):
        check_comparable(load_runs([floor, x, y]))
    text = write_report([floor, x], tmp_path / "r.md").read_text()
    assert "- Model: none, x\n" in text
    from tta.run.runner import RunSpec, run
    out = run(RunSpec(method="copy_input", dataset="gen-eval", limit=1, out=tmp_path / "real"), progress=False)
    assert load_runs([out])["model"].tolist() == ["none"]


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
    assert "4/20 = 20.0% [8.1, 41.6]" in text  # WILSON_4_20 in percent
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
    lo, hi = WILSON_0_20
    assert row["task_mean"] == 0 and row["task_mean_lo"] == pytest.approx(lo, abs=1e-6)
    assert row["task_mean_hi"] == pytest.approx(hi, abs=1e-6)
    assert row["task_mean_hi"] > 0.1


# --------------------------------------------------------------------------
# Spend, stopping reasons, significance, seeds
# --------------------------------------------------------------------------

def _row(text: str, first_cell: str) -> list[str]:
    """The cells of the markdown table row that starts with `first_cell`, in the first table
    after '## Cost per task' when that heading exists."""
    section = text.split("## Cost per task", 1)[-1]
    for line in section.splitlines():
        if line.startswith(f"| {first_cell} |"):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no row {first_cell}")


def test_cost_table_shares_stops_and_reasons(tmp_path):
    # Cap 1e12; per-task spends 2e11 .. 1e12; 3 tasks stopped by the cap; two reasons, one commoner.
    spends = [1e12, 1e12, 1e12, 5e11, 2e11, 5e11]
    reasons = [None, None, None, "every distinct view used", "max_samples reached",
               "every distinct view used"]
    new = [task(f"n{i}", [False], flops=f, stopped_by_budget=i < 3, out_of_work=r)
           for i, (f, r) in enumerate(zip(spends, reasons))]
    capped = make_run(tmp_path, "new", "sampling", new, budget_flops=1e12)
    old = make_run(tmp_path, "old", "sampling", [task(f"n{i}", [False]) for i in range(6)],
                   budget_flops=None)  # old records, no cap: nothing recorded, nothing to divide by
    acc = accuracy_table(load_runs([capped, old]))
    assert acc.loc["new", "cap_share_mean"] == pytest.approx(sum(spends) / 6 / 1e12)  # 0.7
    assert acc.loc["new", "cap_share_min"] == pytest.approx(0.2)
    assert acc.loc["new", "n_stopped_by_budget"] == 3 and acc.loc["new", "n_stop_recorded"] == 6
    assert (acc.loc["new", "out_of_work_top"], acc.loc["new", "out_of_work_top_n"]) == (
        "every distinct view used", 2)
    assert np.isnan(acc.loc["old", "cap_share_mean"]) and acc.loc["old", "n_stop_recorded"] == 0

    text = write_report([capped, old], tmp_path / "r.md", allow_mismatch=True).read_text()
    cells = _row(text, "new")
    assert "70.0% / 20.0%" in cells and "3/6" in cells and "every distinct view used (2/6)" in cells
    cells = _row(text, "old")
    assert "no cap" in cells and cells.count("not recorded") == 3   # stops, reasons, CPU seconds
    run_text = write_run_report(capped)
    assert "| n0 |" in run_text and "max_samples reached" in run_text

    # Under a seconds cap the share is of the seconds (it read "no FLOPs cap").
    timed = make_run(tmp_path, "timed", "sampling", [task(f"n{i}", [False], seconds=s) for i, s in enumerate((30, 15))],
                     budget_flops=None)
    manifest = json.loads((timed / "manifest.json").read_text())
    (timed / "manifest.json").write_text(json.dumps({**manifest, "budget": {"flops": None, "seconds": 30.0}}))
    acc = accuracy_table(load_runs([timed]))
    assert acc.loc["timed", "cap_share_mean"] == pytest.approx(0.75) and acc.loc["timed", "cap_share_min"] == 0.5
    assert "75.0% / 50.0% of its seconds" in _row(write_run_report(timed), "timed")


def test_one_off_cost_amortised_in_tables_and_plot(tmp_path, monkeypatch):
    # Per-task 5e12 plus a 2e13 one-off over 20 tasks = 6e12 per task, against icl's 1e12.
    icl = make_run(tmp_path, "icl", "icl", solving(TASKS[:4]))
    less = make_run(tmp_path, "less", "less", solving(TASKS[:6], flops=5e12),
                    one_off={"flops": 2e13, "seconds": 40.0, "what": "datastore", "charged": False})
    df = load_runs([icl, less])
    assert df.loc[df["run"] == "less", "total_flops"].tolist() == pytest.approx([6e12] * 20)
    acc = accuracy_table(df)
    assert acc.loc["less", "total_flops_mean"] == pytest.approx(6e12)
    assert acc.loc["less", "flops_mean"] == pytest.approx(5e12)  # the per-task part stays apart
    assert acc.loc["less", "cap_share_mean"] == pytest.approx(6e12 / 1e15)

    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, out: figures.append(fig) or Path(out))
    report.plot_accuracy_vs_flops(acc, tmp_path / "p.png")
    xs = {c.get_label(): list(c.lines[0].get_xdata()) for c in figures[0].axes[0].containers}
    assert xs == {"icl": pytest.approx([1e12]), "less": pytest.approx([6e12])}

    text = write_report([icl, less], tmp_path / "r.md").read_text()
    assert "6e+12 = 5e+12 + 1e+12" in _row(text, "less")
    assert "1e+12 = 1e+12 + 0" in _row(text, "icl")


def test_unequal_spend_is_stated_right_after_the_title(tmp_path):
    icl = make_run(tmp_path, "icl", "icl", solving(TASKS[:4], flops=1e12))
    ttt = make_run(tmp_path, "ttt", "ttt_lora", solving(TASKS[:4], flops=2e12),
                   one_off={"flops": 2e13, "seconds": 1.0, "what": "x"})  # 2e12 + 1e12 = 3e12
    floor = make_run(tmp_path, "floor", "copy_input", solving([], flops=0.0))
    lines = write_report([icl, ttt, floor], tmp_path / "r.md").read_text().splitlines()
    head = "\n".join(lines[:5])  # title, the verdict sentence, then the spend warning
    assert lines[0] == "# Test-time adaptation comparison"
    assert "Unequal spend" in head and "differ by 3x" in head
    assert "icl 1e+12 FLOPs, ttt 3e+12 FLOPs" in head
    assert "Spent nothing: floor." in head  # the floor neither sets the ratio nor goes unmentioned

    # Within 2x (the floor ignored): no warning anywhere.
    near = make_run(tmp_path, "near", "ttt_lora", solving(TASKS[:4], flops=1.9e12))
    text = write_report([icl, near, floor], tmp_path / "r2.md").read_text()
    assert "Unequal spend" not in text


def test_zero_width_paired_interval_says_no_discordant_tasks(tmp_path):
    icl = make_run(tmp_path, "icl", "icl", solving(TASKS[:4]))
    same = make_run(tmp_path, "same", "less", solving(TASKS[:4]))
    text = write_report([icl, same], tmp_path / "r.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| same | less | icl |"))
    assert "no discordant tasks" in row and "[+0.0, +0.0]" not in row
    # Smallest detectable difference at the floor of one discordant task of 20.
    assert f"{100 * Z_SUM * math.sqrt(1 / 20 / 20):.1f} pp (floor: 1 discordant task)" in row  # 14.0


def test_opening_sentence_names_what_beats_the_baseline(tmp_path, three_runs):
    # ttt: 8 won, 0 lost, Holm p = 2 * 2 * 0.5**8 = 0.015625; less: 3 won, 1 lost, Holm p 0.625.
    lines = write_report(three_runs, tmp_path / "r.md").read_text().splitlines()
    assert lines[1] == ""
    assert lines[2] == ("After Holm correction (n = 20 tasks), better than the baseline `icl` "
                        "(p < 0.05): `ttt_lora` (run ttt: +40.0 pp, Holm p = 0.0156).")

    icl, _, less = three_runs
    lines = write_report([icl, less], tmp_path / "r2.md").read_text().splitlines()
    assert lines[2] == ("No method differs significantly from the baseline `icl` after Holm "
                        "correction (n = 20 tasks).")

    # Significantly worse is not "no difference".
    worse = make_run(tmp_path / "w", "bad", "sampling", solving([]))
    strong = make_run(tmp_path / "w", "icl", "icl", solving(TASKS[:12]))
    line = write_report([strong, worse], tmp_path / "r3.md").read_text().splitlines()[2]
    assert line.startswith("No method beats the baseline `icl`") and "Significantly worse: `sampling`" in line


def test_seed_spread_in_report(tmp_path):
    runs = [make_run(tmp_path, f"icl{s}", "icl", solving(TASKS[:k]), seed=s)
            for s, k in ((0, 4), (1, 8), (2, 6))]
    for run, seed in zip(runs, (0, 1, 2)):   # as tta run writes it: the config hash covers the seed too
        manifest = json.loads((run / "manifest.json").read_text())
        manifest["config_hash"] = f"h-icl-seed{seed}"
        (run / "manifest.json").write_text(json.dumps(manifest))
    text = write_report(runs, tmp_path / "r.md").read_text()
    section = text.split("## Spread across seeds", 1)[1].split("##", 1)[0]
    # Accuracies 0.2, 0.4, 0.3: mean 0.3, sd sqrt((0.01 + 0.01 + 0) / 2) = 0.1.
    from tta.reporting.report import settings_hash
    assert (f"| icl | {settings_hash({'k': 1})} | 1e+15 FLOPs | 3 | 0, 1, 2 | "
            "mean 30.0%, sd 10.0 pp, min 20.0%, max 40.0% |") in section
    one = write_report(runs[:1], tmp_path / "one.md").read_text()
    assert "run with one seed" in one


def test_default_experiment_runs_three_seeds():
    from tta.experiment import cells, load_plan

    path = Path(__file__).resolve().parents[1] / "experiments" / "default.toml"
    plan = load_plan(path)
    assert plan["seeds"] == [0, 1, 2]
    grid = cells(plan, str(path))
    assert len(grid) == 3 * len(plan["methods"])
    assert {c.seed for c in grid if c.method == "icl"} == {0, 1, 2}
    assert len({c.directory(Path("runs")) for c in grid}) == len(grid)  # one directory per cell


def test_an_experiment_runs_every_method_at_the_cheapest_budget_first(tmp_path):
    """So a grid stopped part way holds whole comparisons at the small budgets."""
    from tta.experiment import cells, load_plan

    path = tmp_path / "grid.toml"
    path.write_text('budgets = [1e12, "none", 2e11]\nseeds = [0, 1]\n[methods.icl]\n[methods.copy_input]\n')
    order = [(c.budget.flops, c.seed, c.method) for c in cells(load_plan(path), str(path))]
    names = {c.directory(Path("runs")).name for c in cells(load_plan(path), str(path))}
    assert {"icl-f2e11-seed0", "icl-f1e12-seed1", "copy_input-uncapped-seed0"} <= names
    path.write_text('budgets = [6e12, 6.4e12]\n[methods.icl]\n')   # distinct budgets, distinct directories
    assert [c.directory(Path("runs")).name for c in cells(load_plan(path), str(path))] == [
        "icl-f6e12-seed0", "icl-f6.4e12-seed0"]
    assert order == [(2e11, 0, "icl"), (2e11, 0, "copy_input"), (2e11, 1, "icl"), (2e11, 1, "copy_input"),
                     (1e12, 0, "icl"), (1e12, 0, "copy_input"), (1e12, 1, "icl"), (1e12, 1, "copy_input"),
                     (None, 0, "icl"), (None, 0, "copy_input"), (None, 1, "icl"), (None, 1, "copy_input")]


def test_the_report_draws_the_tasks_the_methods_disagree_on(tmp_path):
    from conftest import write_task
    data = tmp_path / "data"
    data.mkdir()
    for t in ("a", "b", "c"):
        write_task(data / f"{t}.json", {"train": [{"input": [[1]], "output": [[2]]}],
                                        "test": [{"input": [[1]], "output": [[2]]}]})
    runs = tmp_path / "runs"
    icl = make_run(runs, "icl", "icl", [task(t, [t in "ab"]) for t in "abc"], dataset=str(data))
    ttt = make_run(runs, "ttt", "ttt_lora", [task(t, [t in "bc"]) for t in "abc"], dataset=str(data))
    floor = make_run(runs, "floor", "copy_input", [task(t, [False], flops=0.0) for t in "abc"], dataset=str(data))
    out = write_report([icl, ttt, floor], tmp_path / "rep.md")
    text = out.read_text()
    drawn = sorted(p.name for p in (tmp_path / "rep_files" / "tasks").glob("*.png"))
    assert drawn == ["a.png", "c.png"]   # b: both solve it; the floor, which spends nothing, never counts
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "rep_files/tasks/a.png" in rows["a"] and "rep_files/tasks/c.png" in rows["c"] and ".png" not in rows["b"]


def test_a_budget_sweep_compares_spend_within_each_cap(tmp_path):
    """Runs at different caps spend differently by design: only runs under one cap are compared."""
    small = make_run(tmp_path, "icl-small", "icl", solving(TASKS[:4], flops=1e11), budget_flops=1e11)
    big = make_run(tmp_path, "icl-big", "icl", solving(TASKS[:4], flops=1e12), budget_flops=1e12)
    ttt_big = make_run(tmp_path, "ttt-big", "ttt_lora", solving(TASKS[:4], flops=0.9e12), budget_flops=1e12)
    text = write_report([small, big, ttt_big], tmp_path / "r.md", allow_mismatch=True).read_text()
    assert "Unequal spend" not in text
    starved = make_run(tmp_path, "ttt-small", "ttt_lora", solving(TASKS[:4], flops=1e10), budget_flops=1e11)
    head = "\n".join(write_report([small, big, ttt_big, starved], tmp_path / "r2.md",
                                  allow_mismatch=True).read_text().splitlines()[:5])
    assert "at 1e+11 FLOPs" in head and "differ by 10x" in head and "icl-big" not in head


def test_plots_accept_an_interval_bound_a_rounding_error_past_the_estimate(tmp_path):
    """A Wilson bound can land 1e-17 above an estimate of 0; matplotlib raised on the negative
    error bar and the whole report failed (seen on a 100-task arc1-eval run)."""
    import pandas as pd
    from tta.reporting.report import AGGREGATIONS, plot_accuracy, plot_accuracy_vs_flops
    row = {"method": "icl", "total_flops_mean": 5e11}
    for col, _ in AGGREGATIONS:
        row.update({col: 0.0, f"{col}_lo": 1e-17, f"{col}_hi": 0.04})
    acc = pd.DataFrame([row], index=["icl"])
    assert plot_accuracy(acc, tmp_path / "a.png").exists()
    assert plot_accuracy_vs_flops(acc, tmp_path / "b.png").exists()


def test_wall_time_per_task_adds_up_the_sessions_in_the_manifest(tmp_path):
    """Fails if the cost table's wall time per task ignores a resumed session, counts a session
    stopped before its first result, divides by tasks that never ran, or shows a time for a
    run whose sessions' ends were not recorded."""
    resumed = make_run(tmp_path, "resumed", "icl", solving(TASKS[:2], tasks=TASKS[:10]), task_ids=TASKS[:12])
    manifest = json.loads((resumed / "manifest.json").read_text())
    manifest.update(started="2025-01-01T00:00:00", last_result="2025-01-01T00:10:00", finished=None, resumed=[
        {"started": "2025-01-01T02:00:00", "last_result": None, "tasks": 12},             # stopped: no result
        {"started": "2025-01-01T03:00:00", "last_result": "2025-01-01T03:04:00", "tasks": 12}])
    (resumed / "manifest.json").write_text(json.dumps(manifest))
    old = make_run(tmp_path, "old", "icl", solving(TASKS[:2], tasks=TASKS[:10]))
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["resumed"] = [{"started": "2025-01-01T05:00:00", "tasks": 4}]   # no session end recorded
    (old / "manifest.json").write_text(json.dumps(manifest))
    finished = make_run(tmp_path, "finished", "icl", solving(TASKS[:2], tasks=TASKS[:10]))   # 00:00 to 01:00

    acc = accuracy_table(load_runs([resumed, old, finished]))
    assert acc.loc["resumed", "wall_seconds_per_task"] == pytest.approx((600 + 240) / 10)   # 10 of 12 ran
    assert math.isnan(acc.loc["old", "wall_seconds_per_task"])
    assert acc.loc["finished", "wall_seconds_per_task"] == pytest.approx(3600 / 10)
    rows = {line.split("|")[1].strip(): line for line in report._cost_markdown(acc).splitlines()}
    assert "wall s / task" in rows["run"]
    assert rows["old"].rstrip(" |").split("|")[-2].strip() == "not recorded"
    assert rows["resumed"].rstrip(" |").split("|")[-2].strip() == "84"
