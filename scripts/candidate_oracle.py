"""Is the true answer among the candidates, and does the vote pick it?  A diagnostic for
`ttt_full` (or `ttt_lora`, or `icl`, which trains nothing): for each task, train as the method
does under the cap, decode the
views as its prediction does (configured views, then more while the budget pays), and report per
test output: the views decoded, the distinct answers, whether the true answer is among them,
and its rank under the hierarchical vote and under product-of-experts scoring (the 8 best by
the vote, each scored under the configured views; the scoring is not charged to the cap).

If the true answer is rarely among the candidates where the method fails, a better selection
cannot help; more or better candidates (or a better model) must.

    python scripts/candidate_oracle.py --dataset arc1-heldout --limit 20 --budget-flops 1e12 \
        --out reports/runs/levers/candidate-oracle-1e12.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tta.budget import Budget, Meter  # noqa: E402
from tta.data.augment import transforms_from_names  # noqa: E402
from tta.data.datasets import load_dataset  # noqa: E402
from tta.data.tasks import TaskError  # noqa: E402
from tta.data.tasks import grid_key  # noqa: E402
from tta.inference.predict import decode_augmented  # noqa: E402
from tta.inference.search import poe_rank  # noqa: E402
from tta.inference.voting import hierarchical_vote  # noqa: E402
from tta.method import discover, get_method, make_config  # noqa: E402
from tta.model.loading import load_model  # noqa: E402
from tta.run.solve import seed_everything, task_seed  # noqa: E402


def candidates(lm, method, task, budget, seed):
    """(configured views, (view, grid) for every view decoded), as the method's prediction decodes them."""
    c = method.config
    return decode_augmented(lm, task, budget, transforms_from_names(c.transforms), c.orders,
                            np.random.default_rng(seed), c.decode_batch_size, c.leave_one_out_prompts,
                            c.fill_views, c.max_views)


def rank_of(key, grids) -> int | None:
    keys = [grid_key(g) for g in grids if g is not None]
    return keys.index(key) if key in keys else None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="ttt_full")
    parser.add_argument("--dataset", default="arc1-heldout")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--budget-flops", type=float, default=1e12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    try:
        tasks = load_dataset(args.dataset).tasks[: args.limit]
    except TaskError as e:
        parser.error(str(e))
    torch.set_num_threads(1)
    discover()
    cls = get_method(args.method)
    lm = load_model("default", device="cpu")
    method = cls(make_config(cls, []), lm, args.seed)
    rows = []
    for task in tasks:
        seed = task_seed(args.seed, task.id)
        seed_everything(seed)
        meter = Meter(Budget(flops=args.budget_flops))
        meter.attach(lm.model)
        try:
            method.adapt(task, meter.handle(lm.model), seed)
            with getattr(method, "merged", contextlib.nullcontext)():   # icl has no adapter
                views, decoded = candidates(lm, method, task, meter.handle(lm.model), seed)
                meter.detach()   # the candidates are in; scoring them is the diagnostic's, not the cap's
                unmetered = Meter(Budget())
                unmetered.attach(lm.model)
                for i, pair in enumerate(task.test):
                    truth = grid_key(pair.output)
                    predictions = [(v.augmentation.transform.name, g) for v, g in decoded if v.test_index == i]
                    found = [grid_key(g) for _, g in predictions if g is not None]
                    shortlist = [g for g in hierarchical_vote(predictions, method.config.top_per_group, n_attempts=8)
                                 if g is not None]
                    by_poe, _ = poe_rank(lm, [v for v in views if v.test_index == i], shortlist,
                                         unmetered.handle(lm.model), 8)
                    rows.append({"task": task.id, "test": i, "views": len(predictions), "distinct": len(set(found)),
                                 "true_among_candidates": truth in found, "votes_for_true": found.count(truth),
                                 "vote_rank": rank_of(truth, shortlist), "poe_rank": rank_of(truth, by_poe)})
                    print(rows[-1], flush=True)
                unmetered.detach()
        finally:
            method.reset()
            meter.detach()
    in_top2 = lambda key: sum(r[key] is not None and r[key] < 2 for r in rows)
    summary = {"test_outputs": len(rows), "true_among_candidates": sum(r["true_among_candidates"] for r in rows),
               "vote_top2": in_top2("vote_rank"), "poe_top2": in_top2("poe_rank")}
    Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "summary": summary, "rows": rows}, indent=1))
    print(summary)


if __name__ == "__main__":
    main()
