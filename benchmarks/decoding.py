"""Batched augmented inference (`tta.inference.predict.predict_augmented`: all views of a task in one
batched, KV-cached, grammar-constrained decode) against one transformers `generate` call per view
(greedy, same prompts, same token limit), same model, same run.  Aim: >= 5x faster.
`generate` numbers tokens 0, 1, 2, ..., not with the grid positions the embedded model was
trained with, so its answers are worse: this compares speed only.

    python benchmarks/decoding.py [--model SPEC] [--tasks 3]
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

from tta.inference.decoding import generate
from tta.model.loading import autocast
from tta.inference.predict import ViewSettings, answer_room, build_views, predict_augmented  # noqa: E402
from tta.data.augment import inference_transforms  # noqa: E402
from tta.data.datasets import load_dataset


@torch.no_grad()
def one_generate_per_view(lm, task):
    views = build_views(lm, task, inference_transforms(), 2, np.random.default_rng(0))
    room = answer_room(lm.format, task)
    tokens = 0
    for view in views:
        ids = torch.tensor([view.prompt], device=lm.device)
        with autocast(lm.device):
            out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=room,
                                    do_sample=False, eos_token_id=lm.format.eos_id, pad_token_id=lm.format.pad_id)
        tokens += out.shape[1] - ids.shape[1]
    return len(views), tokens


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--dataset", default="gen-eval")
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=ViewSettings().decode_batch_size,
                        help="views decoded together (default: the methods' decode_batch_size)")
    args = parser.parse_args()
    lm = benchmark_model(args.model)
    tasks = load_dataset(args.dataset).tasks[: args.tasks]
    predict_augmented(lm, tasks[0], None)   # warm-up
    start = time.perf_counter()
    batched_tokens = prompt_tokens = 0
    for task in tasks:
        views = build_views(lm, task, inference_transforms(), 2, np.random.default_rng(0))
        prompt_tokens += sum(len(v.prompt) for v in views)
        outs = generate(lm, [v.prompt for v in views], max_new_tokens=answer_room(lm.format, task),
                        batch_size=args.batch_size)
        batched_tokens += sum(len(g.tokens) + g.finished for g in outs)
    batched = time.perf_counter() - start
    start = time.perf_counter()
    n_views = n_tokens = 0
    for task in tasks:
        v, t = one_generate_per_view(lm, task)
        n_views, n_tokens = n_views + v, n_tokens + t
    sequential = time.perf_counter() - start
    # The grid grammar keeps an answer going until it is a complete grid, while plain generate()
    # stops at the first end-of-sequence, so the two paths make different numbers of tokens:
    # tokens per second is the like-for-like figure, wall time per task the user-facing one.
    print(f"model {lm.spec}: {len(tasks)} tasks, {n_views} views, decoded {args.batch_size} at a time; "
          f"{prompt_tokens} prompt tokens (both paths run every prompt once)")
    print(f"batched augmented inference: {batched:.2f} s, {batched_tokens} tokens, {batched_tokens / batched:,.0f} tokens/s")
    print(f"one generate() per view:     {sequential:.2f} s, {n_tokens} tokens, {n_tokens / sequential:,.0f} tokens/s")
    print(f"tokens/s speed-up:           {(batched_tokens / batched) / (n_tokens / sequential):.1f}x  (aim >= 5x)")


if __name__ == "__main__":
    main()
