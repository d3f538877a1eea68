"""LESS-style gradient-based data selection (`less`), Xia et al. 2024, as a test-time method.

Once per run (`setup`, the one-off cost: recorded in the manifest and amortised over the run's
tasks in every report, i.e. each task's spend includes 1/n of it):
0. pool   -- augmented leave-one-out examples of ARC *training* tasks (`pool`, never the split
             being evaluated: an overlap by id or content is refused);
1. store  -- a gradient datastore of the pool (`methods.less.gradients`): warm-up LoRA, a checkpoint per
             epoch, Adam-preconditioned per-example gradients, randomly projected and normalised;
             cached on disk by (model weights, pool, settings) and reused by later runs.
For each task, all charged to its budget (every gradient is a metered forward+backward):
2. select -- SGD gradients of the task's own leave-one-out demonstrations through the same
             checkpoints and projection; score = sum over checkpoints of (mean lr) x cosine,
             averaged over the targets (or `aggregate=max`: averaged per held-out demonstration,
             maximised over them); keep the `top_k` pool examples;
3. adapt  -- a fresh LoRA trained on them (plus the task's own TTT data with `with_task_data`);
4. predict-- the same augmented inference and vote as `ttt_lora`;
5. reset  -- the adapter is removed.

How it spends a bigger budget: more selected examples, then more views.  After the targets'
gradients, the selection keeps the best-scoring pool examples for as long as `epochs` passes
over them fit what is left (keeping the configured views' cost back), at least `top_k` and at
most `max_selected`; training is planned to the budget; what remains buys more views.
The record of `adapt` lists the selected pool examples (task, augmentation, score).

Defaults are the paper's scaled to the embedded 3.4M-parameter model on a 2-core CPU; help
strings give the published values.
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

import methods.less.gradients as gradients
from tta.data.contamination import ContaminationError, describe_hits, fingerprint, overlap, to_drop
from tta.training.examples import leave_one_out_examples
from tta.method import AdapterMethod, MethodError, register, setting
from tta.inference.predict import RoomForViews, ViewSettings, predict_with_views, room_for_views
from tta.data.datasets import load_dataset
from tta.training.finetune import LoRASettings, new_adapter, train_adapter


@dataclass
class LESSConfig(LoRASettings, ViewSettings, RoomForViews):
    # ---- the pool
    pool: str = setting("arc1-train", "dataset the pool is drawn from (never the evaluated one), e.g. gen-train")
    pool_tasks: int = setting(100, "pool tasks, a seeded random subset (0 = all; paper: the whole pool; 100 keeps the CPU build to minutes)", at_least=0)
    pool_per_task: int = setting(4, "augmented leave-one-out examples per pool task (CPU default)", at_least=1)
    pool_max_len: int = setting(1024, "longest pool example in tokens, longer ones skipped (CPU default; ARC tasks run to ~2k)", at_least=1)
    pool_seed: int = setting(0, "seed of the pool and the datastore (not the run's seed, so the cache is shared)")
    drop_overlap: bool = setting(False, "leave pool tasks that overlap the evaluated tasks out of the pool instead of refusing")
    datastore_dir: str = setting("", "where datastores are cached (default $TTA_CACHE/datastores or ~/.cache/tta/datastores)")
    # ---- the gradient datastore (methods/less/gradients.py)
    gradient_rank: int = setting(8, "warm-up LoRA rank (paper: 128 at width 4096; scaled by width to 8 at 256)", at_least=1)
    gradient_alpha: int = setting(32, "warm-up LoRA alpha (paper: 512 = 4 x rank)", at_least=1)
    gradient_targets: list = setting(["q_proj", "k_proj", "v_proj", "o_proj"], "warm-up LoRA modules (paper: q/k/v/o)")
    warmup_fraction: float = setting(0.05, "share of the pool the warm-up trains on (paper: 0.05)", at_least=0, at_most=1)
    min_warmup_examples: int = setting(16, "at least this many warm-up examples (a small pool's 5% is a handful)", at_least=1)
    gradient_epochs: int = setting(4, "warm-up epochs = checkpoints (paper: 4)", at_least=1)
    gradient_lr: float = setting(1e-3, "warm-up AdamW peak lr, 3% linear warm-up then linear decay (paper: 2e-5 for 7B; the small model needs more)", at_least=0)
    # At 1024 dimensions the embedded model's nearly orthogonal gradients gave scores correlated
    # 0.67-0.95 (by projection seed) with the unprojected ones; 0.98-0.99 at 4096-8192.
    proj_dim: int = setting(4096, "random projection dimension (paper: 8192 for 7B; the embedded model's warm-up LoRA has 65k parameters)", at_least=1)
    proj_density: float = setting(0.0, "projection density (0 = 1/sqrt(n) sparse Rademacher; 1 = dense, as LESS)", at_least=0, at_most=1)
    # ---- selection
    top_k: int = setting(32, "pool examples kept per task at least (paper: top 5% of the pool; 32 is ~10% of the default pool)", at_least=1)
    max_selected: int = setting(128, "pool examples kept at most when the budget pays for more", at_least=1)
    aggregate: str = setting("mean", "mean over the targets, or max: mean per held-out demonstration, max over them (paper: max over subtasks)")
    target_views: int = setting(1, "copies of each leave-one-out target (1 = as given; more adds augmented views)", at_least=1)
    with_task_data: bool = setting(False, "also train on the task's own augmented leave-one-out examples (as ttt_lora)")
    task_examples: int = setting(250, "cap on the task's own examples when with_task_data (paper: 250)", at_least=1)

    def __post_init__(self):
        super().__post_init__()
        if self.aggregate not in ("mean", "max"):
            raise MethodError(f"--set aggregate={self.aggregate}: must be mean or max")
        if not 1 <= self.top_k <= self.max_selected:
            raise MethodError(f"--set top_k={self.top_k}, max_selected={self.max_selected}: expected 1 <= top_k <= max_selected")

    def gradient_settings(self) -> gradients.GradientSettings:
        return gradients.GradientSettings(
            rank=self.gradient_rank, alpha=self.gradient_alpha, targets=list(self.gradient_targets),
            warmup_fraction=self.warmup_fraction, min_warmup_examples=self.min_warmup_examples,
            epochs=self.gradient_epochs, lr=self.gradient_lr, proj_dim=self.proj_dim,
            proj_density=self.proj_density, seed=self.pool_seed)


def target_examples(task, fmt, rng, views: int, max_len: int):
    """The task's leave-one-out demonstrations as they are (views=1), or `views` augmented copies of each."""
    n = len(task.train)
    if views <= 1:
        return leave_one_out_examples(task, fmt, rng, n, max_len=max_len, transforms=[],
                                      permute_colours=False, shuffle_demos=False)
    return leave_one_out_examples(task, fmt, rng, n * views, max_len=max_len)


def pool_tasks_for(config: LESSConfig, evaluated: list) -> tuple[list, str, list[str]]:
    """The pool's tasks (after the overlap check), the pool's name, and the pool tasks dropped."""
    pool = load_dataset(config.pool)
    hits = overlap(fingerprint(pool.tasks), evaluated)
    dropped = []
    chosen = gradients.choose_pool_tasks(pool.tasks, config.pool_tasks, config.pool_seed)
    if hits:
        if not config.drop_overlap:
            raise ContaminationError(
                f"less: {len(hits)} of {len(evaluated)} evaluated tasks appear in the pool {config.pool} "
                f"(by id or content): {describe_hits(fingerprint(pool.tasks), evaluated, hits)}; "
                "choose another pool (--set pool=NAME) or --set drop_overlap=true")
        bad = to_drop(chosen, evaluated)   # the pool tasks that match an evaluated one
        dropped = sorted(t.id for t in chosen if t.id in bad)
        chosen = [t for t in chosen if t.id not in bad]
    return chosen, pool.name, dropped


def select_within(order: list[int], lengths: list[int], budget, epochs: int, least: int, most: int) -> list[int]:
    """The best-scoring pool examples (`order`, best first) for as long as `epochs` passes over
    them fit the budget, at least `least` (training then runs as far as it can) and at most `most`."""
    chosen, cost = [], 0.0
    for i in order[:most]:
        cost += epochs * budget.training_cost([lengths[i]])
        if len(chosen) >= least and not budget.can_afford(cost):
            break
        chosen.append(i)
    return chosen


@register("less")
class LESS(AdapterMethod):
    """ttt_lora with another choice of training data."""
    Config = LESSConfig
    spends = "more selected pool examples (top_k to max_selected) and training steps, then more views"

    @classmethod
    def check_tasks(cls, config, tasks):
        pool_tasks_for(config, tasks)   # refuses a pool that overlaps the evaluated tasks

    def setup(self, tasks):
        c = self.config
        chosen, pool_name, dropped = pool_tasks_for(c, tasks)
        examples = gradients.pool_examples(chosen, self.lm.format, c.pool_per_task, c.pool_max_len, c.pool_seed)
        settings = c.gradient_settings()
        self.store, built = gradients.load_or_build(   # a progress bar on a terminal, not in logs
            self.lm, examples, settings, root=c.datastore_dir or None, progress=sys.stderr.isatty(),
            extra_meta={"pool": pool_name, "pool_tasks": [t.id for t in chosen], "model": self.lm.spec})
        meta = self.store.meta
        return {
            "what": (f"LESS gradient datastore: warm-up LoRA r={settings.rank} on {meta['warmup']['examples']} "
                     f"examples x {settings.epochs} epochs, then {len(self.store)} pool examples from "
                     f"{len(chosen)} {pool_name} tasks x {settings.epochs} checkpoints projected to {meta['proj_dim']} dims"),
            # Charged as its share per task: every report adds flops / tasks to each task's spend,
            # whether this run built the datastore or found it cached.
            "flops": meta["build"]["flops"], "seconds": meta["build"]["seconds"], "charged": "amortised",
            "cached": not built, "datastore": str(self.store.path), "pool": pool_name,
            "pool_examples": len(self.store), "pool_tasks": len(chosen), "dropped_overlap": dropped,
        }

    def adapt(self, task, budget, seed):
        c, lm, store = self.config, self.lm, self.store
        rng = np.random.default_rng(seed)
        # Priced with the adapter's rank: prediction runs through the adapter trained below.
        after_selection = room_for_views(lm, task, budget, c)

        # 1. target gradients and scores (charged: metered forwards+backwards), within the budget
        started = time.perf_counter()
        targets = target_examples(task, lm.format, rng, c.target_views, lm.max_context)
        afford = lambda e: after_selection.can_afford(after_selection.training_cost([len(e)]))
        feats = store.target_features(lm, [t.encoded for t in targets], afford) if targets else np.zeros((0, 0, 0))
        selected, scores = [], None
        groups = [t.held_out[0] for t in targets]
        n_groups = len(set(groups)) if c.aggregate == "max" else 1
        dot_products = 2.0 * feats.shape[0] * n_groups * len(store) * feats.shape[2] if feats.shape[0] > 0 else 0.0
        if feats.shape[0] > 0 and budget.can_afford(dot_products):   # asked first: a charge past the cap fails the task
            scores = gradients.score(store.features, store.lrs, feats, groups, c.aggregate)
            budget.charge(dot_products)
            order = [int(i) for i in np.argsort(-scores, kind="stable")]
            lengths = [len(store.encoded(i)) for i in range(len(store))]
            selected = select_within(order, lengths, after_selection, c.epochs, c.top_k, c.max_selected)
        selection_seconds = time.perf_counter() - started

        # 2. a fresh adapter on the selected examples (and the task's own, if asked)
        data = [store.encoded(i) for i in selected]
        own = 0
        if c.with_task_data:
            own_examples = leave_one_out_examples(task, lm.format, rng, c.task_examples, max_len=lm.max_context)
            data += [e.encoded for e in own_examples]
            own = len(own_examples)
        self.adapter = new_adapter(lm, c, seed)
        report = train_adapter(lm, data, room_for_views(lm, task, budget, c), c, seed)
        picks = [{"task_id": store.examples[i]["task_id"], "augmentation": store.examples[i]["augmentation"],
                  "held_out": store.examples[i]["held_out"], "index": i, "score": round(float(scores[i]), 6)}
                 for i in selected]
        return {"targets": len(targets), "checkpoints_used": int(feats.shape[0]),
                "selection_seconds": round(selection_seconds, 3),
                "score_mean": None if scores is None else round(float(scores.mean()), 6),
                "selected": picks, "selected_tasks": dict(Counter(p["task_id"] for p in picks).most_common()),
                "train_examples": len(data), "task_examples": own, **report.as_dict()}

    def predict(self, task, budget, seed):
        with self.merged():
            return predict_with_views(self.lm, task, budget, self.config, seed)
