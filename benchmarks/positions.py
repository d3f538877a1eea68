"""Grid position ids against plain ones: the same pretraining run twice (same data, seed,
minutes, model size), once numbering tokens with `tta.model.encoding.GridPositions` and once 0, 1,
2, ...; then greedy single-view answers of both models on the same gen-eval tasks.  Prints the
final training loss, answers of the right shape, attempt cell accuracy and exact matches.

    python benchmarks/positions.py [--minutes 6] [--tasks 60] [--out /tmp/positions]

Measured on the 2-core CPU (6 minutes each, gen-train, 2.3M tokens each):
grid loss 0.41, 35/60 right-shaped, cell accuracy 0.369, 0 exact;
sequential loss 0.84, 0/60 right-shaped, cell accuracy 0.000, 0 exact.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tta.inference.decoding import generate
from tta.model.loading import load_model
from tta.inference.predict import answer_room
from tta.training.pretrain import PretrainConfig, pretrain
from tta.data.datasets import load_dataset, select


def greedy_scores(model_dir: Path, n_tasks: int) -> dict:
    lm = load_model(str(model_dir))
    dataset = load_dataset("gen-eval")
    ids = dataset.ids[:: max(1, len(dataset.ids) // n_tasks)][:n_tasks]   # every k-th id: many families
    tasks = select(dataset, task_ids=ids).tasks
    prompts = [lm.format.encode(list(t.train), t.test[0].input).input_ids for t in tasks]
    gens = generate(lm, prompts, max_new_tokens=max(answer_room(lm.format, t) for t in tasks))
    shape_ok, exact, cells = 0, 0, []
    for task, gen in zip(tasks, gens):
        grid = lm.format.parse(gen.tokens) if gen.finished else None
        truth = task.test[0].output
        right_shape = grid is not None and grid.shape == truth.shape
        shape_ok += right_shape
        exact += right_shape and bool((grid == truth).all())
        cells.append(float((grid == truth).mean()) if right_shape else 0.0)
    return {"tasks": len(tasks), "shape_ok": shape_ok, "exact": exact, "cell_acc": float(np.mean(cells))}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("/tmp/positions"))
    args = parser.parse_args()
    for positions in ("grid", "sequential"):
        out = args.out / positions
        config = PretrainConfig(data=["gen-train"], drop_overlap=True, minutes=args.minutes, positions=positions)
        state = pretrain(config, out, log=lambda _: None)
        scores = greedy_scores(out, args.tasks)
        print(f"{positions:10s}  {state['tokens']:,} tokens  final loss {state['curve'][-1]['loss']:.3f}  "
              f"right shape {scores['shape_ok']}/{scores['tasks']}  cell acc {scores['cell_acc']:.3f}  "
              f"exact {scores['exact']}/{scores['tasks']}")


if __name__ == "__main__":
    main()
