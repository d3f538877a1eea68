"""Reasoning by sampling (`sampling`): spend the budget on generating and scoring many candidate
answers instead of (or after) training.

For each task:
1. adapt    -- nothing (`adapt=none`), or a per-task LoRA trained exactly as `ttt_lora` does
               (`adapt=ttt`: "TTT + sampling"; `reset` removes it);
2. generate -- candidates under several augmented views of the task, each mapped back to the
               original frame by the view's inverse transform:
               `search=sample`: temperature sampling, self-consistency (Wang et al. 2022);
               `search=dfs`: every completion above a probability threshold (0.09) by depth-first
               search over a shared KV cache (Franzen et al. 2025; `tta.inference.search.dfs`);
3. select   -- two attempts per test input:
               `select=vote`: the most frequent candidates (`vote=majority`), or the hierarchical
               vote of `ttt_lora` (`vote=hierarchical`);
               `select=poe`: "product of experts" -- each distinct candidate is teacher-forced
               under every view and the two with the lowest summed negative log-likelihood win.

Every generated and every scored token runs through the model, so the harness's meter charges
it.  Generation stops early enough to leave the scoring of a few candidates (`reserve_scored`);
with `adapt=ttt`, training leaves a share of the budget (`ttt_share`) for everything after it.
When the budget runs out at any point the method submits the best candidates it has (possibly
none), never an error.

How it spends a bigger budget: more samples.  With `samples=0` (the default) it samples in
rounds over the views (`prompt_copies` answers per view per round, drawn from one reading of the
view's prompt: the prompt's KV cache is copied, not recomputed) until the cap cannot pay for
another batch, at most `max_samples` per view (the record says when it stopped there).  DFS
searches the configured views, then (`fill_views`) more views -- the 8 dihedral transforms in
turn, each with a fresh colour permutation and demonstration order -- until the budget stops a
search or `max_views` per test input are searched; candidates are scored (`select=poe`) under the
configured views.

The paper's recipe (DFS at 0.09 in 16 views, PoE over the same views, after TTT) is
`--set search=dfs --set select=poe --set adapt=ttt` with more views; `--set select=vote` with
sampling is self-consistency.  By default sampling goes on until the budget is spent
(`samples=0`, at most `max_samples` per view), so it spends what the other methods may spend.
With a chat LLM and the text format the same code samples, searches and scores the answer
grids as text; no chain-of-thought variant is implemented or needed -- the answer is the grid.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from tta.data.augment import transforms_from_names
from tta.training.examples import leave_one_out_examples
from tta.inference.decoding import generate
from tta.method import AdapterMethod, MethodError, register, setting
from tta.inference.predict import MoreViews, answer_room, build_views, is_capped, vote
from tta.inference.search import dfs_many, poe_rank, scoring_reserve
from tta.data.tasks import MAX_SIZE, grid_key
from tta.training.finetune import LoRASettings, new_adapter, train_adapter


@dataclass
class SamplingConfig(LoRASettings):
    search: str = setting("sample", "how candidates are made: sample (temperature sampling) | dfs (all above threshold; "
                                    "without training, 5/40 against icl's 4/40 on arc1-heldout at 1e12 FLOPs)")
    select: str = setting("poe", "how the 2 attempts are chosen: vote | poe (product of experts, Franzen et al.)")
    adapt: str = setting("none", "none | ttt (first train a per-task LoRA as ttt_lora does, with the LoRA settings here)")
    max_examples: int = setting(250, "adapt=ttt: augmented leave-one-out examples per task (paper: 250)", at_least=1)
    transforms: list = setting(["identity", "rot90", "transpose", "flip_h"],
                               "views of the task (paper: 16 augmented views for DFS and scoring)")
    orders: int = setting(1, "demonstration orders per view", at_least=1)
    # 0 by default: a method compared on equal compute should be able to spend it.  A fixed 2 per
    # view spent ~2% of a 2e12-FLOP cap on gen-eval, and a ceiling of 32 per view stopped all 40
    # tasks of the default experiment at 19% of that cap.
    samples: int = setting(0, "search=sample: samples per view; 0 = as many as the budget pays for, up to max_samples (self-consistency papers use 20-40 in all)", at_least=0)
    max_samples: int = setting(256, "search=sample with samples=0: samples per view at most (and without a FLOP budget)", at_least=1)
    prompt_copies: int = setting(4, "search=sample: answers drawn from one reading of a view's prompt (its KV cache copied), per round over the views; 1 reads the prompt for every sample", at_least=1)
    temperature: float = setting(1.0, "search=sample: sampling temperature", at_least=0)
    top_p: float = setting(0.95, "search=sample: nucleus (top-p) cut-off", at_least=0, at_most=1)
    threshold: float = setting(0.09, "search=dfs: keep completions with probability above this (paper: 0.09)")
    max_forwards: int = setting(600, "search=dfs: model calls per view at most (the search stops there)", at_least=1)
    fill_views: bool = setting(True, "search=dfs, under a cap: after the configured views, search more (8 dihedral transforms x colour "
                                     "permutations x demonstration orders, as the paper draws its views) while the budget pays",
                               before=False)
    max_views: int = setting(512, "search=dfs with fill_views: views searched per test input at most", before=512, at_least=1)
    keep_greedy: bool = setting(True, "search=dfs: also keep each view's greedy answer when below the threshold")
    vote: str = setting("majority", "select=vote: majority (self-consistency) | hierarchical (ttt_lora's vote)")
    top_per_group: int = setting(3, "vote=hierarchical: answers kept per transform category", at_least=1)
    max_scored: int = setting(8, "select=poe: distinct candidates scored per test input, the most probable under the view that produced them first", at_least=1)
    reserve_scored: int = setting(2, "select=poe: generation stops early enough to score this many candidates in every view", at_least=0)
    ttt_share: float = setting(0.5, "adapt=ttt: share of the task's budget held back from training", at_least=0, at_most=1)
    decode_batch_size: int = setting(16, "sequences decoded or scored together", at_least=1)

    def __post_init__(self):
        super().__post_init__()
        for key, allowed in (("search", ("sample", "dfs")), ("select", ("vote", "poe")),
                             ("adapt", ("none", "ttt")), ("vote", ("majority", "hierarchical"))):
            if getattr(self, key) not in allowed:
                raise MethodError(f"--set {key}={getattr(self, key)}: expected one of {', '.join(allowed)}")
        if not 0 < self.threshold < 1:
            raise MethodError(f"--set threshold={self.threshold}: expected a probability between 0 and 1")
        try:
            transforms_from_names(self.transforms)
        except ValueError as e:
            raise MethodError(f"--set transforms: {e}") from None


@dataclass
class Candidate:
    test_index: int
    view: str            # the view's transform, for the hierarchical vote
    grid: np.ndarray     # in the original frame
    logprob: float       # under the view that produced it


def most_probable_first(candidates: list[Candidate]) -> list[np.ndarray]:
    """Distinct candidate grids, the one with the highest log-probability under the view that
    produced it first (a grid produced several times counts its best), ties to the first drawn:
    the shortlist that product-of-experts scoring works through."""
    best: dict[tuple, tuple[float, int, np.ndarray]] = {}
    for i, x in enumerate(candidates):
        key = grid_key(x.grid)
        if key not in best or x.logprob > best[key][0]:
            best[key] = (x.logprob, best.get(key, (0, i))[1], x.grid)
    return [grid for _, _, grid in sorted(best.values(), key=lambda b: (-b[0], b[1]))]


@register("sampling")
class Sampling(AdapterMethod):
    Config = SamplingConfig
    spends = "more samples per view (samples=0), up to max_samples; with search=dfs, more views searched (fill_views), up to max_views"

    # ---------------------------------------------------------------- 1. adapt

    def adapt(self, task, budget, seed):
        c = self.config
        if c.adapt == "none":
            return {}
        rng = np.random.default_rng(seed)
        examples = leave_one_out_examples(task, self.lm.format, rng, c.max_examples, max_len=self.lm.max_context)
        self.adapter = new_adapter(self.lm, c, seed)
        kept = c.ttt_share * (budget.cap.flops or 0.0)
        report = train_adapter(self.lm, [e.encoded for e in examples], budget.holding_back(kept, c.ttt_share), c, seed)
        return {"train_examples": len(examples), **report.as_dict()}

    # ---------------------------------------------------------------- 2. generate

    def views(self, task, seed):
        """All views of all test inputs, interleaved (every test input's identity view first), so a
        budget that runs out mid-way still leaves every test input some candidates."""
        c = self.config
        rng = np.random.default_rng(seed)
        views = build_views(self.lm, task, transforms_from_names(c.transforms), c.orders, rng)
        rank = Counter()
        keyed = []
        for v in views:
            keyed.append((rank[v.test_index], v.test_index, v))
            rank[v.test_index] += 1
        return [v for _, _, v in sorted(keyed, key=lambda k: k[:2])]

    def to_candidate(self, view, tokens, logprob):
        grid = self.lm.format.parse(tokens)
        if grid is None:
            return None
        return Candidate(view.test_index, view.augmentation.transform.name, view.augmentation.invert_grid(grid), logprob)

    def sample(self, views, room, budget, seed):
        """`samples` answers per view (0: until the budget is spent, at most `max_samples`), drawn
        in rounds over the views -- `prompt_copies` answers per view per round, from one reading of
        its prompt -- a batch at a time, so a budget that runs out part-way leaves samples spread
        over all views."""
        c = self.config
        per_view = c.samples or c.max_samples

        def cost(chunk, copies):   # each prompt read once, `copies` full-length answers after it
            prompts = budget.sequences_cost([len(v.prompt) for v in chunk])
            whole = budget.sequences_cost([len(v.prompt) + room for v in chunk])
            return prompts + copies * (whole - prompts)

        fill = c.samples == 0
        rounds = []   # (views, copies): every view, `copies` answers each
        for drawn in range(0, per_view, c.prompt_copies):
            rounds.append(min(c.prompt_copies, per_view - drawn))
        owners, gens, stopped = [], [], False
        for copies in rounds:
            group = max(1, c.decode_batch_size // copies)   # views per batch
            start = 0
            while start < len(views) and budget.can_afford(0.0):
                chunk, k = views[start:start + group], copies
                while len(chunk) > 1 and not budget.can_afford(cost(chunk, k)):
                    chunk = chunk[: len(chunk) // 2]   # a smaller batch when the budget is short
                while k > 1 and not budget.can_afford(cost(chunk, k)):
                    k //= 2                            # then fewer answers from the prompt
                if fill and gens and not budget.can_afford(cost(chunk, k)):
                    stopped = True   # filling: stop before samples the budget cannot finish
                    break
                gens += generate(self.lm, [v.prompt for v in chunk], budget, max_new_tokens=room,
                                 temperature=c.temperature, top_p=c.top_p, seed=seed + len(gens),
                                 batch_size=c.decode_batch_size, copies=k)
                owners += [v for v in chunk for _ in range(k)]
                start += len(chunk)
                if not gens[-1].tokens:
                    stopped = True   # not even the prompts could be paid for
                    break
            if stopped or start < len(views):
                break
        else:
            if fill:
                budget.out_of_work(f"max_samples reached ({c.max_samples} per view)")
        candidates = [self.to_candidate(v, g.tokens, g.logprob) for v, g in zip(owners, gens) if g.finished]
        tokens = sum(len(g.tokens) + g.finished for g in gens)
        return candidates, {"samples": len(gens), "finished": sum(g.finished for g in gens), "generated_tokens": tokens}

    def search(self, task, views, room, budget, seed):
        """Every view's depth-first search, `decode_batch_size` views side by side; then, with
        `fill_views`, more views a batch at a time until the budget stops a search."""
        c = self.config
        candidates, info = [], {"forwards": 0, "stopped_by_limit": 0, "stopped_by_budget": False, "searched_views": 0}

        def search_views(batch) -> bool:   # True when the budget stopped a search
            found = dfs_many(self.lm, [v.prompt for v in batch], budget, threshold=c.threshold, max_new_tokens=room,
                             max_forwards=c.max_forwards, keep_greedy=c.keep_greedy, batch_size=c.decode_batch_size)
            candidates.extend(self.to_candidate(v, x.tokens, x.logprob) for v, r in zip(batch, found) for x in r.completions)
            info["forwards"] += sum(r.forwards for r in found)
            info["stopped_by_limit"] += sum(r.stopped_by_limit for r in found)
            info["searched_views"] += sum(r.forwards > 0 for r in found)
            info["stopped_by_budget"] = any(r.stopped_by_budget for r in found)
            return info["stopped_by_budget"]

        stopped = search_views(views)
        if not stopped and not c.fill_views:
            budget.out_of_work("every view searched")
        elif not stopped and not is_capped(budget):
            budget.out_of_work("no cap: the configured views only")
        if stopped or not c.fill_views or not is_capped(budget):
            return candidates, info
        more = MoreViews(self.lm, task, np.random.default_rng([seed, 1]), c.max_views, len(views))
        while not stopped and (batch := more.next_batch(c.decode_batch_size, budget)):
            stopped = search_views(batch)
            more.used(len(batch))
        return candidates, info

    # ---------------------------------------------------------------- 3. select

    def predict(self, task, budget, seed):
        with self.merged():
            return self.predict_merged(task, budget, seed)

    def predict_merged(self, task, budget, seed):
        c = self.config
        views = self.views(task, seed)
        room = answer_room(self.lm.format, task)
        generation = budget.holding_back(*scoring_reserve(views, room, budget, c.reserve_scored)) if c.select == "poe" else budget
        if c.search == "sample":
            candidates, info = self.sample(views, room, generation, seed)
        else:
            candidates, info = self.search(task, views, room, generation, seed)
        candidates = [x for x in candidates if x is not None and max(x.grid.shape) <= MAX_SIZE]
        info.update({"views": len(views), "candidates": len(candidates), "distinct": [], "poe_nll": []})

        attempts = []
        for i in range(len(task.test)):
            mine = [x for x in candidates if x.test_index == i]
            info["distinct"].append(len({grid_key(x.grid) for x in mine}))
            if c.select == "poe":
                ranked, nlls = poe_rank(self.lm, [v for v in views if v.test_index == i], most_probable_first(mine),
                                        budget, c.max_scored)
                info["poe_nll"].append([round(x, 3) for x in nlls])
            else:
                ranked = vote([(x.view, x.grid) for x in mine], c.vote, c.top_per_group)
            attempts.append((list(ranked) + [None, None])[:2])
        return attempts, info
