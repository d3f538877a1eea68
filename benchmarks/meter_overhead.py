"""What watching every other module and bare product costs (`Meter.watching_other_work`), against
no watch and against `torch.utils.flop_counter.FlopCounterMode`, the alternative that sees every
operation: training steps and decode steps of the embedded model run through its modules, and
decode steps through the harness's own decoder (`tta.model.fast_decode`, whose products the watch
passes by, since the harness charges them by the formula), one thread, the median of 3 repeats.

    python benchmarks/meter_overhead.py
"""
from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from tta.budget import Meter, harness_products
from tta.model.fast_decode import FastDecoder
from tta.model.loading import load_model
from tta.training.finetune import attach_lora


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


def fast_decode(model, steps=100):
    """The harness's decoder, as `tta.inference.decoding.FastSteps` runs it."""
    decoder = FastDecoder(model)
    ids = torch.randint(0, 10, (8, 300))
    positions = torch.arange(300).expand(8, 300)
    with torch.no_grad(), harness_products():
        decoder.read_prompts(ids, positions, torch.full((8,), 299), 300 + steps)
        for i in range(steps):
            allowed = torch.ones((8, 301 + i), dtype=torch.bool)
            decoder.step(ids[:, -1:], torch.full((8, 1), 300 + i), allowed)


def merge_flops() -> float:
    """What peft's merge and unmerge of the default LoRA (rank 32 on q, v and the MLP) would cost
    if charged: `tta.training.finetune.merged` runs them outside the watch."""
    lm = load_model("default", device="cpu")
    adapter = attach_lora(lm, 32, 4, ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    meter = Meter()
    meter.attach(lm.model)
    with meter.watching_other_work():
        adapter.merge_adapter()
        adapter.unmerge_adapter()
    meter.detach()
    return meter.flops


def timed(model, work, mode: str) -> float:
    meter = Meter()
    meter.attach(model)
    watch = {"watched": meter.watching_other_work, "flop counter": lambda: FlopCounterMode(display=False)}
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
    print(f"merging and unmerging the default LoRA: {merge_flops():.3g} FLOPs", flush=True)
    modes = ("plain", "watched", "flop counter")
    for name, work in (("5 training steps, 4 x 400 tokens", train), ("100 decode steps, 8 rows", decode),
                       ("100 fast-decoder steps, 8 rows", fast_decode)):
        times = {mode: [] for mode in modes}
        for repeat in range(3):   # the modes interleaved, so a slow spell of the host hits them alike
            for mode in modes:
                times[mode].append(timed(model, work, mode))
        print(f"{name}: " + ", ".join(f"{mode} {sorted(t)[1]:.2f} s ({' / '.join(f'{x:.2f}' for x in t)})"
                                      for mode, t in times.items()), flush=True)
