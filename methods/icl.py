"""In-context only (`icl`): the base model reads the demonstrations and the test input and
decodes the answer greedily; no weights change.

With the default views this is the paper's "FT" baseline: the same augmented inference and
hierarchical vote as `ttt_lora`, so the two differ only in the adaptation.

How it spends a bigger budget: more views.  The configured views (6 transforms x 2
demonstration orders) come first; while the cap pays for another whole view, more follow --
the 8 dihedral transforms with fresh colour permutations and demonstration orders, as the
Product-of-Experts recipe draws its views -- each one more vote, up to `max_views` per test
input (the record says when it stopped there), or with `--set settle=S` until S fill batches in
a row leave the vote's attempts unchanged.  `--set transforms=identity --set orders=1
--set fill_views=false` gives plain greedy decoding (attempt 2 is then empty).
"""
from __future__ import annotations

from dataclasses import dataclass

from tta.method import Method, register
from tta.inference.predict import ViewSettings, predict_with_views


@dataclass
class ICLConfig(ViewSettings):
    pass


@register("icl")
class ICL(Method):
    Config = ICLConfig
    spends = "more views (8 dihedral transforms x colour permutations x demonstration orders), up to max_views per test input (or until the vote settles, with settle)"

    def predict(self, task, budget, seed):
        return predict_with_views(self.lm, task, budget, self.config, seed)
