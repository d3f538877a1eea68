"""Pictures of tasks and answers: ARC is visual, so a researcher wants to see the task, the
true answer and each method's two attempts side by side.

`task_picture(task, answers, out_png)` draws one PNG: a row per demonstration (input ->
output), then for each test input its grid, the true output (when known) and, per run, the two
attempts with a tick or a cross.  `show_runs(run_dirs, task_ids, out_dir)` draws the pictures
for tasks of one or more run directories (`tta show`); `tta compare` uses it for the tasks the
compared methods disagree on.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tta.data.tasks import Task
from tta.data.datasets import load_selection

# The usual ARC palette: 0 black, 1 blue, 2 red, 3 green, 4 yellow, 5 grey, 6 magenta,
# 7 orange, 8 light blue, 9 maroon.
PALETTE = ["#000000", "#0074D9", "#FF4136", "#2ECC40", "#FFDC00",
           "#AAAAAA", "#F012BE", "#FF851B", "#7FDBFF", "#870C25"]


class ShowError(ValueError):
    """A run or task that cannot be drawn; the message is one line."""


def _draw_grid(ax, grid, title: str = "", colour: str = "black") -> None:
    from matplotlib.colors import ListedColormap

    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=7, color=colour)
    if grid is None:
        ax.text(0.5, 0.5, "none", ha="center", va="center", fontsize=8, transform=ax.transAxes)
        ax.set_facecolor("#eeeeee")
        return
    grid = np.asarray(grid)
    ax.imshow(grid, cmap=ListedColormap(PALETTE), vmin=0, vmax=9, interpolation="nearest")
    h, w = grid.shape
    ax.set_xticks(np.arange(-0.5, w, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, h, 1), minor=True)
    ax.grid(which="minor", color="#555555", linewidth=0.3)
    ax.tick_params(which="minor", length=0)


def attempt_mark(grid, truth) -> str:
    """✓ for an exact answer (shape included), ✗ for a wrong one, nothing when either is missing."""
    if grid is None or truth is None:
        return ""
    grid = np.asarray(grid)
    return "✓" if grid.shape == truth.shape and np.array_equal(grid, truth) else "✗"


def task_picture(task: Task, answers: dict[str, list[list]], out_png: str | Path) -> Path:
    """One PNG of `task` with, for every run label in `answers`, its two attempts per test input
    (lists of grids or None, as in results.jsonl; None for a run without a result for the task)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(answers)
    columns = max(2, 2 + 2 * len(runs))
    rows = len(task.train) + len(task.test)
    fig, axes = plt.subplots(rows, columns, figsize=(1.4 * columns, 1.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, pair in enumerate(task.train):
        for c, (grid, title) in enumerate([(pair.input, f"demo {r + 1} input"), (pair.output, "output")]):
            axes[r, c].axis("on")
            _draw_grid(axes[r, c], grid, title)
    for t, pair in enumerate(task.test):
        r = len(task.train) + t
        axes[r, 0].axis("on")
        _draw_grid(axes[r, 0], pair.input, f"test {t + 1} input")
        axes[r, 1].axis("on")
        _draw_grid(axes[r, 1], pair.output, "true output" if pair.output is not None else "output unknown")
        for k, run in enumerate(runs):
            if answers[run] is None:   # the run has no result for this task
                axes[r, 2 + 2 * k].axis("on")
                _draw_grid(axes[r, 2 + 2 * k], None, f"{run[:26]}: not run")
                continue
            attempts = answers[run][t] if t < len(answers[run]) else [None, None]
            for a in range(2):
                grid = attempts[a] if a < len(attempts) else None
                mark = attempt_mark(grid, pair.output)
                ax = axes[r, 2 + 2 * k + a]
                ax.axis("on")
                _draw_grid(ax, grid, f"{run[:26]} #{a + 1} {mark}".rstrip(), "green" if mark == "✓" else "black")
    fig.suptitle(task.id, fontsize=9)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _run_answers(run_dir: Path) -> tuple[dict, dict[str, list]]:
    manifest_path, results_path = run_dir / "manifest.json", run_dir / "results.jsonl"
    if not manifest_path.is_file() or not results_path.is_file():
        raise ShowError(f"{run_dir}: not a run directory (needs manifest.json and results.jsonl)")
    manifest = json.loads(manifest_path.read_text())
    attempts = {}
    for line in results_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue   # a torn last line: the task is shown as not run
        attempts[record["task_id"]] = record.get("attempts") or []
    return manifest, attempts


def show_runs(run_dirs: list[str | Path], task_ids: list[str] | None, out_dir: str | Path,
              labels: list[str] | None = None, say=lambda line: None) -> list[Path]:
    """PNGs (one per task) of the tasks of `run_dirs` (all their tasks when `task_ids` is empty),
    each with every run's attempts; the runs must be over the same dataset.  A task whose file
    does not load (the runs recorded it as failed) is not drawn: `say` gets one line for it."""
    run_dirs = [Path(d) for d in run_dirs]
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ShowError(f"{out_dir}: is a file; --out names the folder for the pictures")
    loaded = [_run_answers(d) for d in run_dirs]
    datasets = {m["dataset"] for m, _ in loaded}
    if len(datasets) != 1:
        raise ShowError(f"the runs are over different datasets ({', '.join(sorted(datasets))})")
    labels = labels or [d.name for d in run_dirs]
    wanted = list(task_ids or loaded[0][0].get("task_ids") or loaded[0][1])
    unknown = [t for t in wanted if not any(t in answers for _, answers in loaded)]
    if unknown:
        raise ShowError(f"{run_dirs[0]}: no result for task {unknown[0]}")
    dataset = load_selection(datasets.pop(), wanted)
    tasks = {t.id: t for t in dataset.tasks}
    pictures = []
    for task_id in wanted:
        if task_id not in tasks:
            say(f"task {task_id}: not drawn, its file does not load ({dataset.failures.get(task_id, 'not found')})")
            continue
        answers = {label: answers.get(task_id) for label, (_, answers) in zip(labels, loaded)}
        pictures.append(task_picture(tasks[task_id], answers, Path(out_dir) / f"{task_id}.png"))
    return pictures
