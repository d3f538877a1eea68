"""A markdown table of run directories on the tasks they share: tasks solved with a 95% Wilson
interval, mean true-answer NLL, attempt-1 cell accuracy, training steps, seconds per task and
share of the cap spent.  The levers report (reports/real-arc-levers.md) is built from it.
"Solved" sums the ARC Prize task scores: a task with two test outputs and one of them right
counts 0.5 (so 10.5/100 where 9 tasks have every output right).

    python scripts/runs_table.py RUN_DIR...
"""
from __future__ import annotations

import sys
from pathlib import Path

from tta.reporting.stats import wilson_interval
from tta.run.record import read_records


def mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def main(paths: list[str]):
    runs = {Path(p).name: {r.task_id: r for r in read_records(Path(p) / "results.jsonl")} for p in paths}
    shared = sorted(set.intersection(*(set(r) for r in runs.values())))
    if not shared:
        sys.exit(f"runs_table: {', '.join(paths)} share no task; give runs of the same tasks")
    print(f"{len(shared)} tasks shared by every run\n")
    print("| run | solved | 95% interval | true-answer NLL | cell accuracy | training steps | s/task | share of cap |")
    print("|---|---|---|---|---|---|---|---|")
    for name, records in runs.items():
        rows = [records[t] for t in shared]
        solved = sum(r.score for r in rows)
        lo, hi = wilson_interval(int(round(solved)), len(rows))
        steps = mean((r.extra.get("adapt") or {}).get("steps") for r in rows)
        print(f"| {name} | {solved:g}/{len(rows)} | [{lo:.1%}, {hi:.1%}] "
              f"| {mean(x for r in rows for x in r.metrics.get('nll', [])):.3f} "
              f"| {mean(x for r in rows for x in r.metrics.get('cell_acc', [])):.3f} "
              f"| {'-' if steps != steps else f'{steps:.0f}'} | {mean(r.seconds for r in rows):.1f} "
              f"| {mean(r.budget_share for r in rows):.1%} |")


if __name__ == "__main__":
    main(sys.argv[1:])
