"""Depth-first search for every likely answer (Franzen et al., "Product of Experts", 2025).

`dfs` returns every completion of a prompt whose probability is above a
threshold (0.09 in the paper), most probable first.  Because the log-
probability of a prefix only falls as tokens are added, a branch is dropped as
soon as its prefix falls below the threshold; at most 1/threshold completions
can pass, and at most that many prefixes of any one length, so the search
visits at most ~(1/threshold) x (answer length) nodes.

Cost: the prompt is computed once; every node after that is *one* token fed
through the model on top of the shared KV cache.  When the search backtracks,
the cache is cropped to the branch point (depth-first order guarantees the
cache then holds exactly the branch's prefix), so no prefix is ever recomputed.
The prompt and the nodes run through the batched decoder's stepper
(`tta.inference.decoding.decode_steps`: the fast decoder for Llama models, which
charges the meter as the model's forward would, else the forward itself);
before each forward the search asks the task's budget whether it can pay and stops
(returning what it has) when not.

Tokens follow the output grammar of the model's format (for the compact format:
rectangular grids, at most 30x30; see `tta.inference.decoding.GridGrammar`) and the
next-token distribution is renormalised over the allowed tokens, as in
`tta.inference.decoding.generate`, so DFS and sampling see the same distribution.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field

import torch

from tta.budget import attention_context
from tta.inference.decoding import crop_cache, decode_steps, grammar_constraint
from tta.model.encoding import positions_of
from tta.model.loading import CACHE_KW, LoadedModel, autocast, autocast_weights, output_cache

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
                     use_cache=True, logits_to_keep=keep, **{CACHE_KW: cache})


@torch.no_grad()
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
    model, device, fmt = lm.model, lm.device, lm.format
    limit = min(max_new_tokens or fmt.max_answer_tokens(), lm.max_context - len(prompt))
    max_nll = -math.log(threshold)
    result = SearchResult()
    if limit <= 0:
        return result

    def affordable(n_past: int, n_new: int) -> bool:
        if budget is None or budget.can_afford(budget.forward_cost(n_new, attention_context(n_past, n_new), model)):
            return True
        result.stopped_by_budget = True
        return False

    def forward(run, n_tokens: int) -> torch.Tensor:
        """The next-token logits after `run()` fed `n_tokens` tokens, counted."""
        result.forwards += 1
        result.tokens += n_tokens
        return run()[0]

    was_training = model.training
    model.eval()
    steps = decode_steps(model, device, fast)
    # Four views of gen-eval task 0, one thread of this CPU: 0.37-0.42 s through the model's
    # forward (with the decode-step kernel and weights cast once), 0.25-0.27 s with the fast decoder.
    # The steppers pick their own attention kernels; the weights are cast once for the search.
    speed_ups = contextlib.ExitStack()
    speed_ups.enter_context(autocast_weights(model, device))
    try:
        if not affordable(0, len(prompt)):
            return result
        tracker = fmt.position_tracker()
        logits = forward(lambda: steps.read_prompts(
            torch.tensor([prompt], device=device), torch.ones((1, len(prompt)), dtype=torch.long, device=device),
            torch.tensor([positions_of(tracker, prompt)], device=device), [len(prompt)], len(prompt) + limit), len(prompt))
        grammar = grammar_constraint(lm, 1, model.config.vocab_size)
        stack: list[_Node] = []
        node = _Node((), 0.0, grammar, True, tracker)
        while True:
            # Expand `node`, whose next-token logits are in `logits`: push the children that stay
            # above the threshold, least probable first, so the most probable is explored next.
            logprobs = torch.log_softmax(logits.masked_fill(~node.grammar.mask()[0], float("-inf")), dim=-1)
            nll = -logprobs
            keep = torch.nonzero(node.nll + nll < max_nll).flatten().tolist()
            best = int(nll.argmin())
            if keep_greedy and node.on_greedy and best not in keep:
                keep.append(best)
            for token in sorted(keep, key=lambda t: -float(nll[t])):
                child_nll = node.nll + float(nll[token])
                if token == fmt.eos_id:
                    result.completions.append(Completion(list(node.tokens), -child_nll))
                elif len(node.tokens) + 1 < limit:   # room left for at least the end-of-sequence
                    stack.append(_Node(node.tokens + (token,), child_nll, _advance(node.grammar, token, device),
                                       node.on_greedy and token == best, *_number(node.positions, token)))
            if not stack:
                break
            if max_forwards is not None and result.forwards >= max_forwards:
                result.stopped_by_limit = True
                break
            node = stack.pop()
            n_past = len(prompt) + len(node.tokens) - 1   # the cache must hold exactly the parent's prefix
            if not affordable(n_past, 1):
                break
            steps.crop(n_past)
            logits = forward(lambda: steps.step(
                torch.tensor([[node.tokens[-1]]], device=device), torch.tensor([[node.position]], device=device),
                torch.ones((1, n_past + 1), dtype=torch.long, device=device), [1], [n_past]), 1)
    finally:
        speed_ups.close()
        model.train(was_training)
    result.completions.sort(key=lambda c: -c.logprob)
    return result


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
