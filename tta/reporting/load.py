"""Run directories into one task-level DataFrame (`load_runs`): the reader every report uses.

Each row is one task of one run, joined with its run's manifest fields; a task the manifest
lists without a record counts as failed (`missing`), never dropped from the denominator.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from tta.run.record import RecordError, TaskRecord, read_records, wall_seconds

GRADED_METRICS = ("shape_ok", "cell_acc", "nll", "token_acc")
# Metrics that are meaningful as 0 for a task that failed (no prediction means
# no correct shape and no correct cell).  nll/token_acc of a missing prediction
# are undefined, so they stay NaN and the report shows on how many tasks they
# were measured.
ZERO_WHEN_FAILED = ("shape_ok", "cell_acc")

# Task-size bins in tokens (one per cell plus one per row).  1,024 and 2,048 are
# the context limits common among small models, so the bins show what fits them.
TOKEN_BIN_EDGES = (0, 1024, 2048, 4096, 8192, math.inf)


class ReportError(ValueError):
    """Run directories that cannot be reported on (or compared); one-line message."""



RUN_COLUMNS = ["run", "path", "method", "config_hash", "model", "dataset", "seed",
               "budget_flops", "budget_seconds"]
TASK_COLUMNS = ["task_id", "n_outputs", "n_solved", "all_solved", "score", "flops",
                "seconds", "cpu_seconds", "peak_memory_mb", "error", "failed", "missing", "ungraded",
                "budget_exhausted", "stopped_by_budget", "out_of_work", "n_demos", "n_tokens",
                *GRADED_METRICS]


NO_MODEL = "none"   # the model of a run whose method loads none (copy_input, the floors)


def load_runs(paths: Iterable[str | Path] | str | Path) -> pd.DataFrame:
    """Load run directories into one DataFrame with a row per (task x run).

    Columns: run (directory name, or the full path when two runs share a
    name), path, method, config_hash, model, dataset, seed, budget_flops,
    budget_seconds, task_id, n_outputs, n_solved, all_solved, score, flops,
    seconds, cpu_seconds (NaN when not recorded), peak_memory_mb, error, failed, missing (never ran: "not run"), ungraded (the
    dataset gave no solution, so nothing was scored), budget_exhausted,
    stopped_by_budget (1.0 / 0.0, NaN when not recorded), out_of_work (the
    method's own reason for stopping below the cap, or None), n_demos,
    n_tokens, the graded metrics averaged over the task's outputs (shape_ok,
    cell_acc, nll, token_acc; NaN when not recorded), one_off_flops and
    one_off_seconds (the run's one-off cost, repeated on each row), and
    total_flops (flops + one_off_flops / the run's number of tasks: the
    amortised spend every report figure uses).

    Tasks listed in the manifest without a line in ``results.jsonl`` get a
    row with ``missing=True`` and an error, so they count as wrong.  The
    manifests are kept in ``df.attrs["manifests"]`` (run -> dict), and the tasks whose number
    of test outputs no run recorded (counted as 1 each) in ``df.attrs["assumed_one_output"]``.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise ReportError("no run directories given")

    frames, manifests = [], {}
    for path, label in zip(paths, _run_labels(paths)):
        manifest = _read_manifest(path)
        rows = _read_results(path, manifest)
        if not rows:
            raise ReportError(f"{path}: results.jsonl has no tasks and the manifest lists none")
        manifests[label] = manifest
        frames.append(_run_frame(label, path, manifest, rows))

    df = pd.concat(frames, ignore_index=True)
    df, assumed = _fill_task_properties(df)
    df = _zero_metrics_of_failed_tasks(df)
    df.attrs["manifests"] = manifests
    df.attrs["assumed_one_output"] = assumed
    return df


def _run_labels(paths: list[Path]) -> list[str]:
    """Directory names, or the full paths when names would collide."""
    names = [p.resolve().name or str(p) for p in paths]
    if len(set(names)) == len(names):
        return names
    labels = [str(p) for p in paths]
    if len(set(labels)) != len(labels):
        raise ReportError(f"the same run directory is given twice: {', '.join(labels)}")
    return labels


def _read_manifest(path: Path) -> dict:
    """Read and minimally validate ``manifest.json``."""
    if not path.is_dir():
        raise ReportError(f"{path}: not a run directory ({'a file' if path.exists() else 'no such directory'})")
    for name in ("manifest.json", "results.jsonl"):
        if not (path / name).is_file():
            raise ReportError(f"{path}: not a run directory (missing {name})")
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path / 'manifest.json'}: invalid JSON ({e})") from None
    if not isinstance(manifest, dict) or "method" not in manifest:
        raise ReportError(f"{path / 'manifest.json'}: no 'method' field")
    return manifest


def _read_results(path: Path, manifest: dict) -> list[dict]:
    """One row dict per task: the records of ``results.jsonl`` (read as every reader reads them:
    a torn last line is an unfinished task), then the manifest's tasks that have no record."""
    try:
        records = read_records(path / "results.jsonl")
    except RecordError as e:
        raise ReportError(str(e)) from None
    done = {r.task_id for r in records}
    records += [TaskRecord.missing_task(str(t), manifest["method"])
                for t in manifest.get("task_ids") or [] if str(t) not in done]
    return [_task_row(r) for r in records]


def _task_row(record: TaskRecord) -> dict:
    """The task columns of the DataFrame for one record.  A missing task's costs and sizes are
    unknown (NaN), not zero."""
    unknown = math.nan if record.missing else None
    # an ungraded task has no `correct`; its attempts say how many test outputs it has
    n_outputs = len(record.attempts) if not record.graded else len(record.correct)
    if record.missing:
        n_outputs = 0   # filled from other runs later
    n_solved = sum(bool(c) for c in record.correct)
    return {
        "task_id": record.task_id,
        "n_outputs": n_outputs,  # 0 = unknown (failed before grading), filled later
        "n_solved": n_solved,
        "all_solved": bool(n_outputs) and n_solved == n_outputs,
        "score": n_solved / n_outputs if n_outputs else 0.0,
        "flops": unknown if record.missing else _float(record.flops),
        "seconds": unknown if record.missing else _float(record.seconds),
        "cpu_seconds": unknown if record.missing else _float(record.cpu_seconds),
        "peak_memory_mb": unknown if record.missing else _float(record.peak_memory_mb),
        "error": record.error,
        "failed": record.failed,
        "missing": record.missing,
        "ungraded": not record.graded,
        "budget_exhausted": bool(record.budget_exhausted),
        "stopped_by_budget": unknown if record.missing else _float(record.stopped_by_budget),
        "out_of_work": None if record.out_of_work is None else str(record.out_of_work),
        "n_demos": unknown if record.missing else _float(record.n_demos),
        "n_tokens": unknown if record.missing else _float(record.n_tokens),
        **{m: math.nan if record.missing else _mean_of_outputs(record.metrics.get(m)) for m in GRADED_METRICS},
    }


def _run_frame(label: str, path: Path, manifest: dict, rows: list[dict]) -> pd.DataFrame:
    """The task rows of one run with the run's manifest fields prepended."""
    budget = manifest.get("budget") or {}
    one_off = manifest.get("one_off") or {}
    run_fields = {
        "run": label,
        "path": str(path),
        "method": str(manifest.get("label") or manifest["method"]),   # a variant is its own method here
        "config_hash": manifest.get("config_hash"),
        # The weights' hash with the name: two runs of "default" across a retrained model differ.
        "model": NO_MODEL if manifest.get("uses_model") is False else
                 manifest.get("model") + (f"@{manifest['model_sha256'][:8]}" if manifest.get("model_sha256") else ""),
        "dataset": manifest.get("dataset"),
        "seed": manifest.get("seed"),
        "budget_flops": _float(budget.get("flops")),
        "budget_seconds": _float(budget.get("seconds")),
        "wall_seconds": _float(wall_seconds(manifest)),   # the whole run's, NaN when not recorded
    }
    df = pd.DataFrame(rows, columns=TASK_COLUMNS)
    for i, (name, value) in enumerate(run_fields.items()):
        df.insert(i, name, [value] * len(df))
    df["one_off_flops"] = _float(one_off.get("flops"))
    df["one_off_seconds"] = _float(one_off.get("seconds"))
    df["total_flops"] = df["flops"] + np.nan_to_num(df["one_off_flops"]) / len(df)
    return df


def _fill_task_properties(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Fill task properties of failed/missing rows from other runs of the task.

    A task that crashed before grading has no ``correct`` list, so its number
    of test outputs is unknown; it still must count in the Kaggle denominator.
    Where no run knows it (a task no run has reached yet) it counts as 1; those
    ids are returned beside the frame, for the report to say so.
    The task's size and demonstration count are the same in every run.
    """
    df = df.copy()
    known = df[df["n_outputs"] > 0].groupby("task_id")["n_outputs"].max()
    unknown = df["n_outputs"] == 0
    df["n_outputs"] = df["n_outputs"].where(~unknown, df["task_id"].map(known)).astype(float)
    still = df["n_outputs"].isna()
    assumed = sorted(set(df.loc[still, "task_id"]))
    df.loc[still, "n_outputs"] = 1
    df["n_outputs"] = df["n_outputs"].astype(int)
    for col in ("n_demos", "n_tokens"):
        per_task = df.groupby("task_id")[col].first()  # first non-NaN value
        df[col] = df[col].fillna(df["task_id"].map(per_task))
    return df, assumed


def _zero_metrics_of_failed_tasks(df: pd.DataFrame) -> pd.DataFrame:
    """Count failed tasks as 0 for shape_ok/cell_acc in runs that record them.

    Only in runs that measured the metric at all: an old run without metrics
    must show "not measured", not a mean over its failures.
    """
    df = df.copy()
    for run in df["run"].unique():
        rows = df["run"] == run
        for m in ZERO_WHEN_FAILED:
            if df.loc[rows & ~df["failed"], m].notna().any():
                df.loc[rows & df["failed"] & df[m].isna(), m] = 0.0
    return df


def _float(x) -> float:
    return math.nan if x is None else float(x)


def _mean_of_outputs(values) -> float:
    """Mean of a per-output metric list, ignoring nulls; NaN when none."""
    if not values:
        return math.nan
    vals = [float(v) for v in values if v is not None]
    return float(np.mean(vals)) if vals else math.nan


# --------------------------------------------------------------------------
# Comparability
# --------------------------------------------------------------------------
