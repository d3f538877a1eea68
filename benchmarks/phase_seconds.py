"""How a method's seconds split between `adapt` and `predict` at a FLOP cap, per task.

    python benchmarks/phase_seconds.py --method ttt_lora --budget-flops 5e11 --limit 4

Why: under a seconds cap the time kept for prediction cannot be priced the way FLOPs are, so
the methods that train first keep a share of it (`views_seconds_share`); this measures the
share they take when FLOPs decide.  Development split only (arc1-heldout by default).
"""
from __future__ import annotations

import argparse
import time

from tta.budget import Budget
from tta.data.datasets import load_dataset
from tta.method import discover, get_method, make_config
from tta.model.loading import load_model
from tta.run.solve import run_task


def timed(phases: dict, name: str, work):
    def wrapper(task, budget, seed):
        started, spent = time.perf_counter(), budget.spent
        out = work(task, budget, seed)
        phases[name] = (time.perf_counter() - started, budget.spent - spent)
        return out
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--method", default="ttt_lora")
    parser.add_argument("--dataset", default="arc1-heldout")
    parser.add_argument("--budget-flops", type=float, default=5e11)
    parser.add_argument("--limit", type=int, default=4)
    args = parser.parse_args()
    discover()
    lm = load_model("default")
    cls = get_method(args.method)
    method = cls(make_config(cls, []), lm)
    phases: dict = {}
    method.adapt, method.predict = timed(phases, "adapt", method.adapt), timed(phases, "predict", method.predict)
    print("task      adapt s  adapt FLOPs  predict s  predict FLOPs  predict share of seconds")
    for task in load_dataset(args.dataset).tasks[:args.limit]:
        run_task(method, lm, task, Budget(flops=args.budget_flops), seed=0)
        (adapt_s, adapt_f), (predict_s, predict_f) = phases["adapt"], phases["predict"]
        print(f"{task.id}  {adapt_s:7.1f}  {adapt_f:11.3g}  {predict_s:9.1f}  {predict_f:13.3g}  "
              f"{predict_s / (adapt_s + predict_s):.2f}")


if __name__ == "__main__":
    main()
