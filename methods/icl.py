"""In-context only (`icl`): the base model reads the demonstrations and the test input and
decodes the answer greedily; no weights change.

With the default views this is the paper's "FT" baseline: the same augmented
inference and hierarchical vote as `ttt_lora`, so the two differ only in the
adaptation.  `--set transforms='["identity"]' --set orders=1` gives plain
greedy decoding (attempt 2 is then empty).
"""
from __future__ import annotations

from dataclasses import dataclass

from tta.augment import transforms_from_names
from tta.method import Method, register, setting
from tta.predict import predict_augmented


@dataclass
class ICLConfig:
    transforms: list = setting(["identity", "rot90", "rot180", "flip_h", "flip_v", "transpose"],
                               "views for augmented inference (paper: identity, rot90/180, three flips)")
    orders: int = setting(2, "demonstration orders per view (paper: 2)")
    top_per_group: int = setting(3, "answers kept per view before the global vote (paper: 3)")
    batch_size: int = setting(16, "prompts decoded together")


@register("icl")
class ICL(Method):
    Config = ICLConfig

    def predict(self, task, meter, seed):
        c = self.config
        return predict_augmented(self.lm, task, meter, transforms_from_names(c.transforms), c.orders,
                                 seed=seed, batch_size=c.batch_size, top_per_group=c.top_per_group)
