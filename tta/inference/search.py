"""Depth-first search for every likely answer (Franzen et al., "Product of Experts", 2025).

`dfs` returns every completion of a prompt whose probability is above a
threshold (0.09 in the paper), most probable first.  Because the log-
probability of a prefix only falls as tokens are added, a branch is dropped as
soon as its prefix falls below the threshold; at most 1/threshold completions
can pass, and at most that many prefixes of any one length, so the search
visits at most ~(1/threshold) x (answer length) nodes.

Cost: the prompt is computed once; every node after that is *one* token fed
through the model on top of the shared KV cache.  When the search backtracks, the
node's token is written at its depth and attends only to the positions before it
(depth-first order guarantees the cache then holds exactly the branch's prefix
there), so no prefix is ever recomputed.  `dfs_many` searches several prompts (a
task's augmented views) side by side: one model call expands the next node of
every search, each at its own depth (`FastDecoder.step_at`).  For the embedded
model and 4 views of a task that halves the search's time (`benchmarks/search.py`).
The prompts and the nodes run through the batched decoder's stepper
(`tta.inference.decoding.decode_steps`: the fast decoder for Llama models, which
charges the meter as the model's forward would, else the forward itself, one
prompt at a time); before each call the search asks the task's budget whether
it can pay and stops (returning what it has) when not.

Tokens follow the output grammar of the model's format (for the compact format:
rectangular grids, at most 30x30; see `tta.inference.decoding.GridGrammar`) and the
next-token distribution is renormalised over the allowed tokens, as in
`tta.inference.decoding.generate`, so DFS and sampling see the same distribution.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from tta.budget import attention_context
from tta.inference.decoding import crop_cache, decode_steps, grammar_constraint, outside_the_watch
from tta.model.batching import pad_batch
from tta.model.encoding import positions_of
from tta.model.loading import cache_keyword, LoadedModel, autocast, autocast_weights, output_cache

THRESHOLD = 0.09   # the paper's probability threshold


@dataclass
class Completion:
    tokens: list[int]     # answer tokens, end-of-sequence excluded
    logprob: float        # sum of log-probabilities, end-of-sequence included

    @property
    def prob(self) -> float:
        return math.exp(self.logprob)


@dataclass
class SearchResult:
    completions: list[Completion] = field(default_factory=list)  # most probable first
    forwards: int = 0               # model calls, the prompt's included
    tokens: int = 0                 # tokens fed through the model, the prompt's included
    stopped_by_budget: bool = False
    stopped_by_limit: bool = False  # `max_forwards` reached before the search was complete


@dataclass
class _Node:
    tokens: tuple[int, ...]
    nll: float
    grammar: object
    on_greedy: bool       # every token so far was the most probable one
    positions: object     # the format's position tracker, fed up to the node's last token
    position: int = 0     # the position id of the node's last token


def _advance(grammar, token: int, device):
    child = copy.copy(grammar)   # the grammar's update() rebinds its tensors, never writes in place
    child.update(torch.tensor([token], device=device))
    return child


def _number(tracker, token: int):
    """A copy of the position tracker fed `token`, and that token's position id."""
    child = copy.copy(tracker)   # trackers hold plain integers: a shallow copy is independent
    return child, child.feed(token)


def _forward(model, device, ids: list[int], positions: list[int], n_past: int, cache, keep: int):
    n = n_past + len(ids)
    with autocast(device):
        return model(input_ids=torch.tensor([ids], device=device),
                     attention_mask=torch.ones((1, n), dtype=torch.long, device=device),
                     position_ids=torch.tensor([positions], device=device),
                     use_cache=True, logits_to_keep=keep, **{cache_keyword(): cache})


def dfs(lm: LoadedModel, prompt: list[int], budget=None, threshold: float = THRESHOLD,
        max_new_tokens: int | None = None, max_forwards: int | None = None,
        keep_greedy: bool = False, fast: bool = True) -> SearchResult:
    """Every completion of `prompt` with probability above `threshold`, most probable first.

    `max_new_tokens` bounds an answer's length (end-of-sequence included); completions cut by it,
    or by the model's context, are not returned.  `max_forwards` caps the nodes expanded (the
    prompt counts as one).  With `keep_greedy` the greedy completion is followed to its end and
    returned whatever its probability (the paper's `max_score_greedy` set to infinity).
    `budget` is the task's `tta.budget.TaskBudget` (None: unlimited).  `fast=False` runs every
    forward through the model's own (for comparisons).
    """
    return dfs_many(lm, [prompt], budget, threshold, max_new_tokens, max_forwards, keep_greedy, fast)[0]


@dataclass
class _Search:
    """One prompt's search in progress."""
    prompt: list[int]
    limit: int                 # answer tokens at most, end-of-sequence included
    result: SearchResult
    node: _Node | None = None  # the node whose next-token logits the last forward computed
    stack: list[_Node] = field(default_factory=list)


@torch.no_grad()
def dfs_many(lm: LoadedModel, prompts: list[list[int]], budget=None, threshold: float = THRESHOLD,
             max_new_tokens: int | None = None, max_forwards: int | None = None, keep_greedy: bool = False,
             fast: bool = True, batch_size: int = 16) -> list[SearchResult]:
    """`dfs` of every prompt (arguments as there), up to `batch_size` searches side by side: each
    model call expands the next node of every search in the batch, each at its own depth, so a
    call costs little more than one search's (the fast decoder's `step_at`; through the model's
    forward, one prompt at a time).  Each search visits the nodes it would alone (up to a node
    whose probability the batched products' rounding moves across the threshold).

    Under a cap the searches of a batch advance together, so a cut shares the budget among the
    batch's prompts (a depth-first search finds its greedy answer first) instead of finishing the
    first ones: when the budget cannot pay for every search's next node, the later searches stop
    first, and the prompts after the batch are not searched (empty results, `stopped_by_budget`)."""
    model, device, fmt = lm.model, lm.device, lm.format
    results = [SearchResult() for _ in prompts]
    was_training = model.training
    model.eval()
    steps = decode_steps(model, device, fast)
    per_batch = max(1, batch_size) if steps.rows_at_own_depths else 1
    try:
        # The weights are cast once for all the searches; the steppers pick their own kernels.
        with autocast_weights(model, device):
            for start in range(0, len(prompts), per_batch):
                searches = []
                for prompt, result in zip(prompts[start:start + per_batch], results[start:start + per_batch]):
                    limit = min(max_new_tokens or fmt.max_answer_tokens(), lm.max_context - len(prompt))
                    if limit > 0:   # else nothing fits: an empty result
                        searches.append(_Search(prompt, limit, result))
                with outside_the_watch(steps):
                    stopped = searches and not _search_batch(lm, steps, searches, budget, -math.log(threshold),
                                                             max_forwards, keep_greedy)
                if stopped:
                    for result in results[start + per_batch:]:
                        result.stopped_by_budget = True
                    break
    finally:
        model.train(was_training)
    for result in results:
        result.completions.sort(key=lambda c: -c.logprob)
    return results


def _affordable(budget, searches: list[_Search], costs: list[float]) -> list[_Search]:
    """The longest run of `searches`, from the first, whose `costs` the budget can pay together;
    the others are marked stopped by the budget."""
    if budget is None:
        return searches
    total, kept = 0.0, 0
    for cost in costs:
        if not budget.can_afford(total + cost):
            break
        total, kept = total + cost, kept + 1
    for search in searches[kept:]:
        search.result.stopped_by_budget = True
    return searches[:kept]


def _search_batch(lm, steps, searches: list[_Search], budget, max_nll: float, max_forwards, keep_greedy) -> bool:
    """Run `searches` to their ends, side by side.  False when the budget stopped any of them."""
    model, device, fmt = lm.model, lm.device, lm.format
    asked = len(searches)
    searches = _affordable(budget, searches, [budget.forward_cost(len(s.prompt), attention_context(0, len(s.prompt)), model)
                                              for s in searches] if budget else [])
    if not searches:
        return False
    trackers = [fmt.position_tracker() for _ in searches]
    ids, mask, positions = pad_batch([s.prompt for s in searches], fmt, device, side="right", trackers=trackers)
    lengths = [len(s.prompt) for s in searches]
    logits = steps.read_prompts(ids, mask, positions, lengths, ids.shape[1] + max(s.limit for s in searches))
    for search, tracker in zip(searches, trackers):
        search.node = _Node((), 0.0, grammar_constraint(lm, 1, model.config.vocab_size), True, tracker)
        search.result.forwards, search.result.tokens = 1, len(search.prompt)
    stopped = len(searches) < asked
    while searches:
        _expand(searches, logits, fmt.eos_id, max_nll, keep_greedy)
        going = []
        for search in searches:
            result = search.result
            if not search.stack:
                continue
            if max_forwards is not None and result.forwards >= max_forwards:
                result.stopped_by_limit = True
                continue
            search.node = search.stack.pop()
            going.append(search)
        costs = [budget.forward_cost(1, attention_context(len(s.prompt) + len(s.node.tokens) - 1, 1), model)
                 for s in going] if budget else []
        paid = _affordable(budget, going, costs)
        stopped = stopped or len(paid) < len(going)
        if not paid:
            break
        if len(paid) < len(searches):   # some searches ended: compute only for the others from now on
            row = {id(s): i for i, s in enumerate(searches)}
            steps.keep_rows([row[id(s)] for s in paid])
            searches = paid
        for search in searches:
            search.result.forwards += 1
            search.result.tokens += 1
        logits = steps.step_at(torch.tensor([[s.node.tokens[-1]] for s in searches], device=device),
                               torch.tensor([[s.node.position] for s in searches], device=device),
                               [len(s.node.tokens) - 1 for s in searches])
    return not stopped


def _expand(searches: list[_Search], logits: torch.Tensor, eos_id: int, max_nll: float, keep_greedy: bool) -> None:
    """Expand each search's node, whose next-token logits are row i of `logits`: record the
    completions it ends and push the children that stay above the threshold, least probable
    first, so that the most probable is explored next."""
    allowed = torch.cat([s.node.grammar.mask() for s in searches])
    nll = -torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    node_nll = torch.tensor([s.node.nll for s in searches], device=nll.device)
    best = nll.argmin(dim=-1)
    # Read back for all rows at once (a few host reads a step, not a few per row): the tokens
    # kept, their NLLs, and each row's best token.
    rows, tokens = torch.nonzero(node_nll[:, None] + nll < max_nll, as_tuple=True)
    kept = list(zip(rows.tolist(), tokens.tolist(), nll[rows, tokens].tolist()))
    best_nll = nll.gather(1, best[:, None]).squeeze(1).tolist()
    best = best.tolist()
    children: list[list[tuple[int, float]]] = [[] for _ in searches]
    for row, token, value in kept:
        children[row].append((token, value))
    for row, search in enumerate(searches):
        node, mine = search.node, children[row]
        if keep_greedy and node.on_greedy and all(t != best[row] for t, _ in mine):
            mine.append((best[row], best_nll[row]))
        for token, value in sorted(mine, key=lambda c: -c[1]):
            child_nll = node.nll + value
            if token == eos_id:
                search.result.completions.append(Completion(list(node.tokens), -child_nll))
            elif len(node.tokens) + 1 < search.limit:   # room left for at least the end-of-sequence
                search.stack.append(_Node(node.tokens + (token,), child_nll, _advance(node.grammar, token, node_nll.device),
                                          node.on_greedy and token == best[row], *_number(node.positions, token)))


# ---------------------------------------------------------------- scoring after a shared prompt

class PromptCache:
    """A prompt computed once, then any number of answers teacher-forced after it on top of its
    KV cache: an answer costs its own tokens only (the prompt is not recomputed), and gives the
    same summed negative log-likelihood as `tta.inference.decoding.score_answers` (the full, unconstrained
    next-token distribution).  Every forward goes through the model, so the meter charges it;
    callers check `prompt_cost` / `answer_cost` against the budget first (prices from
    `TaskBudget.shape`, the one formula in tta.budget)."""

    def __init__(self, lm: LoadedModel, prompt: list[int]):
        from transformers import DynamicCache

        self.lm, self.n = lm, len(prompt)
        self.positions = lm.format.position_tracker()   # fed the prompt; answers continue from a copy
        logits, self.cache = self._forward(prompt, positions_of(self.positions, prompt), 0, DynamicCache(), keep=1)
        self.first = torch.log_softmax(logits[-1], dim=-1)   # distribution of the answer's first token

    @staticmethod
    def prompt_cost(budget, n_prompt: int) -> float:
        return budget.sequences_cost([n_prompt])

    @staticmethod
    def answer_cost(budget, n_prompt: int, n_answer: int) -> float:
        n = max(0, n_answer - 1)    # the answer's last token is never fed
        return budget.forward_cost(n, attention_context(n_prompt, n))

    @torch.no_grad()
    def _forward(self, ids: list[int], positions: list[int], n_past: int, cache, keep: int = 0):
        model = self.lm.model
        was_training = model.training
        model.eval()
        out = _forward(model, self.lm.device, ids, positions, n_past, cache, keep)
        model.train(was_training)
        return out.logits[0].float(), output_cache(out)

    @torch.no_grad()
    def nll(self, answer: list[int]) -> float:
        total = -float(self.first[answer[0]])
        if len(answer) > 1:
            crop_cache(self.cache, self.n)
            positions = positions_of(copy.copy(self.positions), answer[:-1])
            logits, self.cache = self._forward(answer[:-1], positions, self.n, self.cache)
            logprobs = torch.log_softmax(logits, dim=-1)
            target = torch.tensor(answer[1:], device=logprobs.device)
            total -= float(logprobs.gather(1, target[:, None]).sum())
        return total


def poe_rank(lm, views, ranked: list[np.ndarray], budget, max_scored: int):
    """Product of experts: the summed NLL of each candidate (a grid in the original frame) under
    every view of its test input, lowest first.  Each view's prompt is computed once -- as many
    views as the budget can pay for along with scoring the leading candidate in them; then the
    first `max_scored` candidates of `ranked` are teacher-forced after every such view's prompt,
    one candidate at a time while the budget can pay.  The unscored follow in `ranked` order.
    Returns (candidates best first, NLLs of the scored).  A single candidate is not scored."""
    if len(ranked) < 2:
        return ranked, []
    lead = len(lm.format.answer_ids(ranked[0]))
    caches, scoring_lead = [], 0.0
    for v in views:
        scoring_lead += PromptCache.answer_cost(budget, len(v.prompt), lead)
        if not budget.can_afford(PromptCache.prompt_cost(budget, len(v.prompt)) + scoring_lead):
            break
        caches.append(PromptCache(lm, v.prompt))
    views = views[:len(caches)]
    scored = []
    for grid in ranked[:max_scored]:
        answers = [(cache, lm.format.answer_ids(v.augmentation.grid(grid))) for v, cache in zip(views, caches)]
        answers = [(cache, a) for cache, a in answers if len(a) <= lm.max_context - cache.n]
        cost = sum(PromptCache.answer_cost(budget, cache.n, len(a)) for cache, a in answers)
        if not answers or not budget.can_afford(cost):
            break
        nlls = [cache.nll(a) for cache, a in answers]
        # A view whose context is too short for this answer counts as the mean of the others.
        scored.append((sum(nlls) * len(views) / len(nlls), grid))
    order = sorted(range(len(scored)), key=lambda i: scored[i][0])
    return [scored[i][1] for i in order] + ranked[len(scored):], [scored[i][0] for i in order]


def scoring_reserve(views, room: int, budget, candidates: int) -> tuple[float, float]:
    """What generation leaves for product-of-experts scoring (`poe_rank`): the FLOPs to read every
    view's prompt and score `candidates` full-length answers (`room` tokens) in each (at most half
    the budget), or a quarter of a seconds budget."""
    flops = sum(PromptCache.prompt_cost(budget, len(v.prompt))
                + candidates * PromptCache.answer_cost(budget, len(v.prompt), room) for v in views)
    if budget.cap.flops is not None:
        flops = min(flops, 0.5 * budget.remaining())   # generation always gets half of what is left
    return flops, 0.25
