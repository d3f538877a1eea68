"""Whether the watch on bare products (`tta.budget._BareProductWatch`) changes what any built-in
method spends: each method on the first 2 arc1-heldout tasks at 2e11 FLOPs, with the watch off
and on.  Built-in methods write no bare products of their own (the harness's fast decoder and
LoRA merge run in `harness_products`), so every spend and answer must be the same; a difference
means harness work is charged twice.  About 4 minutes on 2 cores.  (`less` needs the datastore
`tta run` builds first; tests/test_less.py runs it end to end under the watch, at a cap so tight
that a charged adapter merge would fail it.)

    python benchmarks/builtin_spend_under_watch.py [METHOD ...]
"""
from __future__ import annotations

import contextlib
import sys

import torch

import tta.budget
from tta.budget import Budget
from tta.data.datasets import load_dataset
from tta.method import get_method, make_config
from tta.model.loading import load_model
from tta.run.solve import run_task


class _NoWatch(contextlib.nullcontext):
    def __init__(self, meter):
        super().__init__()


def spend(name: str, lm, task, watched: bool) -> tuple:
    real = tta.budget._BareProductWatch
    tta.budget._BareProductWatch = real if watched else _NoWatch
    try:
        cls = get_method(name)
        record = run_task(cls(make_config(cls), lm), lm, task, Budget(flops=2e11), seed=0)
    finally:
        tta.budget._BareProductWatch = real
    return record.flops, record.error, record.correct


if __name__ == "__main__":
    torch.set_num_threads(2)
    lm = load_model("default", device="cpu")
    differing = 0
    for name in sys.argv[1:] or ["icl", "sampling", "ttt_lora", "ttt_full"]:
        for task in load_dataset("arc1-heldout").tasks[:2]:
            off, on = spend(name, lm, task, False), spend(name, lm, task, True)
            differing += off != on
            print(f"{name} {task.id}: off {off[0]:.6g} FLOPs, on {on[0]:.6g} FLOPs, "
                  f"{'same' if off == on else 'DIFFERENT'} (answers {off[2]} / {on[2]}, errors {off[1]} / {on[1]})",
                  flush=True)
    sys.exit(1 if differing else 0)
