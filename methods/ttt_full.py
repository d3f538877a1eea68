"""Per-task test-time training of every weight (`ttt_full`): `ttt_lora`'s recipe with the
whole model as the adapter.

The paper trains a LoRA because its models have 1-8B parameters; a LoRA there saves memory, not
accuracy.  The embedded model has a few million parameters, so a full copy per task costs a few
MB, and the question is only which adapter learns a task better from its demonstrations at the
same compute.  A full-weights backward also computes every weight's gradient, so each step costs
more than a LoRA step (the budget charges it) and the same cap buys fewer steps.

Everything else -- leave-one-out data, steps planned to the budget, augmented inference and the
hierarchical vote -- is `ttt_lora`'s; `--set adapter=lora` turns this back into it.
"""
from __future__ import annotations

from dataclasses import dataclass

from methods.ttt_lora import TTTConfig, TTTLoRA
from tta.method import register, setting


@dataclass
class TTTFullConfig(TTTConfig):
    adapter: str = setting("full", "full: fine-tune every weight per task, restored afterwards; lora: ttt_lora's adapter")


@register("ttt_full")
class TTTFull(TTTLoRA):
    Config = TTTFullConfig
    spends = "more full-weight training steps (planned to the budget), then more views"
