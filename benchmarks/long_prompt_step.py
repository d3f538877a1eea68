"""Where a decode step's time goes on long prompts (`tta.model.fast_decode.FastDecoder.step`).

A task whose prompts are too long to train on spends its whole budget decoding views, one
answer token per step for a batch of views over prompts of thousands of tokens.  This times
steps of the embedded model for a batch of `--rows` random prompts of each `--lengths`, and
reports the share of the step inside attention and the rate at which attention reads the
key/value cache (bytes of the cache's bf16 keys and values read per step / attention time).
If that rate is flat across lengths and far below the arithmetic rate, the step is bound by
memory bandwidth: only reading fewer bytes (fewer or shorter prompts, a smaller cache type)
makes it faster.

    python benchmarks/long_prompt_step.py [--rows 16] [--lengths 600 1800 3300 5600] [--steps 40] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).parent))
from common import benchmark_model  # noqa: E402

from tta.model.fast_decode import FastDecoder  # noqa: E402


def measure(decoder: FastDecoder, rows: int, length: int, steps: int) -> dict:
    """Read `rows` random prompts of `length` tokens, then time `steps` greedy-shaped steps."""
    ids = torch.randint(0, 10, (rows, length))
    positions = torch.arange(length).expand(rows, length)
    decoder.read_prompts(ids, positions, torch.full((rows,), length - 1), length + 2 * steps + 8)
    token = torch.zeros(rows, dtype=torch.long)
    done = 0

    def run(n: int) -> None:
        nonlocal done
        for _ in range(n):
            allowed = torch.ones(rows, length + done + 1, dtype=torch.bool)
            decoder.step(token, torch.full((rows,), length + done), allowed)
            done += 1

    run(2)   # warm-up
    start = time.perf_counter()
    run(steps // 2)
    step_ms = (time.perf_counter() - start) / (steps // 2) * 1e3
    with profile() as prof:
        run(steps // 2)
    attention_us = sum(event.self_cpu_time_total for event in prof.key_averages()
                       if "scaled_dot_product" in event.key or "flash_attention" in event.key)
    total_us = sum(event.self_cpu_time_total for event in prof.key_averages())
    cache_bytes = 2 * len(decoder.layers) * rows * decoder.kv_heads * (length + done) * decoder.head_dim * 2
    attention_ms = step_ms * attention_us / total_us
    return dict(step_ms=step_ms, attention_share=attention_us / total_us,
                cache_mb=cache_bytes / 1e6, read_gb_s=cache_bytes / (attention_ms / 1e3) / 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--rows", type=int, default=16, help="views decoded together (ttt_full's decode_batch_size)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[600, 1800, 3300, 5600])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    lm = benchmark_model(args.model, args.threads)
    reason = FastDecoder.unsupported(lm.model)
    if reason:
        sys.exit(f"long_prompt_step.py: the fast decoder does not support this model: {reason}")
    decoder = FastDecoder(lm.model)
    print(f"{args.rows} rows, {args.threads} thread(s); cache read per step = keys and values of every layer")
    print("prompt tokens | ms per step | attention share | cache MB | attention reads GB/s")
    for length in args.lengths:
        row = measure(decoder, args.rows, length, args.steps)
        print(f"{length:>13} | {row['step_ms']:>11.2f} | {row['attention_share']:>15.0%} | "
              f"{row['cache_mb']:>8.0f} | {row['read_gb_s']:>20.1f}")


if __name__ == "__main__":
    main()
