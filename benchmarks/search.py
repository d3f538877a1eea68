"""Depth-first search over a task's augmented views side by side (`tta.inference.search.dfs_many`:
one model call expands the next node of every view's search, each at its own depth) against the
views searched one at a time (`batch_size=1`: what `dfs` does for each), same model, same run.

Both ways visit the same nodes (up to a node whose probability bf16 rounding moves across the
threshold; the script prints both counts and whether the answers agree), so the speed-up is the
ratio of wall times.  Default: the sampling method's `search=dfs` settings (threshold 0.09, the
greedy answer kept, at most 600 forwards per view) over its 4 default views.

    python benchmarks/search.py [--model SPEC] [--tasks 3] [--views 4|8] [--threads N] [--repeats 3]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import benchmark_model  # noqa: E402
from decoding import timed_run  # noqa: E402

from tta.data.augment import DIHEDRAL  # noqa: E402
from tta.data.datasets import load_dataset  # noqa: E402
from tta.inference.predict import answer_room, build_views  # noqa: E402
from tta.inference.search import dfs_many  # noqa: E402

SETTINGS = dict(threshold=0.09, keep_greedy=True, max_forwards=600)   # the sampling method's defaults


def workload(lm, tasks, n_views: int):
    """(the views' prompts, the answer's room) per task: the first `n_views` dihedral views
    (identity, rot90, rot180, rot270; then the flips)."""
    return [([v.prompt for v in build_views(lm, task, list(DIHEDRAL[:n_views]), 1, np.random.default_rng(0))],
             answer_room(lm.format, task)) for task in tasks]


def search_all(lm, work, batch_size: int):
    return [r for prompts, room in work
            for r in dfs_many(lm, prompts, None, max_new_tokens=room, batch_size=batch_size, **SETTINGS)]


def answers(results):
    return [[tuple(c.tokens) for c in r.completions] for r in results]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--dataset", default="gen-eval")
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--views", type=int, default=4, choices=range(1, 9), help="views per task (1-8)")
    parser.add_argument("--threads", type=int, help="torch threads (default: the usable cores)")
    parser.add_argument("--repeats", type=int, default=3, help="times each way is timed (the median counts)")
    args = parser.parse_args()
    lm = benchmark_model(args.model, threads=args.threads)
    work = workload(lm, load_dataset(args.dataset).tasks[: args.tasks], args.views)
    search_all(lm, work[:1], len(work[0][0]))   # warm-up
    alone_s, alone = timed_run(lambda: search_all(lm, work, 1), repeats=args.repeats)
    together_s, together = timed_run(lambda: search_all(lm, work, args.views), repeats=args.repeats)
    nodes = lambda results: sum(r.forwards for r in results)
    print(f"model {lm.spec}: {len(work)} tasks x {args.views} views, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} runs")
    print(f"one view at a time:   {alone_s:6.2f} s, {nodes(alone)} forwards, {nodes(alone) / alone_s:,.0f} per s")
    print(f"views side by side:   {together_s:6.2f} s, {nodes(together)} forwards, {nodes(together) / together_s:,.0f} per s")
    print(f"speed-up: {alone_s / together_s:.1f}x; same answers in "
          f"{sum(a == b for a, b in zip(answers(alone), answers(together)))} of {len(alone)} views")


if __name__ == "__main__":
    main()
