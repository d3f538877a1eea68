"""Batched augmented inference (`tta.inference.predict.predict_augmented`: all views of a task in one
batched, KV-cached, grammar-constrained decode) against one transformers `generate` call per view
(greedy, same prompts), same model, same run.  Aim: >= 5x faster for the same work.

Same work: `generate` is told to make exactly as many tokens for each view as the batched decoder
made (min_new_tokens = max_new_tokens), so both paths read the same prompts and write the same
number of tokens, and the speed-up is the ratio of wall times.  Left free, `generate` runs on past
a grid's end to the token limit (it has no grid grammar) and makes ~3x the tokens, which the
tokens/s line also shows.  `generate` numbers tokens 0, 1, 2, ..., not with the grid positions the
embedded model was trained with, so its answers are worse: this compares speed only.

    python benchmarks/decoding.py [--model SPEC] [--tasks 3] [--threads N] [--repeats 3]
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
def one_generate_per_view(lm, prompts, most, least=None):
    """One `generate` per prompt: at most `most[i]` new tokens for prompt i, at least `least[i]`."""
    tokens = 0
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt], device=lm.device)
        with autocast(lm.device):
            out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=most[i], min_new_tokens=least[i] if least else None,
                                    eos_token_id=lm.format.eos_id, pad_token_id=lm.format.pad_id)
        tokens += out.shape[1] - ids.shape[1]
    return tokens


def timed_run(fn, sync=lambda: None, repeats: int = 1):
    """(median seconds over `repeats` calls, the last call's result)."""
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


def measure(lm, tasks, batch_size: int, sync=lambda: None, repeats: int = 1) -> dict:
    """Both paths over the augmented views of `tasks` (`sync` waits for the device, on a GPU),
    each timed `repeats` times (the median counts: single runs on this CPU vary by ~10%)."""
    work = [([v.prompt for v in build_views(lm, task, inference_transforms(), 2, np.random.default_rng(0))],
             answer_room(lm.format, task)) for task in tasks]
    prompts = [p for views, _ in work for p in views]
    predict_augmented(lm, tasks[0], None)   # warm-up

    def batched():
        outs = [g for views, room in work for g in generate(lm, views, max_new_tokens=room, batch_size=batch_size)]
        return [len(g.tokens) + g.finished for g in outs]   # the end-of-sequence token counts too

    batched_s, lengths = timed_run(batched, sync, repeats)
    same_s, same_tokens = timed_run(lambda: one_generate_per_view(lm, prompts, lengths, lengths), sync, repeats)
    rooms = [room for views, room in work for _ in views]
    free_s, free_tokens = timed_run(lambda: one_generate_per_view(lm, prompts, rooms), sync)
    return {"views": len(prompts), "prompt_tokens": sum(map(len, prompts)), "batched_s": batched_s,
            "batched_tokens": sum(lengths), "same_work_s": same_s, "same_work_tokens": same_tokens,
            "free_s": free_s, "free_tokens": free_tokens, "speed_up": same_s / batched_s,
            "tokens_per_s_speed_up": (sum(lengths) / batched_s) / (free_tokens / free_s)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--dataset", default="gen-eval")
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: the usable cores)")
    parser.add_argument("--repeats", type=int, default=3, help="times each path is timed (the median counts)")
    parser.add_argument("--batch-size", type=int, default=ViewSettings().decode_batch_size,
                        help="views decoded together (default: the methods' decode_batch_size)")
    args = parser.parse_args()
    lm = benchmark_model(args.model, threads=args.threads)
    tasks = load_dataset(args.dataset).tasks[: args.tasks]
    m = measure(lm, tasks, args.batch_size, repeats=args.repeats)
    print(f"model {lm.spec}: {len(tasks)} tasks, {m['views']} views, decoded {args.batch_size} at a time, "
          f"{torch.get_num_threads()} threads; {m['prompt_tokens']} prompt tokens; median of {args.repeats} runs "
          "(free generate(): one run)")
    for label, key in (("batched augmented inference:       ", "batched"),
                       ("one generate() per view, same work:", "same_work"), ("one generate() per view, free:     ", "free")):
        seconds, tokens = m[f"{key}_s"], m[f"{key}_tokens"]
        print(f"{label} {seconds:6.2f} s, {tokens} tokens, {tokens / seconds:,.0f} tokens/s")
    print(f"speed-up, same work:                {m['speed_up']:.1f}x  (aim >= 5x)")
    print(f"speed-up in tokens/s against free generate(): {m['tokens_per_s_speed_up']:.1f}x")


if __name__ == "__main__":
    main()
