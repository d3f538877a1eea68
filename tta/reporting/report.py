"""Reports on run directories: load, check comparability, tabulate, plot, write.

A run directory holds ``manifest.json`` (what was run) and ``results.jsonl``
(one graded task per line); `tta.reporting.load` turns them into a task-level
DataFrame (:func:`load_runs`) and this module from there into tables, plots and
a markdown report (:func:`write_report` for ``tta compare``,
:func:`write_run_report` for ``tta report``).

Rules the report follows, so its numbers can be trusted:
- runs are compared only on the same tasks, model, dataset and budget, unless
  the user explicitly allows a mismatch, and then the differences are printed;
- a failed task (error set) or a task missing from ``results.jsonl`` counts as
  wrong; it is never dropped from the denominator;
- every accuracy carries its n and a 95% interval, and the report names the
  aggregation (ARC has three in use: solved test outputs, mean task score, and
  tasks with every output solved);
- spend is per-task FLOPs plus the run's one-off cost divided by its number of
  tasks, and a comparison whose runs spent very different amounts says so first;
- only what was measured is stated: no claim of significance beyond the tests
  shown, no extrapolation.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from tta.reporting import stats
from tta.reporting.load import (GRADED_METRICS, RUN_COLUMNS, TOKEN_BIN_EDGES, ReportError, _float,  # noqa: F401
                                NO_MODEL, load_runs)

N_BOOT = 2000
BOOT_SEED = 0



BUDGETS_DIFFER = "runs differ in budget"   # how `check_comparable` opens a budget sweep's line


def check_comparable(df: pd.DataFrame, allow_mismatch: bool = False) -> list[str]:
    """Differences that make the runs in ``df`` unfair to compare.

    Checked: model, dataset, budget (flops and seconds caps), the set of tasks
    and missing results.  Seeds and method configs may differ (that is what is
    being compared).  Raises :class:`ReportError` listing the differences,
    unless ``allow_mismatch``; then returns them so the report can state them.
    """
    runs = _run_meta(df)
    diffs = []
    for field in ("model", "dataset", "budget"):
        values = {r.path: _describe(field, r) for r in runs.itertuples()
                  if not (field == "model" and r.model == NO_MODEL)}   # a method without a model fits any
        if len(set(values.values())) <= 1:
            continue
        if field == "budget":   # a sweep: say which budgets, not every run's
            counts = pd.Series(list(values.values())).value_counts(sort=False)
            budgets = [f"{budget} ({n} {'runs' if n > 1 else 'run'})" for budget, n in counts.items()]
            diffs.append(f"{BUDGETS_DIFFER}: {', '.join(budgets)}")
        else:
            uses = ", ".join(f"{p} uses {v}" for p, v in values.items())
            diffs.append(f"runs differ in {field}: {uses}")
    diffs += _task_set_differences(df)
    diffs += _missing_result_differences(df)
    if diffs and not allow_mismatch:
        raise ReportError("; ".join(diffs) + " (allow_mismatch / --allow-mismatch reports anyway)")
    return diffs


def _describe(field: str, run) -> str:
    if field == "budget":
        return _budget_text(run.budget_flops, run.budget_seconds)
    value = getattr(run, field)
    return "none" if value is None or value != value else str(value)


def _task_set_differences(df: pd.DataFrame) -> list[str]:
    all_tasks = set(df["task_id"])
    out = []
    for run, g in _groups(df):
        lacks = sorted(all_tasks - set(g["task_id"]))
        if lacks:
            out.append(f"runs differ in task set: {g['path'].iloc[0]} lacks {len(lacks)} of "
                       f"the {len(all_tasks)} tasks ({_first_ids(lacks)})")
    return out


def _missing_result_differences(df: pd.DataFrame) -> list[str]:
    out = []
    for run, g in _groups(df):
        missing = sorted(g.loc[g["missing"], "task_id"])
        if missing:
            out.append(f"{g['path'].iloc[0]} has no result for {len(missing)} of its "
                       f"{len(g)} tasks ({_first_ids(missing)}); they count as wrong")
    return out


def _first_ids(ids: list[str], k: int = 5) -> str:
    return ", ".join(ids[:k]) + (", ..." if len(ids) > k else "")


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------

def accuracy_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per-run accuracy, graded metrics and cost (numbers, one row per run).

    The three ARC aggregations in use, each with a 95% interval:
    - ``kaggle``: solved test outputs / all test outputs (Wilson over outputs);
    - ``task_mean``: mean over tasks of the task score, the
      arc-agi-benchmarking number (percentile bootstrap over tasks);
    - ``all_outputs``: fraction of tasks with every output solved (Wilson
      over tasks).
    Graded metrics: ``<m>``, ``<m>_lo``, ``<m>_hi`` (bootstrap) and ``<m>_n``
    (tasks where measured).  Cost: see :func:`_cost_fields`.
    """
    return pd.DataFrame([_accuracy_row(g) for _, g in _groups(df)]).set_index("run")


def _accuracy_row(g: pd.DataFrame) -> dict:
    n_tasks, n_outputs = len(g), int(g["n_outputs"].sum())
    k_outputs, k_tasks = int(g["n_solved"].sum()), int(g["all_solved"].sum())
    row = {"run": g["run"].iloc[0], "method": g["method"].iloc[0], "seed": g["seed"].iloc[0],
           "n_tasks": n_tasks, "n_outputs": n_outputs,
           "n_solved_outputs": k_outputs, "n_solved_tasks": k_tasks}
    row.update(_proportion("kaggle", k_outputs, n_outputs))
    row.update(_task_mean_ci(g["score"]))
    row.update(_proportion("all_outputs", k_tasks, n_tasks))
    for m in GRADED_METRICS:
        row.update(_mean_ci(m, g[m]))
        row[f"{m}_n"] = int(g[m].notna().sum())
    row.update(_cost_fields(g))
    row["n_failed"] = int((g["failed"] & ~g["missing"]).sum())   # tasks that ran and failed
    row["n_not_run"] = int(g["missing"].sum())                    # tasks with no result yet
    return row


def _cost_fields(g: pd.DataFrame) -> dict:
    """Spend of one run: mean/median/max per task of flops (the per-task part),
    seconds and peak_memory_mb; the one-off cost per task; total_flops_mean
    (per-task + one-off part); cap_share_mean / cap_share_min over tasks of
    total_flops / the FLOPs cap (under a seconds cap, seconds / that cap; NaN without a cap); how many tasks the cap
    stopped (n_stopped_by_budget, of n_stop_recorded that record it) and the
    most common out_of_work reason with its count."""
    n_tasks = len(g)
    row = {"budget_flops": g["budget_flops"].iloc[0], "budget_seconds": g["budget_seconds"].iloc[0]}
    for col in ("flops", "seconds", "cpu_seconds", "peak_memory_mb"):
        row[f"{col}_mean"] = g[col].mean()
        row[f"{col}_median"] = g[col].median()
        row[f"{col}_max"] = g[col].max()
    row["one_off_flops_per_task"] = g["one_off_flops"].iloc[0] / n_tasks
    row["one_off_seconds_per_task"] = g["one_off_seconds"].iloc[0] / n_tasks
    # Wall time over the tasks that ran: with several workers, below the mean task seconds.
    row["wall_seconds_per_task"] = g["wall_seconds"].iloc[0] / max(1, int((~g["missing"]).sum()))
    row["total_flops_mean"] = g["total_flops"].mean()
    seconds_capped = g["budget_flops"].isna() & g["budget_seconds"].notna()
    share = (g["seconds"] / g["budget_seconds"]) if seconds_capped.all() else g["total_flops"] / g["budget_flops"]
    row["cap_share_mean"], row["cap_share_min"] = share.mean(), share.min()
    row["n_budget_exhausted"] = int(g["budget_exhausted"].sum())
    row["n_stop_recorded"] = int(g["stopped_by_budget"].notna().sum())
    row["n_stopped_by_budget"] = int(g["stopped_by_budget"].sum())
    reasons = g["out_of_work"].dropna().value_counts()
    row["out_of_work_top"] = reasons.index[0] if len(reasons) else None
    row["out_of_work_top_n"] = int(reasons.iloc[0]) if len(reasons) else 0
    return row


def _proportion(name: str, k: int, n: int) -> dict:
    lo, hi = stats.wilson_interval(k, n)
    return {name: k / n if n else math.nan, f"{name}_lo": lo, f"{name}_hi": hi}


def _mean_ci(name: str, values: pd.Series) -> dict:
    est = stats.bootstrap_mean_ci(values.to_numpy(dtype=float), n_boot=N_BOOT, seed=BOOT_SEED)
    return {name: est.value, f"{name}_lo": est.lo, f"{name}_hi": est.hi}


def _task_mean_ci(scores: pd.Series) -> dict:
    """Mean task score with a bootstrap interval -- except when every task scored the same
    (e.g. nothing solved), where resampling gives a zero-width interval that claims certainty
    no n can give; scores lie in [0, 1], so the Wilson interval of their sum stands in."""
    values = scores.to_numpy(dtype=float)
    if len(values) and np.all(values == values[0]):
        return _proportion("task_mean", float(values.sum()), len(values))
    return _mean_ci("task_mean", scores)


def baseline_method(df: pd.DataFrame, baseline: str = "icl") -> str:
    """The method used as baseline: ``baseline`` if present, else the first run's."""
    methods = list(df["method"].unique())
    return baseline if baseline in methods else df["method"].iloc[0]


def baseline_run(df: pd.DataFrame, baseline: str) -> str | None:
    """The run ``baseline`` names, by its name in the report (the directory's name) or its path;
    None when it names no run, or names a method of these runs: `--baseline icl` keeps meaning
    the method when a run directory is also called `icl` (pass its path to mean the run)."""
    if baseline in set(df["method"]):
        return None
    runs = list(df["run"].unique())
    if baseline in runs:
        return baseline
    named = df.drop_duplicates("run")[["run", "path"]]
    by_path = {Path(p).resolve(): run for run, p in named.itertuples(index=False)}
    if (run := by_path.get(Path(baseline).resolve())) is not None:
        return run
    # Runs whose directories share a name are labelled by their paths; the bare name is ambiguous.
    same_name = [str(p) for p in named["path"] if Path(p).name == baseline]
    if len(same_name) > 1:
        raise ReportError(f"--baseline {baseline}: {len(same_name)} runs have that name "
                          f"({', '.join(same_name)}); give the path of the one you mean")
    return None


def baseline_label(df: pd.DataFrame, baseline: str) -> str:
    """What the report calls the baseline: the run's name, or the method's."""
    return baseline_run(df, baseline) or baseline_method(df, baseline)


PAIRED_COLUMNS = ["run", "method", "baseline", "n_paired", "score_diff", "score_diff_lo",
                  "score_diff_hi", "won", "lost", "tied", "mcnemar_p", "holm_p", "mdd",
                  "cell_acc_diff", "cell_acc_diff_lo", "cell_acc_diff_hi", "cell_acc_n",
                  "nll_diff", "nll_diff_lo", "nll_diff_hi", "nll_n"]


def paired_table(df: pd.DataFrame, baseline: str = "icl") -> pd.DataFrame:
    """Every run of another method against the baseline, paired by task.

    ``baseline`` names a method or one run.  A method: the first run whose method is
    ``baseline`` (or the first run, if no run has that method); when several baseline runs
    exist, each run is paired with the one of the same budget and seed if there is one,
    so a budget sweep or a multi-seed comparison pairs like with like.  A run (its name in
    the report or its directory): every other run against it, runs of the same method
    included -- two settings or two budgets of one method.
    Columns: method, baseline (run), n_paired (tasks in both), score_diff
    (mean task score of run minus baseline) with a paired bootstrap interval,
    won/lost/tied on all outputs solved, exact McNemar p on the same, Holm
    adjusted p across all rows, mdd (the smallest difference in that solve
    rate the comparison could detect, :func:`tta.reporting.stats.min_detectable_difference`
    at alpha 0.05 and 80% power), and cell_acc_diff and nll_diff (the true answer's
    NLL; each with interval and n) on the tasks where both runs recorded them.
    """
    meta = _run_meta(df)
    run = baseline_run(df, baseline)
    if run is not None:
        rows = [_paired_row(df, other, run) for other in meta.index if other != run]
    else:
        base = baseline_method(df, baseline)
        base_runs = meta[meta["method"] == base]
        rows = [_paired_row(df, other, _matching_baseline(meta.loc[other], base_runs))
                for other in meta.index if meta.loc[other, "method"] != base]
    table = pd.DataFrame(rows, columns=PAIRED_COLUMNS).set_index("run")
    table["holm_p"] = stats.holm(table["mcnemar_p"].tolist())
    return table


def _matching_baseline(run: pd.Series, base_runs: pd.DataFrame) -> str:
    """Baseline run with the same budget and seed, else same budget, else first."""
    same_budget = base_runs[[_budget_text(b.budget_flops, b.budget_seconds)
                             == _budget_text(run.budget_flops, run.budget_seconds)
                             for b in base_runs.itertuples()]]
    same_seed = same_budget[same_budget["seed"] == run["seed"]]
    for candidates in (same_seed, same_budget, base_runs):
        if len(candidates):
            return candidates.index[0]
    raise AssertionError("no baseline run")  # base_runs is never empty


def _paired_row(df: pd.DataFrame, run: str, base_run: str) -> dict:
    a = df[df["run"] == run].set_index("task_id")
    b = df[df["run"] == base_run].set_index("task_id")
    common = [t for t in a.index if t in b.index]  # tasks both runs attempted
    a, b = a.loc[common], b.loc[common]
    diff = stats.paired_bootstrap_diff(a["score"], b["score"], n_boot=N_BOOT, seed=BOOT_SEED)
    won, lost, p = stats.mcnemar_exact(b["all_solved"], a["all_solved"])
    graded = {}
    for metric in ("cell_acc", "nll"):
        both = a[metric].notna() & b[metric].notna()
        d = stats.paired_bootstrap_diff(a.loc[both, metric], b.loc[both, metric], n_boot=N_BOOT, seed=BOOT_SEED)
        graded.update({f"{metric}_diff": d.value, f"{metric}_diff_lo": d.lo, f"{metric}_diff_hi": d.hi,
                       f"{metric}_n": int(both.sum())})
    method = df.loc[df["run"] == run, "method"].iloc[0]
    return {"run": run, "method": method, "baseline": base_run, "n_paired": len(common),
            "score_diff": diff.value, "score_diff_lo": diff.lo, "score_diff_hi": diff.hi,
            "won": won, "lost": lost, "tied": len(common) - won - lost,
            "mcnemar_p": p if common else math.nan, "holm_p": math.nan,
            "mdd": stats.min_detectable_difference(len(common), won + lost), **graded}


def per_task_table(df: pd.DataFrame) -> pd.DataFrame:
    """Task score per run (rows tasks, columns runs) plus ``solved_by``.

    ``solved_by`` counts the runs that solved every output of the task; rows
    are sorted by it (descending), then by task id.  NaN where a run has no
    row for the task.
    """
    runs = list(df["run"].unique())
    scores = df.pivot(index="task_id", columns="run", values="score")[runs]
    solved = df.pivot(index="task_id", columns="run", values="all_solved")[runs]
    scores.columns.name = None
    scores["solved_by"] = solved.astype(float).sum(axis=1).astype(int)
    return scores.reset_index().sort_values(["solved_by", "task_id"], ascending=[False, True]) \
        .set_index("task_id")


def accuracy_by_size(df: pd.DataFrame, edges=TOKEN_BIN_EDGES) -> pd.DataFrame:
    """All-outputs accuracy per run within task-size bins (tokens).

    Long format: run, method, group (bin label), n_tasks, n_solved, acc, lo,
    hi (Wilson over tasks).  Tasks of unknown size go to group "unknown".
    """
    labels = [_bin_label(lo, hi) for lo, hi in zip(edges[:-1], edges[1:])]
    bins = pd.cut(df["n_tokens"], bins=list(edges), labels=labels, right=True)
    groups = bins.astype(object).where(bins.notna(), "unknown")
    return _accuracy_by(df, groups, order=[*labels, "unknown"])


def accuracy_by_demos(df: pd.DataFrame) -> pd.DataFrame:
    """All-outputs accuracy per run by number of demonstrations (same columns)."""
    groups = df["n_demos"].map(lambda x: "unknown" if x != x else str(int(x)))
    order = sorted({g for g in groups if g != "unknown"}, key=int) + ["unknown"]
    return _accuracy_by(df, groups, order=order)


def _bin_label(lo: float, hi: float) -> str:
    return f">{int(lo)}" if math.isinf(hi) else f"{int(lo) + (1 if lo else 0)}-{int(hi)}"


def _accuracy_by(df: pd.DataFrame, groups: pd.Series, order: list[str]) -> pd.DataFrame:
    rows = []
    for group in order:
        in_group = df[groups == group]
        for run, g in _groups(in_group):
            k, n = int(g["all_solved"].sum()), len(g)
            lo, hi = stats.wilson_interval(k, n)
            rows.append({"run": run, "method": g["method"].iloc[0], "group": group,
                         "n_tasks": n, "n_solved": k, "acc": k / n, "lo": lo, "hi": hi})
    return pd.DataFrame(rows, columns=["run", "method", "group", "n_tasks", "n_solved",
                                       "acc", "lo", "hi"])


def seed_table(df: pd.DataFrame, acc: pd.DataFrame | None = None) -> pd.DataFrame:
    """Mean and spread across seeds for settings run with several seeds.

    A setting is (method, settings, model, dataset, budget), where settings is a
    short hash of the method's config alone (a run's config_hash also covers
    its seed, so it cannot group seeds); only settings with two or more
    distinct seeds appear.  For each aggregation (kaggle, task_mean,
    all_outputs): mean, sd (ddof=1), min, max over the runs.
    """
    acc = accuracy_table(df) if acc is None else acc
    meta = _run_meta(df).join(acc[["kaggle", "task_mean", "all_outputs"]])
    meta["budget"] = [_budget_text(f, s) for f, s in zip(meta["budget_flops"], meta["budget_seconds"])]
    manifests = df.attrs.get("manifests", {})
    meta["settings"] = [settings_hash(manifests.get(run, {}).get("config")) for run in meta.index]
    keys = ["method", "settings", "model", "dataset", "budget"]
    rows = []
    for key, g in meta.groupby(keys, dropna=False, sort=False):
        if g["seed"].nunique() < 2:
            continue
        row = dict(zip(keys, key))
        row.update(n_seeds=int(g["seed"].nunique()), seeds=", ".join(str(s) for s in g["seed"]),
                   runs=", ".join(g.index))
        for agg in ("kaggle", "task_mean", "all_outputs"):
            row.update({f"{agg}_mean": g[agg].mean(), f"{agg}_sd": g[agg].std(ddof=1),
                        f"{agg}_min": g[agg].min(), f"{agg}_max": g[agg].max()})
        rows.append(row)
    return pd.DataFrame(rows)


def failures(df: pd.DataFrame) -> pd.DataFrame:
    """The failed (or missing) tasks: run, task_id, error."""
    return df.loc[df["failed"], ["run", "task_id", "error"]].reset_index(drop=True)


def _groups(df: pd.DataFrame):
    """(run, rows) pairs in the order the runs were given."""
    for run in df["run"].unique():
        yield run, df[df["run"] == run]


def settings_hash(config: dict | None) -> str:
    """A short hash of a method's settings (not its seed, budget or data)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]


def _run_meta(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run with the run-level columns, indexed by run."""
    return df.drop_duplicates("run")[RUN_COLUMNS].set_index("run")


def _budget_text(flops: float, seconds: float) -> str:
    parts = []
    if flops == flops:  # not NaN
        parts.append(f"{flops:.3g} FLOPs")
    if seconds == seconds:
        parts.append(f"{seconds:g} s")
    return " + ".join(parts) if parts else "no cap"


# --------------------------------------------------------------------------
# Plots (matplotlib Figure objects directly: no pyplot global state, and the
# Agg canvas is used for savefig whatever backend the user has selected)
# --------------------------------------------------------------------------

AGGREGATIONS = [("kaggle", "Kaggle (outputs)"),
                ("task_mean", "arc-agi-benchmarking (task mean)"),
                ("all_outputs", "all outputs solved (tasks)")]


def plot_accuracy(acc: pd.DataFrame, out_png: str | Path) -> Path:
    """Dot-and-interval plot of the three aggregations for every run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, 1.2 * len(acc) + 2), 4))
    ax = fig.add_subplot()
    x = np.arange(len(acc))
    for i, (col, label) in enumerate(AGGREGATIONS):
        y = acc[col].to_numpy(float)
        err = _error_bars(y, acc[f"{col}_lo"], acc[f"{col}_hi"])
        ax.errorbar(x + (i - 1) * 0.2, y, yerr=err, fmt="o", capsize=3, label=label)
    ax.set_xticks(x, [str(r) for r in acc.index], rotation=30, ha="right")
    ax.set_ylabel("accuracy (95% interval)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, out_png)


def _error_bars(y, lo, hi) -> np.ndarray:
    """Distances to an interval's ends, never negative: a Wilson bound at 0/n can come out a
    rounding error above 0, which matplotlib refuses (seen on 1/100 with the bound at 1e-17)."""
    return np.clip(np.nan_to_num([y - lo.to_numpy(float), hi.to_numpy(float) - y]), 0.0, None)


def plot_accuracy_vs_flops(acc: pd.DataFrame, out_png: str | Path) -> Path | None:
    """Kaggle accuracy against mean total FLOPs per task, a line per method.

    The total is the per-task spend plus the run's one-off cost divided by its
    number of tasks (``total_flops_mean``), so a method with a costly shared
    setup is placed where its whole spend puts it.  Returns None (no file)
    when no run recorded positive FLOPs.
    """
    from matplotlib.figure import Figure

    ok = acc[acc["total_flops_mean"] > 0]
    if ok.empty:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for method, g in ok.groupby("method", sort=False):
        g = g.sort_values("total_flops_mean")
        y = g["kaggle"].to_numpy(float)
        err = _error_bars(y, g["kaggle_lo"], g["kaggle_hi"])
        ax.errorbar(g["total_flops_mean"], y, yerr=err, fmt="o-", capsize=3, label=str(method))
    if ok["total_flops_mean"].max() > 10 * ok["total_flops_mean"].min():
        ax.set_xscale("log")
    ax.set_xlabel("mean FLOPs per task, one-off costs amortised (measured)")
    ax.set_ylabel("Kaggle accuracy (95% Wilson)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, out_png)


def _save(fig, out_png: str | Path) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    return out_png


# --------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------

def markdown_table(table: pd.DataFrame, index: bool = False) -> str:
    """A GitHub markdown table of ``table`` (cells as str).

    Own function rather than DataFrame.to_markdown, which needs the optional
    ``tabulate`` package that is not among our dependencies.
    """
    if index:
        table = table.reset_index()
    header = [_cell(c) for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}%"


def _ci_pct(lo: float, hi: float) -> str:
    return "[n/a]" if lo != lo else f"[{100 * lo:.1f}, {100 * hi:.1f}]"


def _prop_cell(k: int, n: int, p: float, lo: float, hi: float) -> str:
    """'9/20 = 45.0% [25.8, 65.8]': the count, the rate and its interval."""
    return f"{k}/{n} = {_pct(p)} {_ci_pct(lo, hi)}"


def _num(x: float) -> str:
    """3 significant digits; scientific only for large counts such as FLOPs."""
    if x != x:
        return "n/a"
    if 100 <= abs(x) < 1e6:
        return f"{x:.0f}"
    return f"{x:.3g}"


def _accuracy_markdown(acc: pd.DataFrame) -> str:
    table = pd.DataFrame({
        "run": acc.index,
        "method": acc["method"],
        "tasks": acc["n_tasks"],
        "outputs": acc["n_outputs"],
        "Kaggle: solved outputs / outputs": [
            _prop_cell(r.n_solved_outputs, r.n_outputs, r.kaggle, r.kaggle_lo, r.kaggle_hi)
            for r in acc.itertuples()],
        "arc-agi-benchmarking: mean task score": [
            f"{_pct(r.task_mean)} {_ci_pct(r.task_mean_lo, r.task_mean_hi)} (n={r.n_tasks} tasks)"
            for r in acc.itertuples()],
        "all outputs solved / tasks": [
            _prop_cell(r.n_solved_tasks, r.n_tasks, r.all_outputs, r.all_outputs_lo, r.all_outputs_hi)
            for r in acc.itertuples()],
        "failed tasks": acc["n_failed"],
    })
    if acc["n_not_run"].any():
        table["not run"] = acc["n_not_run"]
    return markdown_table(table)


def _metrics_markdown(acc: pd.DataFrame) -> str | None:
    present = [m for m in GRADED_METRICS if acc[f"{m}_n"].sum() > 0]
    if not present:
        return None
    table = pd.DataFrame({"run": acc.index})
    for m in present:
        table[m] = [f"{_num(v)} [{_num(lo)}, {_num(hi)}] (n={n})" if n else "not recorded"
                    for v, lo, hi, n in zip(acc[m], acc[f"{m}_lo"], acc[f"{m}_hi"], acc[f"{m}_n"])]
    return markdown_table(table)


COST_NOTE = (
    "Spend per task is the FLOPs the harness charged to the task (per-task part) plus the "
    "run's one-off cost, such as a datastore built once for all tasks, divided by its number "
    "of tasks (one-off part); spend comparisons and the accuracy-vs-FLOPs plot use this total. Share of cap: "
    "total / the FLOPs cap per task (under a seconds cap: seconds / that cap), mean and lowest over tasks. "
    "Stopped by budget: tasks where "
    "the harness saw the cap cut the method's work. Out of work: the method's own reason for "
    "stopping below the cap, the most common one with its count. Runs made before the harness "
    "logged these show \"not recorded\". Seconds and peak memory are per task, as recorded. CPU s / task: the mean CPU "
    "seconds of the method's work, every thread and child processes that ended; well above seconds "
    "times the threads a run was given, it points to work beside the counted FLOPs. Wall s / task: "
    "the run's wall-clock time (each session from its start to its last result; work in flight when a "
    "session was stopped is not counted) over the tasks that ran; with several worker processes it is "
    "below the seconds per task. Runs made before sessions recorded their last result show \"not recorded\"."
)


def _cost_markdown(acc: pd.DataFrame) -> str:
    table = pd.DataFrame({"run": acc.index})
    table["FLOPs / task: total = per-task + one-off (means)"] = [
        f"{_num(t)} = {_num(p)} + {_num(o) if o == o else '0'}"
        for t, p, o in zip(acc["total_flops_mean"], acc["flops_mean"], acc["one_off_flops_per_task"])]
    table["per-task FLOPs median / max"] = [
        f"{_num(a)} / {_num(b)}" for a, b in zip(acc["flops_median"], acc["flops_max"])]
    table["share of cap mean / min"] = [_cap_share_cell(r) for r in acc.itertuples()]
    table["stopped by budget"] = [
        f"{r.n_stopped_by_budget}/{r.n_stop_recorded}" if r.n_stop_recorded else "not recorded"
        for r in acc.itertuples()]
    table["most common out-of-work reason"] = [_out_of_work_cell(r) for r in acc.itertuples()]
    for col, label in (("seconds", "seconds"), ("peak_memory_mb", "peak MB")):
        table[f"{label} mean / median / max"] = [
            f"{_num(a)} / {_num(b)} / {_num(c)}"
            for a, b, c in zip(acc[f"{col}_mean"], acc[f"{col}_median"], acc[f"{col}_max"])]
        if col == "seconds":
            table["CPU s / task"] = [_num(x) if x == x else "not recorded" for x in acc["cpu_seconds_mean"]]
    table["one-off s / task"] = [_num(x) if x == x else "none" for x in acc["one_off_seconds_per_task"]]
    table["wall s / task"] = [_num(x) if x == x else "not recorded" for x in acc["wall_seconds_per_task"]]
    table["budget exhausted"] = [f"{k}/{n}" for k, n in zip(acc["n_budget_exhausted"], acc["n_tasks"])]
    return markdown_table(table)


def _cap_share_cell(r) -> str:
    if r.budget_flops != r.budget_flops and r.budget_seconds != r.budget_seconds:
        return "no cap"
    of_seconds = " of its seconds" if r.budget_flops != r.budget_flops else ""
    return f"{_pct(r.cap_share_mean)} / {_pct(r.cap_share_min)}{of_seconds}"


def _out_of_work_cell(r) -> str:
    if isinstance(r.out_of_work_top, str):
        return f"{r.out_of_work_top} ({r.out_of_work_top_n}/{r.n_tasks})"
    return "none" if r.n_stop_recorded else "not recorded"


def _spend_warning(acc: pd.DataFrame, factor: float = 2.0) -> str | None:
    """A warning when, among runs under the same cap (a budget sweep varies caps on purpose),
    the runs that spent anything differ in mean total spend by more than ``factor``; runs
    that spent nothing (e.g. trivial floors) are named apart."""
    caps = [_budget_text(f, sec) for f, sec in zip(acc["budget_flops"], acc["budget_seconds"])]
    parts, idle = [], []
    for cap in dict.fromkeys(caps):
        spend = acc["total_flops_mean"][[c == cap for c in caps]]
        idle += [str(run) for run, v in spend.items() if v == 0]
        spenders = spend[spend > 0].sort_values()
        if len(spenders) < 2 or spenders.iloc[-1] <= factor * spenders.iloc[0]:
            continue
        ratio = spenders.iloc[-1] / spenders.iloc[0]
        where = f" at {cap}" if len(set(caps)) > 1 else ""
        parts.append(f"the runs' mean FLOPs per task{where} (one-off costs amortised) differ by {ratio:.3g}x, "
                     "so their accuracies are not at equal compute: "
                     + ", ".join(f"{run} {_num(v)} FLOPs" for run, v in spenders.items()))
    if not parts:
        return None
    text = "**Unequal spend:** " + "; ".join(parts) + "."
    if idle:
        text += f" Spent nothing: {', '.join(idle)}."
    return text


def _significance_sentence(paired: pd.DataFrame, base: str, compared: str = "method") -> str:
    """Which runs beat the baseline after Holm correction (p < 0.05, more tasks won than
    lost, the direction the McNemar test is about); significantly worse runs are named too.
    `compared`: what the other runs are called -- "method", or "run" when the baseline is one
    run and runs of its own method are compared too."""
    if paired.empty:
        return f"No run of another method to compare with the baseline `{base}`."
    lo, hi = paired["n_paired"].min(), paired["n_paired"].max()
    n = f"n = {lo} tasks" if lo == hi else f"n = {lo}-{hi} tasks per comparison"
    significant = paired[paired["holm_p"] < 0.05]
    better = significant[significant["won"] > significant["lost"]]
    worse = significant[significant["won"] < significant["lost"]]
    if better.empty and worse.empty:
        return f"No {compared} differs significantly from the baseline `{base}` after Holm correction ({n})."

    def named(rows):   # one entry per method, however many of its runs (seeds, budgets) qualify
        parts = []
        for method, g in rows.groupby("method", sort=False):
            if len(g) == 1:
                r = next(g.itertuples())
                parts.append(f"`{method}` (run {r.Index}: {100 * r.score_diff:+.1f} pp, Holm p = {_num(r.holm_p)})")
            else:
                parts.append(f"`{method}` ({len(g)} runs: {100 * g['score_diff'].min():+.1f} to "
                             f"{100 * g['score_diff'].max():+.1f} pp, Holm p <= {_num(g['holm_p'].max())})")
        return "; ".join(parts)

    text = (f"After Holm correction ({n}), better than the baseline `{base}` (p < 0.05): "
            f"{named(better)}." if not better.empty else
            f"No {compared} beats the baseline `{base}` after Holm correction ({n}).")
    return text + (f" Significantly worse: {named(worse)}." if not worse.empty else "")


def _diff_cell(v: float, lo: float, hi: float) -> str:
    """'+4.0 pp [-1.2, +9.5]'; a zero-width interval says why instead of claiming certainty."""
    if v != v:
        return "n/a"
    if lo == hi:
        return ("0.0 pp, no discordant tasks" if v == 0 else
                f"{100 * v:+.1f} pp on every task (no interval)")
    ci = "[n/a]" if lo != lo else f"[{100 * lo:+.1f}, {100 * hi:+.1f}]"
    return f"{100 * v:+.1f} pp {ci}"


def _mdd_cell(mdd: float, discordant: int) -> str:
    if mdd != mdd:
        return "n/a"
    return f"{100 * mdd:.1f} pp" + ("" if discordant else " (floor: 1 discordant task)")


def _paired_markdown(paired: pd.DataFrame) -> str:
    table = pd.DataFrame({
        "run": paired.index, "method": paired["method"], "baseline run": paired["baseline"],
        "paired tasks": paired["n_paired"],
        "Δ mean task score (run − baseline)": [
            _diff_cell(r.score_diff, r.score_diff_lo, r.score_diff_hi) for r in paired.itertuples()],
        "won": paired["won"], "lost": paired["lost"], "tied": paired["tied"],
        "McNemar exact p": [_num(p) for p in paired["mcnemar_p"]],
        "Holm p": [_num(p) for p in paired["holm_p"]],
        "smallest detectable Δ": [_mdd_cell(m, w + lo) for m, w, lo
                                  in zip(paired["mdd"], paired["won"], paired["lost"])],
    })
    if paired["cell_acc_n"].sum() > 0:
        table["Δ cell_acc"] = [
            f"{_diff_cell(r.cell_acc_diff, r.cell_acc_diff_lo, r.cell_acc_diff_hi)} (n={r.cell_acc_n})"
            if r.cell_acc_n else "not recorded" for r in paired.itertuples()]
    if paired["nll_n"].sum() > 0:   # lower is better; not in pp: a per-token log-likelihood
        table["Δ true-answer NLL"] = [
            (f"{r.nll_diff:+.3f} [{r.nll_diff_lo:+.3f}, {r.nll_diff_hi:+.3f}] (n={r.nll_n})"
             if r.nll_diff_lo == r.nll_diff_lo else f"{r.nll_diff:+.3f} (n={r.nll_n})")
            if r.nll_n else "not recorded" for r in paired.itertuples()]
    return markdown_table(table)


def _by_group_markdown(long: pd.DataFrame, group_title: str) -> str:
    """Wide table: rows groups, columns runs, cells 'k/n = p% [lo, hi]'."""
    long = long.assign(cell=[_prop_cell(r.n_solved, r.n_tasks, r.acc, r.lo, r.hi)
                             for r in long.itertuples()])
    wide = long.pivot(index="group", columns="run", values="cell")
    wide = wide.loc[list(dict.fromkeys(long["group"])), list(dict.fromkeys(long["run"]))]
    wide = wide.fillna("no tasks")
    wide.index.name = group_title
    wide.columns.name = None
    return markdown_table(wide, index=True)


def _seed_markdown(seeds: pd.DataFrame) -> str:
    table = seeds[["method", "settings", "budget", "n_seeds", "seeds"]].copy()
    for agg, label in AGGREGATIONS:
        table[label] = [f"mean {_pct(m)}, sd {100 * s:.1f} pp, min {_pct(lo)}, max {_pct(hi)}"
                        for m, s, lo, hi in zip(seeds[f"{agg}_mean"], seeds[f"{agg}_sd"],
                                                seeds[f"{agg}_min"], seeds[f"{agg}_max"])]
    return markdown_table(table)


def disagreement_pictures(df: pd.DataFrame, out_dir: Path, limit: int = 40) -> dict[str, Path]:
    """Pictures (tta.reporting.show) of the tasks the compared methods disagree on: some run solves every
    output and another does not.  One run per method is drawn -- the largest budget, the lowest
    seed -- and runs that spent nothing (floors) neither count as disagreeing nor are drawn."""
    from tta.reporting.show import ShowError, show_runs
    from tta.data.tasks import TaskError

    spent = df.groupby("run")["flops"].sum()
    runs = df[df["run"].isin(spent[spent > 0].index)]
    if runs.empty:
        return {}
    budget = runs["budget_flops"].max()
    runs = runs[(runs["budget_flops"] == budget) | (runs["budget_flops"].isna() & pd.isna(budget))]
    runs = runs[runs["seed"] == runs["seed"].min()]
    solved = runs.pivot(index="task_id", columns="run", values="all_solved")
    disagree = [t for t in solved.index[solved.nunique(axis=1) > 1]][:limit]
    first = runs.drop_duplicates("run")
    if not disagree or first["run"].nunique() < 2:
        return {}
    try:
        pictures = show_runs(list(first["path"]), disagree, out_dir, labels=list(first["run"]))
    except (ShowError, TaskError):
        return {}   # e.g. a dataset that no longer holds the tasks: the report goes on without them
    return dict(zip(disagree, pictures))


def _per_task_markdown(df: pd.DataFrame, pictures: dict[str, Path] | None = None, out_md: Path | None = None) -> str:
    scores = per_task_table(df)
    failed = df.pivot(index="task_id", columns="run", values="failed").reindex(scores.index)
    missing = df.pivot(index="task_id", columns="run", values="missing").reindex(scores.index)
    table = pd.DataFrame(index=scores.index)
    for run in scores.columns.drop("solved_by"):
        table[run] = [_score_cell(math.nan if m == True else s, f)  # noqa: E712 (numpy bool)
                      for s, f, m in zip(scores[run], failed[run], missing[run])]
    table["runs solving all outputs"] = scores["solved_by"]
    if pictures:
        table["picture"] = [f"[png]({_rel(pictures[t], out_md)})" if t in pictures else "" for t in table.index]
    return markdown_table(table, index=True)


def _score_cell(score: float, failed) -> str:
    if score != score:
        return "not run"
    text = f"{score:.2g}"
    return f"{text} (failed)" if failed == True else text  # noqa: E712 (numpy bool)


def _failures_markdown(df: pd.DataFrame) -> str:
    """The tasks that ran and failed, with their errors; then the tasks not run yet (an
    unfinished run), which are not failures but also count as wrong."""
    fails = failures(df[~df["missing"]])
    text = "No task failed."
    if not fails.empty:
        fails["error"] = [e if len(e) <= 200 else e[:197] + "..." for e in fails["error"]]
        text = (f"{len(fails)} failed task(s); each counts as wrong in every accuracy above.\n\n"
                + markdown_table(fails))
    for run, g in _groups(df):
        not_run = sorted(g.loc[g["missing"], "task_id"])
        if not_run:
            text += (f"\n\n{run}: {len(not_run)} task(s) not run (no result yet: rerun the same command "
                     f"to finish the run); they count as wrong above: {_first_ids(not_run, 20)}")
    return text


def _versions_markdown(manifests: dict) -> str:
    """One list when all runs used the same versions, else a package x run table."""
    per_run = {run: m.get("versions") or {} for run, m in manifests.items()}
    distinct = {json.dumps(v, sort_keys=True) for v in per_run.values()}
    if len(distinct) == 1:
        versions = next(iter(per_run.values()))
        return ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) or "not recorded"
    packages = sorted({k for v in per_run.values() for k in v})
    table = pd.DataFrame({run: [v.get(p, "") for p in packages] for run, v in per_run.items()},
                         index=pd.Index(packages, name="package"))
    return "Versions differ between runs:\n\n" + markdown_table(table, index=True)


def _method_text(manifest: dict) -> str:
    """The run's method, and the label it is reported under when it is a variant."""
    label = manifest.get("label")
    return str(manifest.get("method")) + (f" (as {label})" if label else "")


def _runs_markdown(df: pd.DataFrame, manifests: dict) -> str:
    rows = []
    for run, m in manifests.items():
        budget = m.get("budget") or {}
        one_off = m.get("one_off")
        rows.append({
            "run": run, "method": _method_text(m), "seed": m.get("seed"),
            "config_hash": m.get("config_hash"),
            "config": json.dumps(m.get("config") or {}, sort_keys=True) + _overlay_note(m),
            "budget": _budget_text(_float(budget.get("flops")), _float(budget.get("seconds"))),
            "one-off cost": (f"{_num(_float(one_off.get('flops')))} FLOPs, "
                             f"{_num(_float(one_off.get('seconds')))} s: {one_off.get('what', '')}"
                             + _charged_note(one_off) if one_off else "none"),
            "git commit": m.get("git_commit") or "unknown",
            "started": m.get("started"), "finished": m.get("finished") or "not finished",
            "command": (f"`{m['command']}`" if m.get("command") else "") + _overlay_commands(m),
        })
    return markdown_table(pd.DataFrame(rows))


def _overlay_note(manifest: dict) -> str:
    """For a `tta merge --overlay` run: which of its tasks came from which rerun, with what settings."""
    notes = []
    for o in manifest.get("overlaid") or []:
        settings = ", ".join(f"{k}={json.dumps(new)} (not {json.dumps(old)})" for k, (old, new) in o["settings"].items())
        notes.append(f"{len(o['tasks'])} of its {len(manifest.get('task_ids') or [])} tasks from {o['run']}"
                     + (f" with {settings}" if settings else " with the same settings"))
    return ("; overlaid: " + "; ".join(notes)) if notes else ""


def _overlay_commands(manifest: dict) -> str:
    if not manifest.get("overlaid"):
        return ""
    runs = [("base run", manifest.get("base_command"))] + [("rerun", o.get("command")) for o in manifest["overlaid"]]
    return "".join(f"; {what}: `{cmd}`" for what, cmd in runs if cmd)


def _charged_note(one_off: dict) -> str:
    """Whether the one-off cost counted against the budget, if the manifest says."""
    if "charged" not in one_off:
        return ""
    return " (charged to the budget)" if one_off["charged"] else " (not charged to the budget)"


def _distinct(df: pd.DataFrame, col: str) -> str:
    return ", ".join(str(v) for v in dict.fromkeys(df[col]))


INTERVALS_NOTE = (
    "Intervals are 95%: Wilson score intervals for the two proportions (the Kaggle "
    "interval treats test outputs as independent, although outputs of one task are "
    "not, so for multi-output tasks it is slightly narrow); percentile bootstrap over "
    f"tasks ({N_BOOT} resamples, seed {BOOT_SEED}) for means of per-task values and "
    "for paired differences."
)
AGGREGATIONS_NOTE = (
    "Accuracies are as graded in results.jsonl (a test output is solved when one of its "
    "two attempts is exact) and are shown in the three aggregations in use for ARC: "
    "Kaggle = solved test outputs / all test outputs; arc-agi-benchmarking = mean over "
    "tasks of (solved outputs / outputs of the task); all outputs = tasks whose every "
    "test output is solved / tasks. Failed tasks and tasks without a result count as wrong."
)


def write_report(paths, out_md: str | Path, baseline: str = "icl",
                 allow_mismatch: bool = False, command: str | None = None, baseline_given: bool = False,
                 missing: dict[str, str] | None = None) -> Path:
    """Write the comparison report for ``paths`` to ``out_md``; returns its path.  ``missing``:
    runs that should have been here and why they are not (an experiment's stopped cells).

    Images go to ``<out_md without .md>_files/`` and are linked relatively.
    Raises :class:`ReportError` if the runs are not comparable and
    ``allow_mismatch`` is false, or if a ``baseline`` the user gave (``baseline_given``) names
    no method and no run of them (the default, icl, falls back to the first run instead).
    """
    out_md = Path(out_md)
    df = load_runs(paths)
    if baseline_given and baseline not in set(df["method"]) and baseline_run(df, baseline) is None:
        raise ReportError(f"--baseline {baseline}: no run and no method of these runs has that name (methods: "
                          f"{', '.join(sorted(set(df['method'])))}; runs: {', '.join(df['run'].unique())})")
    for run, g in _groups(df):
        if g["ungraded"].any():
            raise ReportError(f"{g['path'].iloc[0]}: {int(g['ungraded'].sum())} of its {len(g)} tasks are ungraded "
                              "(the dataset gives no solutions); a comparison needs graded runs")
    diffs = check_comparable(df, allow_mismatch=allow_mismatch)
    manifests = df.attrs["manifests"]
    acc = accuracy_table(df)
    paired = paired_table(df, baseline)
    seeds = seed_table(df, acc)

    files_dir = out_md.parent / f"{out_md.stem}_files"
    acc_png = plot_accuracy(acc, files_dir / "accuracy.png")
    cost_png = plot_accuracy_vs_flops(acc, files_dir / "accuracy_vs_flops.png")

    base = baseline_label(df, baseline)
    base_note = (f"run `{base}`" if baseline_run(df, baseline) else f"method `{base}`" if base == baseline else
                 f"method `{base}` (the first run; no run has method `{baseline}`)")
    compared = "run" if baseline_run(df, baseline) else "method"
    s = ["# Test-time adaptation comparison\n", _significance_sentence(paired, base, compared) + "\n"]
    spend_warning = _spend_warning(acc)
    if spend_warning:
        s.append(spend_warning + "\n")
    s.append(f"- Date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    if command:
        s.append(f"- Command: `{command}`")
    s.append(f"- Dataset: {_distinct(df, 'dataset')}")
    s.append(f"- Model: {_distinct(df, 'model')}")
    s.append(f"- Runs: {len(manifests)}; baseline: {base_note}")
    s.append(f"- Package versions: {_versions_markdown(manifests)}")
    s.append(f"- {AGGREGATIONS_NOTE}")
    s.append(f"- {INTERVALS_NOTE}\n")

    if missing:
        s.append("## Runs missing from this report\n")
        s.append("These runs of the plan stopped with an error (what they finished is in their directories):\n")
        s += [f"- `{run}`: {why}" for run, why in missing.items()]
        s.append("")

    if diffs and all(d.startswith(BUDGETS_DIFFER) for d in diffs):
        s.append("## Budgets\n")
        s.append("The runs span several budgets. Each run is paired with the baseline run of its own budget "
                 "(and seed) where there is one.\n")
        s += [f"- {d}" for d in diffs]
        s.append("")
    elif diffs:
        s.append("## Differences between runs\n")
        s.append("These runs are not strictly comparable (reported because a mismatch was "
                 "allowed). Paired comparisons use only the tasks both runs have.\n")
        s += [f"- {d}" for d in diffs]
        s.append("")

    s.append("## Runs\n")
    s.append(_runs_markdown(df, manifests) + "\n")

    s.append("## Accuracy\n")
    s.append(_accuracy_markdown(acc) + "\n")
    s.append(f"![accuracy per run]({_rel(acc_png, out_md)})\n")

    metrics_md = _metrics_markdown(acc)
    if metrics_md:
        s.append("## Graded metrics\n")
        s.append("Mean over tasks of the per-task mean over test outputs, with a 95% bootstrap "
                 "interval; n = tasks where the metric was recorded (failed tasks count as 0 "
                 "for shape_ok and cell_acc).\n")
        s.append(metrics_md + "\n")

    s.append("## Cost per task\n")
    s.append(COST_NOTE + "\n")
    s.append(_cost_markdown(acc) + "\n")
    if cost_png:
        s.append(f"![accuracy vs FLOPs]({_rel(cost_png, out_md)})\n")

    s.append("## Paired comparison with the baseline\n")
    if paired.empty:
        s.append("No run of another method to compare (`--baseline RUN` compares every run with one run, "
                 "runs of the same method included).\n")
    else:
        s.append("Matched by task. Δ is the difference in mean task score with a paired "
                 "bootstrap interval; won/lost/tied count tasks with all outputs solved by "
                 "one run and not the other; the exact McNemar test uses those discordant "
                 f"tasks, and the Holm correction is across the {paired['mcnemar_p'].notna().sum()} "
                 "comparisons. Smallest detectable Δ: the difference in the share of tasks fully "
                 "solved that a comparison of n tasks, a share p_d of them discordant, detects "
                 "with 80% power at p < 0.05 (before the Holm correction): (1.96 + 0.84) × "
                 "sqrt(p_d / n), with p_d at least 1/n. A smaller true difference can go unseen.\n")
        s.append(_paired_markdown(paired) + "\n")

    s.append("## Accuracy by task size\n")
    s.append("Tasks with all outputs solved / tasks in the bin, 95% Wilson; size in tokens "
             "(one per cell plus one per row).\n")
    s.append(_by_group_markdown(accuracy_by_size(df), "tokens") + "\n")
    s.append("## Accuracy by number of demonstrations\n")
    s.append("Tasks with all outputs solved / tasks, 95% Wilson.\n")
    s.append(_by_group_markdown(accuracy_by_demos(df), "demonstrations") + "\n")

    s.append("## Spread across seeds\n")
    if seeds.empty:
        s.append("Every setting was run with one seed, so there is no spread across seeds to show.\n")
    else:
        s.append("Accuracy of each setting across its seeds: mean, standard deviation (ddof=1), "
                 "lowest and highest.\n")
        s.append(_seed_markdown(seeds) + "\n")

    s.append("## Per-task results\n")
    pictures = disagreement_pictures(df, files_dir / "tasks")
    s.append("Task score (solved outputs / outputs) per run, sorted by the number of runs "
             "that solved every output." + (" The tasks the methods disagree on link to a picture of "
             "the task, its true output and each method's two attempts (largest budget, lowest seed)."
             if pictures else "") + "\n")
    s.append(_per_task_markdown(df, pictures, out_md) + "\n")

    s.append("## Failed tasks\n")
    s.append(_failures_markdown(df) + "\n")

    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(s))
    return out_md


def write_run_report(path: str | Path, out: str | Path | None = None) -> str:
    """Markdown summary of one run (``tta report RUN_DIR``); written to ``out`` if given.

    Tasks without a result yet are listed as not run (not as failed); a run of tasks without
    solutions (a Kaggle challenges file alone) is reported as ungraded, not as 0%."""
    df = load_runs([path])
    run, manifest = next(iter(df.attrs["manifests"].items()))
    finished = df[~df["missing"]]
    ungraded_run = bool(len(finished)) and bool(finished["ungraded"].all())
    n_ungraded = int(df["ungraded"].sum())
    graded = df if ungraded_run or not n_ungraded else df[~df["ungraded"]]
    acc = accuracy_table(graded)
    r = acc.iloc[0]
    budget = manifest.get("budget") or {}
    not_run = int(df["missing"].sum())
    s = [f"# Run {run}\n",
         f"- Method: {_method_text(manifest)} (config_hash {manifest.get('config_hash')}, "
         f"config `{json.dumps(manifest.get('config') or {}, sort_keys=True)}`{_overlay_note(manifest)})",
         *([f"- Command: `{manifest['command']}`{_overlay_commands(manifest)}"] if manifest.get("command") else []),
         f"- Model: {manifest.get('model')}; dataset: {manifest.get('dataset')}; "
         f"seed: {manifest.get('seed')}",
         f"- Budget: {_budget_text(_float(budget.get('flops')), _float(budget.get('seconds')))}",
         f"- Started: {manifest.get('started')}; finished: {manifest.get('finished') or 'not finished'}"
         + (f" ({len(finished)} of {len(df)} tasks have a result; {not_run} not run yet)" if not_run else ""),
         f"- {AGGREGATIONS_NOTE}",
         f"- {INTERVALS_NOTE}\n",
         "## Accuracy\n"]
    if ungraded_run:
        s += [f"Ungraded: the dataset gives no solutions for these tasks, so nothing is scored. The two "
              f"attempts per test input are in `{Path(path) / 'submission.json'}` (Kaggle format).",
              f"- Failed tasks: {r.n_failed}; not run: {r.n_not_run}\n"]
    else:
        s += [f"- Kaggle (solved outputs / outputs): "
              f"{_prop_cell(r.n_solved_outputs, r.n_outputs, r.kaggle, r.kaggle_lo, r.kaggle_hi)}",
              f"- arc-agi-benchmarking (mean task score): {_pct(r.task_mean)} "
              f"{_ci_pct(r.task_mean_lo, r.task_mean_hi)} (n={r.n_tasks} tasks)",
              f"- All outputs solved (tasks): "
              f"{_prop_cell(r.n_solved_tasks, r.n_tasks, r.all_outputs, r.all_outputs_lo, r.all_outputs_hi)}",
              f"- Failed tasks: {r.n_failed}; not run: {r.n_not_run}"
              + (" (they count as wrong above)" if r.n_not_run else "")
              + f"; budget exhausted: {r.n_budget_exhausted}"
              + (f"\n- {n_ungraded} task(s) ungraded (no solution given) are left out of these accuracies"
                 if n_ungraded else "") + "\n"]
    if df.attrs.get("assumed_one_output") and not ungraded_run:
        s.append("Tasks not run count as one test output each in the Kaggle accuracy (their number is unknown).\n")
    per_task = df[["task_id", "n_outputs", "n_solved", "score", "flops", "seconds", "cpu_seconds", "peak_memory_mb",
                   "budget_exhausted", "stopped_by_budget", "out_of_work"]].assign(
        score=[("not run" if m else "ungraded" if u else f"{x:.3g}")
               for x, m, u in zip(df["score"], df["missing"], df["ungraded"])],
        n_solved=[("" if m or u else str(k)) for k, m, u in zip(df["n_solved"], df["missing"], df["ungraded"])],
        stopped_by_budget=lambda d: d["stopped_by_budget"].map({1.0: True, 0.0: False}))
    s += ["## Cost per task\n",
          COST_NOTE + "\n",
          _cost_markdown(acc) + "\n",
          "## Per-task results\n",
          markdown_table(per_task) + "\n",
          "## Failed tasks\n",
          _failures_markdown(df) + "\n"]
    text = "\n".join(s)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    return text


def _rel(target: Path, md: Path) -> str:
    """Path of ``target`` relative to the markdown file's folder, POSIX style."""
    return Path(target).resolve().relative_to(md.parent.resolve()).as_posix()
