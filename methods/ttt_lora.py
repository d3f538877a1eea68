"""Per-task LoRA test-time training (`ttt_lora`), Akyürek et al. 2024.

For each task:
1. data   -- augmented leave-one-out copies of its demonstrations (cap 250);
2. adapt  -- a fresh LoRA adapter (peft) trained on them, loss on outputs only;
3. predict-- augmented inference under 6 views x 2 orders, hierarchical vote;
4. reset  -- the adapter is removed; the next task starts from the base model.

Defaults follow the paper except where the embedded model is far smaller than
the paper's 1B-8B models (help strings give the published values): a LoRA rank
matched to its width.  Training stops early when the task's budget could no
longer pay for the prediction that follows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tta.augment import transforms_from_names
from tta.data import leave_one_out_examples
from tta.method import Method, register, setting
from tta.predict import answer_room, build_views, predict_augmented
from tta.budget import attention_context, forward_flops
from tta.training import attach_lora, detach_lora, train


@dataclass
class TTTConfig:
    max_examples: int = setting(250, "augmented leave-one-out examples per task (paper: 250)")
    rank: int = setting(32, "LoRA rank (paper: 128 for 1B-8B models)")
    alpha: int = setting(32, "LoRA alpha (paper: 16)")
    targets: list = setting(["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
                            "modules that get adapters (paper: q, v and the MLP)")
    # The paper's 8B value.  Measured with the shipped model on 10 gen-eval tasks outside the
    # reported 40-task sample (2e12 FLOPs/task): true-answer NLL 0.185 / 0.196 / 0.246 at
    # lr 1e-4 / 3e-4 / 1e-3 (in-context 0.195); 1e-3 suited the earlier, weaker model.
    lr: float = setting(1e-4, "AdamW learning rate (paper: 5e-5 for 1B/3B, 1e-4 for 8B)")
    weight_decay: float = setting(0.01, "AdamW weight decay (paper: 0.01)")
    epochs: int = setting(2, "passes over the task's examples (paper: 2)")
    batch_size: int = setting(2, "examples per step (paper: 2)")
    warmup_ratio: float = setting(0.1, "share of steps with linear warm-up before the cosine decay (paper: 0.1)")
    transforms: list = setting(["identity", "rot90", "rot180", "flip_h", "flip_v", "transpose"],
                               "views for augmented inference (paper: identity, rot90/180, three flips)")
    orders: int = setting(2, "demonstration orders per view (paper: 2)")
    top_per_group: int = setting(3, "answers kept per view before the global vote (paper: 3)")
    decode_batch_size: int = setting(16, "prompts decoded together")


def prediction_cost(lm, task, meter, transforms, orders) -> float:
    """FLOPs the prediction will need (prompts plus full-length answers), reserved while training."""
    views = build_views(lm, task, transforms, orders, np.random.default_rng(0))
    room = answer_room(lm.format, task)
    shape = meter._shape(lm.model)
    return sum(forward_flops(shape, len(v.prompt) + room, attention_context(0, len(v.prompt) + room)) for v in views)


@register("ttt_lora")
class TTTLoRA(Method):
    Config = TTTConfig

    def adapt(self, task, meter, seed):
        c = self.config
        rng = np.random.default_rng(seed)
        examples = leave_one_out_examples(task, self.lm.format, rng, c.max_examples,
                                          max_len=self.lm.max_context)
        self._adapter = attach_lora(self.lm, c.rank, c.alpha, c.targets, seed=seed)
        reserve = prediction_cost(self.lm, task, meter, transforms_from_names(c.transforms), c.orders)
        report = train(self.lm, [e.encoded for e in examples], meter, lr=c.lr, epochs=c.epochs,
                       batch_size=c.batch_size, weight_decay=c.weight_decay, warmup_ratio=c.warmup_ratio,
                       seed=seed, reserve_flops=reserve)
        return {"train_examples": len(examples), **report.as_dict()}

    def predict(self, task, meter, seed):
        c = self.config
        return predict_augmented(self.lm, task, meter, transforms_from_names(c.transforms), c.orders,
                                 seed=seed, batch_size=c.decode_batch_size, top_per_group=c.top_per_group)

    def reset(self):
        if getattr(self, "_adapter", None) is not None:
            detach_lora(self.lm, self._adapter)
            self._adapter = None
