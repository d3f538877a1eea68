"""Batched temperature sampling (`tta.inference.decoding.generate` with temperature: every sample of every
view in one KV-cached, grammar-constrained batch) against one transformers
`model.generate(do_sample=True)` call per sample (same prompts, temperature, top-p and token
limit), same model, same run.  Reports sampled tokens per second for each.
`generate` numbers tokens 0, 1, 2, ..., not with the grid positions the embedded model was
trained with, so its answers are worse: this compares speed only.

    python benchmarks/sampling.py [--model SPEC] [--tasks 2] [--samples 4]
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

from tta.data.augment import transforms_from_names  # noqa: E402
from tta.inference.decoding import generate
from tta.model.loading import autocast
from tta.inference.predict import answer_room, build_views  # noqa: E402
from tta.data.datasets import load_dataset

VIEWS = ["identity", "rot90", "transpose", "flip_h"]   # the sampling method's default views


def workload(lm, tasks, samples):
    """(prompts, token limit) per task: every view's prompt `samples` times."""
    out = []
    for task in tasks:
        views = build_views(lm, task, transforms_from_names(VIEWS), 1, np.random.default_rng(0))
        out.append(([v.prompt for _ in range(samples) for v in views], answer_room(lm.format, task)))
    return out


def batched(lm, work, temperature, top_p, batch_size):
    tokens = 0
    for prompts, room in work:
        gens = generate(lm, prompts, None, max_new_tokens=room, temperature=temperature, top_p=top_p,
                        seed=0, batch_size=batch_size)
        tokens += sum(len(g.tokens) + g.finished for g in gens)
    return tokens


@torch.no_grad()
def one_generate_per_sample(lm, work, temperature, top_p):
    tokens = 0
    torch.manual_seed(0)
    for prompts, room in work:
        for prompt in prompts:
            ids = torch.tensor([prompt], device=lm.device)
            with autocast(lm.device):
                out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=room,
                                        do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                        eos_token_id=lm.format.eos_id, pad_token_id=lm.format.pad_id)
            tokens += out.shape[1] - ids.shape[1]
    return tokens


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="model spec (default: the embedded model if installed, else random:default)")
    parser.add_argument("--dataset", default="gen-eval")
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--samples", type=int, default=4, help="samples per view")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    lm = benchmark_model(args.model)
    tasks = load_dataset(args.dataset).tasks[: args.tasks]
    work = workload(lm, tasks, args.samples)
    n_samples = sum(len(p) for p, _ in work)
    batched(lm, work[:1], args.temperature, args.top_p, args.batch_size)   # warm-ups
    one_generate_per_sample(lm, [(work[0][0][:1], work[0][1])], args.temperature, args.top_p)

    start = time.perf_counter()
    ours = batched(lm, work, args.temperature, args.top_p, args.batch_size)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = one_generate_per_sample(lm, work, args.temperature, args.top_p)
    theirs_s = time.perf_counter() - start

    print(f"model {lm.spec} on {lm.device}, {torch.get_num_threads()} threads: {len(tasks)} tasks of {args.dataset}, "
          f"{n_samples} samples ({len(VIEWS)} views x {args.samples}), T={args.temperature}, top-p={args.top_p}")
    print(f"batched generate (batch {args.batch_size}): {ours:6d} tokens in {ours_s:7.2f} s = {ours / ours_s:8.1f} tokens/s")
    print(f"one HF generate per sample:  {theirs:6d} tokens in {theirs_s:7.2f} s = {theirs / theirs_s:8.1f} tokens/s")
    print(f"speed-up in tokens/s:        {(ours / ours_s) / (theirs / theirs_s):.1f}x")


if __name__ == "__main__":
    main()
