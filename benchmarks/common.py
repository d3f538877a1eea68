"""Helpers shared by the benchmarks: the model to measure, a timer, and what the meter charges
for some work beside torch's own count of it."""
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


def meter_charge(work) -> float:
    """FLOPs the harness's meter charges for `work` run as a task's other work (a method's own
    network, bare products)."""
    from tta.budget import Meter
    meter = Meter()
    with meter.watching_other_work():
        work()
    return meter.flops


def torch_count(work) -> float:
    """FLOPs torch's own counter (`torch.utils.flop_counter`) gives `work`."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        work()
    return counter.get_total_flops()
