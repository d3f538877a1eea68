"""Trivial floors: answers that need no model, so every report shows how far a method is above
doing nothing.

* `copy_input` -- both attempts are the test input (many ARC outputs are edits of the input:
  a copy scores high cell accuracy and, rarely, exact matches).
* `common_output` -- the demonstration output seen most often (ties: the last one), then the
  runner-up; right for tasks whose answer is constant.
"""
from __future__ import annotations

from collections import Counter

from tta.method import Method, register
from tta.data.tasks import grid_key


@register("copy_input")
class CopyInput(Method):
    needs_model = False
    spends = "nothing: no model, no compute"

    def predict(self, task, budget, seed):
        budget.out_of_work("a floor: no model, nothing to spend")
        return [[p.input, None] for p in task.test], {}


@register("common_output")
class CommonOutput(Method):
    needs_model = False
    spends = "nothing: no model, no compute"

    def predict(self, task, budget, seed):
        budget.out_of_work("a floor: no model, nothing to spend")
        outputs = [p.output for p in task.train]
        counts = Counter(grid_key(g) for g in outputs)
        by_key = {grid_key(g): g for g in outputs}
        order = sorted(counts, key=lambda k: (-counts[k], -max(i for i, g in enumerate(outputs) if grid_key(g) == k)))
        attempts = [by_key[k] for k in order[:2]] + [None]
        return [attempts[:2] for _ in task.test], {}
