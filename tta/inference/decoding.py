"""Batched decoding with a KV cache, and teacher-forced scoring of known answers.

Written as a short loop rather than `model.generate` because the loop must
(1) stop the moment the task's budget cannot pay for the next step,
(2) constrain every step to grid tokens -- for the compact format, to
rectangular grids (each row as wide as the first, at most 30x30) -- and
(3) return each sequence's log-probability for voting and product-of-experts
scoring, and (4) number each new token with the format's position ids (grid
positions for the embedded model, `tta.model.encoding.GridPositions`).  `benchmarks/decoding.py` measures it against one `generate` per view.
Llama models read their prompts and decode through `tta.model.fast_decode` (`FastSteps`), others
through their own forward (`ForwardSteps`).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from tta.budget import TaskBudget, charge_forward, harness_products, known_rows
from tta.model.attention import causal_attention, decode_attention, uses_sdpa
from tta.model.batching import pad_batch
from tta.model.cache import reserved_cache
from tta.model.encoding import CompactFormat, DIGIT0_ID, EOS_ID, NL_ID
from tta.model.fast_decode import FastDecoder
from tta.model.loading import cache_keyword, LoadedModel, autocast, autocast_weights, output_cache
from tta.data.tasks import MAX_SIZE


@dataclass
class Generation:
    tokens: list[int]    # generated token ids, end-of-sequence excluded
    finished: bool       # the model ended the answer itself (not cut by length or budget)
    logprob: float       # sum of log-probabilities of the generated tokens, end-of-sequence included


class GridGrammar:
    """Allowed next tokens for the compact format: digits until the row is as wide as the
    first row, then a row end; end-of-sequence only right after a row end."""

    def __init__(self, batch: int, device, vocab_size: int):
        self.row_len = torch.zeros(batch, dtype=torch.long, device=device)
        self.width = torch.full((batch,), -1, dtype=torch.long, device=device)
        self.rows = torch.zeros(batch, dtype=torch.long, device=device)
        self.vocab_size = vocab_size

    def mask(self) -> torch.Tensor:
        allowed = torch.zeros((len(self.rows), self.vocab_size), dtype=torch.bool, device=self.rows.device)
        unknown = self.width < 0
        digit_ok = (unknown | (self.row_len < self.width)) & (self.row_len < MAX_SIZE) & (self.rows < MAX_SIZE)
        newline_ok = (self.row_len > 0) & (unknown | (self.row_len == self.width)) & (self.rows < MAX_SIZE)
        eos_ok = (self.row_len == 0) & (self.rows > 0)
        allowed[:, DIGIT0_ID:DIGIT0_ID + 10] = digit_ok[:, None]
        allowed[:, NL_ID] = newline_ok
        allowed[:, EOS_ID] = eos_ok
        return allowed

    def update(self, tokens: torch.Tensor) -> None:
        newline = tokens == NL_ID
        digit = (tokens >= DIGIT0_ID) & (tokens < DIGIT0_ID + 10)
        self.width = torch.where(newline & (self.width < 0), self.row_len, self.width)
        self.rows = self.rows + newline.long()
        self.row_len = torch.where(newline, torch.zeros_like(self.row_len), self.row_len + digit.long())


class TokenSet:
    """Allowed next tokens for other formats: a fixed set."""

    def __init__(self, batch: int, device, vocab_size: int, allowed_ids: list[int]):
        self.allowed = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.allowed[torch.tensor(allowed_ids, device=device)] = True
        self.batch = batch

    def mask(self) -> torch.Tensor:
        return self.allowed.expand(self.batch, -1)

    def update(self, tokens: torch.Tensor) -> None:
        pass


def _step_mask(mask2d: torch.Tensor, boolean: bool) -> torch.Tensor:
    """The attention mask of a decode step, already 4-D, so transformers uses it as it is instead
    of checking the 2-D mask on the host (a sync per step): boolean for SDPA and the decode-step
    kernel, additive otherwise."""
    allowed = mask2d[:, None, None, :].bool()
    if boolean:
        return allowed
    return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(torch.float32).min)


def grammar_constraint(lm: LoadedModel, batch: int, vocab_size: int):
    if isinstance(lm.format, CompactFormat):
        return GridGrammar(batch, lm.device, vocab_size)
    return TokenSet(batch, lm.device, vocab_size, lm.format.allowed_token_ids())


def _choose(logprobs: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    if temperature <= 0:
        return logprobs.argmax(dim=-1)
    probs = torch.softmax(logprobs / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(dim=-1) - sorted_probs < top_p   # always keeps the top token
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def crop_cache(cache, keep: int) -> None:
    """Keep the first `keep` positions of a transformers cache."""
    extra = cache.get_seq_length() - keep
    if extra > 0:
        cache.crop(-extra)   # a negative argument removes that many tokens in every transformers version


class ForwardSteps:
    """Prompts and decode steps through the model's own forward: any causal LM."""

    def __init__(self, model, device):
        self.model, self.device, self.sdpa = model, device, uses_sdpa(model)
        self.cache = None

    def read_prompts(self, ids, mask, positions, real_length, capacity) -> torch.Tensor:
        # The prompts are right-padded and read with causal attention and no mask (see
        # tta.model.attention): the 36 prompts of benchmarks/decoding.py in 0.32 s instead of
        # 0.38-0.41 s left-padded with a mask (2 threads).  Each row's next-token logits are then
        # at its own last prompt position; the pads' cache entries stay masked out of every step.
        known_rows(mask, real_length, [0] * len(real_length))
        last = [n - 1 for n in real_length]
        kept = sorted(set(last))   # the distinct last prompt positions: the head runs on these only
        with autocast(self.device), causal_attention(self.model):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=torch.tensor(kept, device=self.device),
                             **{cache_keyword(): reserved_cache(capacity)})
        self.cache, self.prompt_length = output_cache(out), real_length[0]
        column = torch.tensor([kept.index(n) for n in last], device=self.device)
        return out.logits[torch.arange(len(last), device=self.device), column].float()

    def repeat_rows(self, copies: int) -> None:
        self.cache.batch_repeat_interleave(copies)

    def step(self, ids, positions, mask2d, active, past) -> torch.Tensor:
        mask = known_rows(_step_mask(mask2d, self.sdpa), active, past)
        with autocast(self.device), decode_attention(self.model):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1, **{cache_keyword(): self.cache})
        self.cache = output_cache(out)
        return out.logits[:, -1].float()

    # A depth-first search's rows sit at different depths, which one transformers cache cannot
    # hold: through the forward, a search runs one prompt at a time.
    rows_at_own_depths = False

    def step_at(self, ids, positions, slots: list[int]) -> torch.Tensor:
        """One new token after the first `slots[0]` answer tokens of the one prompt read (a
        search's node: the cache is cropped back to that prefix first)."""
        (slot,) = slots
        past = self.prompt_length + slot
        crop_cache(self.cache, past)
        return self.step(ids, positions, torch.ones((1, past + 1), dtype=torch.long, device=self.device), [1], [past])


class FastSteps:
    """The same through `tta.model.fast_decode` (Llama models), which runs outside the model's
    metered modules: each call charges the model's meters what its forward would have cost."""

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.decoder = FastDecoder(model)

    def read_prompts(self, ids, mask, positions, real_length, capacity) -> torch.Tensor:
        last = torch.tensor([n - 1 for n in real_length], device=self.device)
        with harness_products():   # charged below by the formula
            logits = self.decoder.read_prompts(ids, positions, last, capacity)
        self.prompt_lengths = list(real_length)
        charge_forward(self.model, sum(real_length), sum(n * (n + 1) // 2 for n in real_length),
                       head_tokens=len(real_length))
        return logits

    def repeat_rows(self, copies: int) -> None:
        self.decoder.repeat_rows(copies)

    def step(self, ids, positions, mask2d, active, past) -> torch.Tensor:
        with harness_products():
            logits = self.decoder.step(ids, positions, mask2d)
        charge_forward(self.model, sum(active), sum((n + 1) * a for n, a in zip(past, active)))
        return logits

    rows_at_own_depths = True

    def step_at(self, ids, positions, slots: list[int]) -> torch.Tensor:
        """One new token per row after the first `slots[r]` answer tokens of its prompt (a
        depth-first search's nodes, each row at its own depth)."""
        with harness_products():
            logits = self.decoder.step_at(ids, positions, slots)
        charge_forward(self.model, len(slots), sum(n + s + 1 for n, s in zip(self.prompt_lengths, slots)))
        return logits

    def keep_rows(self, rows: list[int]) -> None:
        self.decoder.keep_rows(rows)
        self.prompt_lengths = [self.prompt_lengths[r] for r in rows]


def decode_steps(model, device, fast: bool = True):
    """The prompt reader and decode stepper for `model`: `FastSteps` where the model allows (and
    `fast`), else `ForwardSteps`."""
    return (FastSteps if fast and FastDecoder.unsupported(model) is None else ForwardSteps)(model, device)


def outside_the_watch(steps):
    """For a decode loop over `steps`: through the fast decoder every product is charged by the
    formula and the rest of the loop is bookkeeping, so the whole loop runs outside the
    bare-product watch (`tta.budget.harness_products`), which would otherwise be called from
    Python on each of the loop's small operations (about 50 per step, 0.3M calls in `tta run
    --method ttt_lora --limit 5`, counted with cProfile).  Through the model's forward the watch
    stays on: a model the meter cannot hook is charged part by part, its attention by the watch."""
    return harness_products() if isinstance(steps, FastSteps) else contextlib.nullcontext()


@torch.no_grad()
def _generate_batch(lm, prompts, budget, max_new_tokens, temperature, top_p, generator, copies: int = 1,
                    fast_steps: bool = True) -> list[Generation]:
    steps = decode_steps(lm.model, lm.device, fast_steps)
    with outside_the_watch(steps):
        return _decode_batch(lm, steps, prompts, budget, max_new_tokens, temperature, top_p, generator, copies)


def _decode_batch(lm, steps, prompts, budget, max_new_tokens, temperature, top_p, generator,
                  copies: int) -> list[Generation]:
    model, device = lm.model, lm.device
    trackers = [lm.format.position_tracker() for _ in prompts]   # numbering continues past each prompt
    ids, mask, positions = pad_batch(prompts, lm.format, device, side="right", trackers=trackers)
    batch = len(prompts)
    vocab = model.config.vocab_size
    constraint = grammar_constraint(lm, batch, vocab)

    eos = EOS_ID if lm.format.eos_id is None else lm.format.eos_id
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    out_tokens = torch.zeros((batch, 0), dtype=torch.long, device=device)
    logprob = torch.zeros(batch, dtype=torch.float32, device=device)
    # What the host knows without asking the device: each row's real length and whether it has
    # finished.  One `tolist()` of the chosen tokens per step keeps them current -- the only
    # host sync of a step (counted by tests/test_decoding.py).
    real_length = [len(p) for p in prompts]
    finished = [False] * batch

    if budget and not budget.can_afford(budget.sequences_cost(real_length, model)):
        return [Generation([], False, 0.0) for _ in range(batch * copies)]
    mask2d, active, past = mask, None, None   # the next step's mask, active rows and past lengths
    for step in range(max_new_tokens):
        if step == 0:
            logits = steps.read_prompts(ids, mask, positions, real_length, ids.shape[1] + max_new_tokens)
        else:
            logits = steps.step(ids, positions, mask2d, active, past)
        if step == 0 and copies > 1:
            # Every prompt was read once; its answers are drawn `copies` times from the same
            # cache, rows p0, p0, ..., p1, p1, ...
            batch *= copies
            logits = logits.repeat_interleave(copies, dim=0)
            steps.repeat_rows(copies)
            mask2d = mask.repeat_interleave(copies, dim=0)
            trackers = [copy.deepcopy(t) for t in trackers for _ in range(copies)]
            real_length = [n for n in real_length for _ in range(copies)]
            finished = [False] * batch
            constraint = grammar_constraint(lm, batch, vocab)
            done = torch.zeros(batch, dtype=torch.bool, device=device)
            out_tokens = torch.zeros((batch, 0), dtype=torch.long, device=device)
            logprob = torch.zeros(batch, dtype=torch.float32, device=device)
        logits = logits.masked_fill(~constraint.mask(), float("-inf"))
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = _choose(logprobs, temperature, top_p, generator)
        chosen = torch.where(done, torch.full_like(chosen, eos), chosen)
        logprob += torch.where(done, torch.zeros_like(logprob), logprobs.gather(1, chosen[:, None]).squeeze(1))
        out_tokens = torch.cat([out_tokens, chosen[:, None]], dim=1)
        constraint.update(chosen)
        done = done | (chosen == eos)
        chosen_now = chosen.tolist()   # the step's one host sync
        finished = [f or c == eos for f, c in zip(finished, chosen_now)]
        if all(finished):
            break
        # Finished rows keep running (a rectangle is cheaper than reshaping the cache) but
        # their new positions are masked, so they are neither attended to nor charged.
        active = [0 if f else 1 for f in finished]
        context = sum((n + 1) * a for n, a in zip(real_length, active))   # each active row attends to its past and itself
        if budget and not budget.can_afford(budget.forward_cost(sum(active), context, model)):
            break
        ids = chosen[:, None]
        mask2d = torch.cat([mask2d, (~done).long()[:, None]], dim=1)
        past, real_length = real_length, [n + a for n, a in zip(real_length, active)]
        positions = torch.tensor([[t.feed(c)] for t, c in zip(trackers, chosen_now)], device=device)
    results = []
    for row in range(batch):
        tokens = out_tokens[row].tolist()
        finished = lm.format.eos_id in tokens
        if finished:
            tokens = tokens[: tokens.index(lm.format.eos_id)]
        results.append(Generation(tokens, finished, float(logprob[row])))
    return results


def generate(lm: LoadedModel, prompts: list[list[int]], budget: TaskBudget | None = None,
             max_new_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, batch_size: int = 16, copies: int = 1, fast_steps: bool = True) -> list[Generation]:
    """Decode an answer for every prompt, `batch_size` at a time, longest first (so batches
    hold prompts of similar length and waste little on padding).  With `copies` > 1 (sampling),
    each prompt is read once and `copies` answers are drawn from its cache -- the result holds
    `copies` generations per prompt, in prompt order -- so a batch holds `batch_size` answers.
    Prompts and steps run through `tta.model.fast_decode` where the model allows;
    `fast_steps=False` runs them through the model's own forward (for comparisons)."""
    if not prompts:
        return []
    limit = max_new_tokens or lm.format.max_answer_tokens()
    generator = torch.Generator(device=lm.device).manual_seed(seed) if temperature > 0 else None
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[Generation | None] = [None] * (len(prompts) * copies)
    per_batch = max(1, batch_size // copies)   # prompts per batch
    was_training = lm.model.training
    lm.model.eval()
    with autocast_weights(lm.model, lm.device):
        for start in range(0, len(order), per_batch):
            chunk = order[start:start + per_batch]
            room = lm.max_context - max(len(prompts[i]) for i in chunk)
            outs = _generate_batch(lm, [prompts[i] for i in chunk], budget, max(1, min(limit, room)),
                                   temperature, top_p, generator, copies, fast_steps)
            for k, i in enumerate(chunk):
                results[i * copies:(i + 1) * copies] = outs[k * copies:(k + 1) * copies]
    lm.model.train(was_training)
    return results


@dataclass
class AnswerScore:
    nll: float           # summed negative log-likelihood of the answer tokens
    n_tokens: int
    n_correct: int       # answer tokens that are the model's argmax (teacher-forced token accuracy)

    @property
    def mean_nll(self) -> float:
        return self.nll / max(1, self.n_tokens)

    @property
    def token_accuracy(self) -> float:
        return self.n_correct / max(1, self.n_tokens)


@torch.no_grad()
def score_answers(lm: LoadedModel, prompts: list[list[int]], answers: list[list[int]],
                  batch_size: int = 8) -> list[AnswerScore]:
    """Teacher-forced log-likelihood of each answer after its prompt (batched, right-padded)."""
    was_training = lm.model.training
    lm.model.eval()
    scores = []
    for start in range(0, len(prompts), batch_size):
        seqs = [p + a for p, a in zip(prompts[start:start + batch_size], answers[start:start + batch_size])]
        ids, mask, positions = pad_batch(seqs, lm.format, lm.device, side="right")
        with autocast(lm.device):
            logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        for row, (p, a) in enumerate(zip(prompts[start:start + batch_size], answers[start:start + batch_size])):
            span = slice(len(p) - 1, len(p) - 1 + len(a))
            target = torch.tensor(a, device=lm.device)
            row_lp = logprobs[row, span]
            nll = -row_lp.gather(1, target[:, None]).sum()
            correct = (row_lp.argmax(dim=-1) == target).sum()
            scores.append(AnswerScore(float(nll), len(a), int(correct)))
    lm.model.train(was_training)
    return scores
