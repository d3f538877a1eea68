"""LESS datastore build rate and per-task selection time.

    python benchmarks/less.py [--model random:default] [--pool arc1-train] [--pool-tasks 25]
                              [--per-task 4] [--dataset arc1-eval] [--tasks 3] [--threads N]

Builds a datastore from scratch into a temporary directory (never the shared cache) and prints:
* build: pool examples, gradients (examples x checkpoints), seconds, examples/s and gradients/s,
  FLOPs, and the seconds of the warm-up alone;
* per task: target gradients + scoring + top-k (the charged selection step), seconds and FLOPs.
Pass `--threads 1` when another job shares the CPU: two threads oversubscribed with another
process make small matmuls hundreds of times slower.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from methods.less import LESSConfig, target_examples
from methods.less import gradients
from tta.budget import Meter
from tta.model.loading import load_model
from tta.data.datasets import load_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:default")
    ap.add_argument("--pool", default="arc1-train")
    ap.add_argument("--pool-tasks", type=int, default=25)
    ap.add_argument("--per-task", type=int, default=4)
    ap.add_argument("--dataset", default="arc1-eval")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = LESSConfig(pool=args.pool, pool_tasks=args.pool_tasks, pool_per_task=args.per_task)
    settings = config.gradient_settings()
    lm = load_model(args.model, device=args.device)
    pool = gradients.choose_pool_tasks(load_dataset(args.pool).tasks, args.pool_tasks, config.pool_seed)
    examples = gradients.pool_examples(pool, lm.format, args.per_task, config.pool_max_len, config.pool_seed)
    tokens = sum(len(e.encoded) for e in examples)
    print(f"model {args.model} on {lm.device}, {torch.get_num_threads()} threads; pool {args.pool}: "
          f"{len(pool)} tasks, {len(examples)} examples, mean {tokens / len(examples):.0f} tokens")

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        store = gradients.build(lm, examples, settings, Path(tmp) / "store", progress=False)
        seconds = time.perf_counter() - started
        n_grads = len(store) * len(store.lrs)
        warm = store.meta["warmup"]
        print(f"build: {seconds:.1f} s, {len(store) / seconds:.2f} pool examples/s "
              f"({n_grads} gradients at {n_grads / seconds:.2f}/s, {tokens * len(store.lrs) / seconds:.0f} tokens/s), "
              f"{store.meta['build']['flops']:.3g} FLOPs; warm-up {warm['steps']} steps on {warm['examples']} examples")

        tasks = load_dataset(args.dataset).tasks[:args.tasks]
        times = []
        for task in tasks:
            meter = Meter()
            meter.attach(lm.model)
            started = time.perf_counter()
            targets = target_examples(task, lm.format, np.random.default_rng(0), config.target_views, lm.max_context)
            feats = store.target_features(lm, [t.encoded for t in targets])
            scores = gradients.score(store.features, store.lrs, feats, [t.held_out[0] for t in targets])
            top = np.argsort(-scores)[:config.top_k]
            dt = time.perf_counter() - started
            meter.detach()
            times.append(dt)
            print(f"select {task.id}: {len(targets)} targets x {len(store.lrs)} checkpoints, "
                  f"{dt:.2f} s, {meter.flops:.3g} FLOPs, top pick {store.examples[top[0]]['task_id']}")
        print(f"selection: mean {np.mean(times):.2f} s per task over {len(times)} tasks")


if __name__ == "__main__":
    main()
