"""Helpers shared by the benchmarks: the model to measure and a timer."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from tta.model.loading import DEFAULT_MODEL_DIR, load_model
from tta.threads import set_threads


def benchmark_model(spec: str | None = None, threads: int | None = None):
    """The embedded model when it is installed, else an untrained model of the same size; torch
    uses `threads` threads (default: as `tta run` would)."""
    if threads:
        torch.set_num_threads(threads)
    else:
        set_threads()
    if spec:
        return load_model(spec, device="cpu")
    return load_model("default" if (DEFAULT_MODEL_DIR / "config.json").exists() else "random:default", device="cpu")


def timed(fn, repeats: int = 3) -> float:
    """Best wall time of `repeats` calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
