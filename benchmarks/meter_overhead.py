"""What watching every other module costs (`Meter.watching_other_modules`), against no watch and
against `torch.utils.flop_counter.FlopCounterMode`, the alternative that sees every operation:
training steps and decode steps of the embedded model run through its modules, one thread.
(The harness's own decoder, `tta.model.fast_decode`, runs no modules and pays nothing.)

    python benchmarks/meter_overhead.py
"""
from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from tta.budget import Meter
from tta.model.loading import load_model


def train(model, steps=5):
    ids = torch.randint(0, 10, (4, 400))
    model.requires_grad_(True)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
    model.requires_grad_(False)


def decode(model, steps=100):
    ids = torch.randint(0, 10, (8, 300))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
        for _ in range(steps):
            cache = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).past_key_values


def timed(model, work, mode: str) -> float:
    meter = Meter()
    meter.attach(model)
    watch = {"watched": meter.watching_other_modules, "flop counter": lambda: FlopCounterMode(display=False)}
    started = time.perf_counter()
    try:
        if mode in watch:
            with watch[mode]():
                work(model)
        else:
            work(model)
    finally:
        meter.detach()
    return time.perf_counter() - started


if __name__ == "__main__":
    torch.set_num_threads(1)
    model = load_model("default", device="cpu").model
    for name, work in (("5 training steps, 4 x 400 tokens", train), ("100 decode steps, 8 rows", decode)):
        for repeat in range(2):
            times = {mode: timed(model, work, mode) for mode in ("plain", "watched", "flop counter")}
            print(f"{name}: " + ", ".join(f"{mode} {s:.2f} s" for mode, s in times.items()))
