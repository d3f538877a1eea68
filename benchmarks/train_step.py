"""Harness overhead of test-time training: `tta.training.finetune.train` (budget checks, meter hook,
scheduler, batching) against a bare forward+backward+AdamW step on the same batches, same LoRA,
same model, measured in the same run.  Aim: ratio <= 1.2.

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
from common import benchmark_model  # noqa: E402

from methods.ttt_lora import TTTConfig  # noqa: E402
from tta.budget import Meter  # noqa: E402
from tta.training.examples import leave_one_out_examples  # noqa: E402
from tta.model.batching import pad_batch, pad_labels
from tta.model.loading import autocast
from tta.data.datasets import load_dataset
from tta.training.finetune import PAD_MULTIPLE, attach_lora, batches, detach_lora, train  # noqa: E402


def bare_steps(lm, plan):
    params = [p for p in lm.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    lm.model.train()
    start = time.perf_counter()
    for batch in plan:
        ids, mask, pos = pad_batch([e.input_ids for e in batch], lm.format, lm.device, "right", PAD_MULTIPLE)
        labels = pad_labels([e.labels for e in batch], lm.device, PAD_MULTIPLE)
        with autocast(lm.device):
            loss = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    lm.model.eval()
    return time.perf_counter() - start


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
    plan = batches(examples, c.batch_size, 1, seed=0)
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
        train(lm, examples, meter.handle(lm.model), lr=c.lr, epochs=1, batch_size=c.batch_size)
        results["harness"].append(time.perf_counter() - start)
        meter.detach()
        detach_lora(lm, adapter)
    bare, harness = min(results["bare"]), min(results["harness"])
    print(f"bare forward+backward+AdamW: {1000 * bare / len(plan):.1f} ms/step")
    print(f"tta.training.finetune.train:          {1000 * harness / len(plan):.1f} ms/step")
    print(f"harness overhead ratio:      {harness / bare:.3f}  (aim <= 1.2)")


if __name__ == "__main__":
    main()
