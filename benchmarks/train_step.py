"""How fast a training step is, measured in one run:
* harness overhead: `tta.training.finetune.train` (budget checks, meter hooks, scheduler,
  batching) against a bare forward+backward+AdamW step on the same batches, same LoRA, same
  model.  Aim: ratio <= 1.2;
* share of the machine: the FLOPs the meter charged per second of TTT training (LoRA and full
  weights), and of pretraining steps, against this CPU's measured bf16 matmul rate (a 2048^3
  matmul under the same thread count).  Aim: TTT at least 35%.

    python benchmarks/train_step.py [--model SPEC] [--steps 20]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import benchmark_model, timed  # noqa: E402

from methods.ttt_lora import TTTConfig  # noqa: E402
from tta.budget import Meter  # noqa: E402
from tta.training.examples import leave_one_out_examples  # noqa: E402
from tta.data.datasets import load_dataset
from tta.training.finetune import attach_lora, batches, detach_lora, train  # noqa: E402
from tta.training.step import padded, training_step  # noqa: E402


def bare_steps(lm, plan):
    """The same training step (`tta.training.step.training_step`) in a bare loop: no meter, no
    budget checks, no schedule."""
    params = [p for p in lm.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    lm.model.train()
    start = time.perf_counter()
    for batch in plan:
        training_step(lm.model, optimizer, padded(lm, batch))
    lm.model.eval()
    return time.perf_counter() - start


def bf16_peak(n: int = 2048) -> float:
    """FLOP/s of one large bf16 matmul: the most this CPU does with these threads."""
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    return 2 * n**3 / timed(lambda: a @ b, 5)


def charged_rate(lm, examples, c, adapter: str) -> tuple[float, int]:
    """(FLOP/s the meter charged during `train`, steps) for one kind of adapter."""
    from tta.training.finetune import new_adapter
    settings = TTTConfig(adapter=adapter)
    handle = new_adapter(lm, settings, 0)
    meter = Meter()
    meter.attach(lm.model)
    try:
        start = time.perf_counter()
        report = train(lm, examples, meter.handle(lm.model), lr=settings.learning_rate, epochs=1, batch_size=c.batch_size,
                       group_by_length=settings.group_by_length)
        seconds = time.perf_counter() - start
    finally:
        meter.detach()
        detach_lora(lm, handle)
    return meter.flops / seconds, report.steps


def pretraining_rate(size: str = "default", tokens: int = 8192, length: int = 1024, steps: int = 6) -> float:
    """FLOP/s of pretraining steps (full weights, fp32 master weights under bf16 autocast) on
    random tokens, counted by the meter."""
    from tta.model.loading import build_model
    from tta.training.step import training_step
    model, _ = build_model(size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(6, 16, (tokens // length, length))
    mask, positions = torch.ones_like(ids), torch.arange(length).expand_as(ids)
    meter = Meter()
    meter.attach(model)
    model.train()
    training_step(model, optimizer, (ids, mask, positions, ids))   # warm-up
    before, start = meter.flops, time.perf_counter()
    for _ in range(steps):
        training_step(model, optimizer, (ids, mask, positions, ids))
    rate = (meter.flops - before) / (time.perf_counter() - start)
    meter.detach()
    return rate


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dataset", default="gen-eval")
    args = parser.parse_args()
    lm = benchmark_model(args.model)
    c = TTTConfig()
    task = load_dataset(args.dataset).tasks[0]
    examples = [e.encoded for e in leave_one_out_examples(task, lm.format, np.random.default_rng(0),
                                                          args.steps * c.batch_size)]
    plan = batches(examples, c.batch_size, 1, seed=0, group_by_length=c.group_by_length)
    print(f"model {lm.spec}, task {task.id}: {len(plan)} steps of {c.batch_size} examples, "
          f"{sum(len(e) for e in examples) / len(examples):.0f} tokens each on average")
    results = {"bare": [], "harness": []}
    for _ in range(3):   # alternate, so drift in machine load hits both alike
        adapter = attach_lora(lm, c.rank, c.alpha, c.targets)
        results["bare"].append(bare_steps(lm, plan))
        detach_lora(lm, adapter)
        adapter = attach_lora(lm, c.rank, c.alpha, c.targets)
        meter = Meter()
        meter.attach(lm.model)
        start = time.perf_counter()
        train(lm, examples, meter.handle(lm.model), lr=c.lr, epochs=1, batch_size=c.batch_size,
              group_by_length=c.group_by_length)
        results["harness"].append(time.perf_counter() - start)
        meter.detach()
        detach_lora(lm, adapter)
    bare, harness = min(results["bare"]), min(results["harness"])
    print(f"bare training_step loop:     {1000 * bare / len(plan):.1f} ms/step")
    print(f"tta.training.finetune.train: {1000 * harness / len(plan):.1f} ms/step")
    print(f"harness overhead ratio:      {harness / bare:.3f}  (aim <= 1.2)")

    peak = bf16_peak()
    print(f"bf16 matmul rate (2048^3, {torch.get_num_threads()} threads): {peak / 1e9:,.0f} GFLOP/s")
    for adapter in ("lora", "full"):
        rate, steps = charged_rate(lm, examples, c, adapter)
        print(f"TTT training, adapter={adapter:4s}: {rate / 1e9:6,.0f} GFLOP/s charged = {rate / peak:5.1%} of the bf16 rate"
              f"  ({steps} steps; aim >= 35%)")
    rate = pretraining_rate()
    print(f"pretraining (default size, 8192 tokens/step): {rate / 1e9:6,.0f} GFLOP/s = {rate / peak:5.1%} of the bf16 rate")


if __name__ == "__main__":
    main()
