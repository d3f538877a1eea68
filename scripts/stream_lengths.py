"""How long are the sequences a pretraining run trains on?  Redraws every k-th batch of its
stream (the same batches `tta pretrain` drew: each is seeded by the run's seed and its step) and
counts the sequences, and their tokens, over a length.  Used to ask whether a run at
`--max-len 4096` saw enough long sequences to learn the longer context.

    python scripts/stream_lengths.py --data 'arc1-train*50,gen-train-large' --max-len 4096 \\
        --tokens-per-batch 16384 --steps 1529 --over 2048 --out FILE.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tta.model.loading import load_model  # noqa: E402
from tta.reporting.stats import wilson_interval  # noqa: E402
from tta.training.pretrain import PretrainConfig, draw_batch, load_training_tasks  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the run's --data")
    parser.add_argument("--max-len", type=int, required=True)
    parser.add_argument("--tokens-per-batch", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True, help="the run's steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=10, help="redraw every k-th batch")
    parser.add_argument("--over", type=int, default=2048, help="count sequences longer than this")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    config = PretrainConfig(data=[d.strip() for d in args.data.split(",")], drop_overlap=True,
                            max_len=args.max_len, tokens_per_batch=args.tokens_per_batch, seed=args.seed)
    tasks, _ = load_training_tasks(config, log=lambda _: None)
    fmt = load_model("default", device="cpu").format   # the embedded model's grid format
    lengths = [len(e) for step in range(0, args.steps, args.every)
               for e in draw_batch(tasks, fmt, np.random.default_rng([args.seed, step]), args.tokens_per_batch, args.max_len)]
    long = [n for n in lengths if n > args.over]
    low, high = wilson_interval(len(long), len(lengths))
    summary = {"sequences": len(lengths), f"over_{args.over}": len(long),
               "share_of_sequences": [round(len(long) / len(lengths), 4), round(low, 4), round(high, 4)],
               "share_of_tokens": round(sum(long) / sum(lengths), 4)}
    Path(args.out).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "summary": summary}, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
