"""Tests for the `sampling` method and the depth-first search behind it (tta/inference/search.py).

Most tests use a stub language model whose next-token distribution is written down by hand:
it puts given weights on a few answer sequences (everything else gets a small leak), and it
reads the tokens it has seen *from its KV cache*, so a search that crops or reuses the cache
wrongly sees the wrong distribution.
"""
from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

from tta.data.augment import transforms_from_names
from tta.budget import Budget, Meter, attention_context, forward_flops
from tta.inference.decoding import GridGrammar
from tta.model.encoding import CompactFormat, DIGIT0_ID, EOS_ID, NL_ID, OUT_ID, make_grid_tokenizer
from tta.method import get_method, make_config
from tta.model.loading import LoadedModel
from tta.inference.predict import build_views
from tta.inference.search import dfs
from tta.data.tasks import Pair, Task, grid_key

VOCAB = 16
LEAK = 1e-3     # total probability a step gives to tokens outside the written-down answers


def answer(rows: list[str]) -> tuple[int, ...]:
    """'12','34' -> the compact tokens of the grid [[1,2],[3,4]] followed by end-of-sequence."""
    return tuple(t for r in rows for t in [*(DIGIT0_ID + int(c) for c in r), NL_ID]) + (EOS_ID,)


class StubDecoder(torch.nn.Module):
    """Layers the meter hooks and charges (`width`² weights each); their output is not used."""

    def __init__(self, layers: int, width: int):
        super().__init__()
        self.width = width
        self.layers = torch.nn.ModuleList([torch.nn.Linear(width, width, bias=False) for _ in range(layers)])

    def forward(self, input_ids, attention_mask=None):
        hidden = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.width)
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden


def real_positions(mask, input_ids) -> torch.Tensor:
    """Which fed positions are real tokens (padding may sit on either side of a prompt), from a 2-D
    mask or a decode step's 4-D one (boolean: True = attend; additive: 0 = attend)."""
    if mask is None:
        return torch.ones(input_ids.shape, dtype=torch.bool)
    if mask.dim() == 4:
        last = mask[:, 0, -1, -input_ids.shape[1]:]
        return last if last.dtype == torch.bool else last == 0
    return mask[:, -input_ids.shape[1]:].bool()


class StubLM(torch.nn.Module):
    """P(answer) is `weights[answer]` (up to the leak); the answer starts after the last output marker."""

    def __init__(self, weights: dict[tuple[int, ...], float], hidden_size: int = 4, layers: int = 1, width: int = 8):
        super().__init__()
        self.weights = weights
        self.config = types.SimpleNamespace(num_hidden_layers=layers, hidden_size=hidden_size, vocab_size=VOCAB,
                                            num_attention_heads=1, max_position_embeddings=4096)
        self.embed = torch.nn.Embedding(VOCAB, hidden_size)
        self.decoder = StubDecoder(layers, width)
        self.fed = []                                # tokens fed per forward, for the tests

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return None

    def get_decoder(self):
        return self.decoder

    def next_logprobs(self, history: list[int]) -> torch.Tensor:
        outs = [i for i, t in enumerate(history) if t == OUT_ID]
        mass = torch.zeros(VOCAB, dtype=torch.float64)
        if outs:
            prefix = tuple(history[outs[-1] + 1:])
            for seq, w in self.weights.items():
                if len(seq) > len(prefix) and seq[:len(prefix)] == prefix:
                    mass[seq[len(prefix)]] += w
        probs = mass / mass.sum() * (1 - LEAK) + LEAK / VOCAB if mass.sum() > 0 else torch.full((VOCAB,), 1 / VOCAB,
                                                                                                  dtype=torch.float64)
        return probs.log().float()

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, logits_to_keep=0,
                cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        self.decoder(input_ids=input_ids, attention_mask=attention_mask)   # what the meter sees
        self.fed.append(int(real_positions(attention_mask, input_ids).sum()))
        new = input_ids.shape[1]
        real = real_positions(attention_mask, input_ids)
        if cache is not None:   # the cache stores the token ids and whether each is real, as keys
            fed = torch.stack([input_ids.float(), real.float()], dim=-1)[:, None]
            keys, _ = cache.update(fed, fed, 0)
            history, real = keys[:, 0, :, 0].long(), keys[:, 0, :, 1].bool()
        else:
            history = input_ids
        start = history.shape[1] - new
        if isinstance(logits_to_keep, torch.Tensor):
            keep = [start + int(i) for i in logits_to_keep]
        else:
            keep = range(history.shape[1] - (logits_to_keep or new), history.shape[1])
        logits = torch.stack([torch.stack([self.next_logprobs(row[: i + 1][flags[: i + 1]].tolist()) for i in keep])
                              for row, flags in zip(history, real)])
        return types.SimpleNamespace(logits=logits, cache=cache, past_key_values=cache)


def stub_lm(weights) -> LoadedModel:
    return LoadedModel(StubLM(weights), None, CompactFormat(make_grid_tokenizer()), "stub", torch.device("cpu"))


def grid(rows: list[str]) -> np.ndarray:
    return np.array([[int(c) for c in r] for r in rows], dtype=np.int8)


def small_task() -> Task:
    demo = Pair(grid(["10", "02"]), grid(["01", "20"]))
    return Task("stub-task", (demo, Pair(grid(["30", "04"]), grid(["03", "40"]))), (Pair(grid(["50", "06"]), grid(["11", "11"])),))


PROMPT = CompactFormat().encode([], grid(["1"])).input_ids   # <s> I 1 \n O


# ---------------------------------------------------------------- depth-first search

WEIGHTS = {
    answer(["1"]): 0.40,
    answer(["2"]): 0.25,
    answer(["12"]): 0.15,
    answer(["11", "11"]): 0.10,
    answer(["3"]): 0.05,      # below the threshold
    answer(["21"]): 0.05,     # below the threshold, shares a prefix with one above
}


def reference_completions(weights, threshold):
    """Every completion above `threshold` by plain breadth-first enumeration over the stub's
    distribution (no model calls, no cache), under the same grid grammar."""
    model = StubLM(weights)
    found, frontier = [], [((), 0.0, GridGrammar(1, "cpu", VOCAB))]
    while frontier:
        nxt = []
        for tokens, lp, gram in frontier:
            logits = model.next_logprobs(PROMPT + list(tokens)).masked_fill(~gram.mask()[0], float("-inf"))
            logprobs = torch.log_softmax(logits, -1)
            for t in range(VOCAB):
                child = lp + float(logprobs[t])
                if child <= math.log(threshold):
                    continue
                if t == EOS_ID:
                    found.append((tokens, child))
                else:
                    g = GridGrammar(1, "cpu", VOCAB)
                    for u in tokens + (t,):
                        g.update(torch.tensor([u]))
                    nxt.append((tokens + (t,), child, g))
        frontier = nxt
    return sorted(found, key=lambda x: -x[1])


def test_dfs_returns_exactly_the_completions_above_threshold_most_probable_first():
    lm = stub_lm(WEIGHTS)
    result = dfs(lm, PROMPT, threshold=0.09, max_new_tokens=20)
    got = [(tuple(c.tokens), c.logprob) for c in result.completions]
    want = reference_completions(WEIGHTS, 0.09)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [t + (EOS_ID,) for t, _ in got] == [answer(["1"]), answer(["2"]), answer(["12"]), answer(["11", "11"])]
    for (_, lp), (_, ref) in zip(got, want):
        assert lp == pytest.approx(ref, abs=1e-4)
    assert [c.prob for c in result.completions] == pytest.approx([0.40, 0.25, 0.15, 0.10], rel=0.02)
    assert not result.stopped_by_budget and not result.stopped_by_limit


def test_dfs_threshold_moves_the_cut_and_keep_greedy_adds_the_greedy_answer():
    lm = stub_lm(WEIGHTS)
    assert [c.prob for c in dfs(lm, PROMPT, threshold=0.2, max_new_tokens=20).completions] == pytest.approx([0.40, 0.25], rel=0.02)
    assert dfs(lm, PROMPT, threshold=0.5, max_new_tokens=20).completions == []
    greedy = dfs(lm, PROMPT, threshold=0.5, max_new_tokens=20, keep_greedy=True).completions
    assert [tuple(c.tokens) + (EOS_ID,) for c in greedy] == [answer(["1"])]


def test_dfs_computes_the_prompt_once_and_one_token_per_node():
    lm = stub_lm(WEIGHTS)
    result = dfs(lm, PROMPT, threshold=0.09, max_new_tokens=20)
    fed = lm.model.fed
    assert fed[0] == len(PROMPT) and all(n == 1 for n in fed[1:])
    assert result.forwards == len(fed) and result.tokens == sum(fed)
    # Nodes expanded: the prefixes of answers above 0.09 (root included), ends of sequence excluded:
    # (), 1, 1\n, 12, 12\n, 11, 11\n, 11\n1, 11\n11, 11\n11\n, 2, 2\n  -> 12 forwards
    assert result.forwards == 12


def test_dfs_respects_length_limit_and_budget():
    lm = stub_lm(WEIGHTS)
    short = dfs(lm, PROMPT, threshold=0.09, max_new_tokens=3)   # room for "12\n" + </s> is 4 tokens
    assert [tuple(c.tokens) + (EOS_ID,) for c in short.completions] == [answer(["1"]), answer(["2"])]

    meter = Meter(Budget(flops=None))
    meter.attach(lm.model)
    full = dfs(lm, PROMPT, meter.handle(lm.model), threshold=0.09, max_new_tokens=20)
    meter.detach()
    cap = meter.flops * 0.6
    lm.model.fed.clear()
    meter = Meter(Budget(flops=cap))
    meter.attach(lm.model)
    cut = dfs(lm, PROMPT, meter.handle(lm.model), threshold=0.09, max_new_tokens=20)
    meter.detach()
    assert cut.stopped_by_budget and meter.flops <= cap
    assert 0 < cut.forwards < full.forwards
    assert {tuple(c.tokens) for c in cut.completions} < {tuple(c.tokens) for c in full.completions}


# ---------------------------------------------------------------- product of experts

def test_poe_prefers_an_answer_likely_under_every_view_to_one_likely_under_one():
    from tta.inference.search import poe_rank

    symmetric, lopsided = grid(["11", "11"]), grid(["12", "34"])
    # The stub ignores the view: "12/34" is likely as written, i.e. only in the identity view;
    # the all-ones grid reads the same in every view.
    lm = stub_lm({answer(["12", "34"]): 0.6, answer(["11", "11"]): 0.4})
    views = build_views(lm, small_task(), transforms_from_names(["identity", "rot90", "rot180", "transpose"]), 1,
                        np.random.default_rng(0))
    identity = views[0]
    assert identity.augmentation.transform.name == "identity"

    meter = Meter()
    meter.attach(lm.model)
    lm.model.fed.clear()
    ranked, nlls = poe_rank(lm, views, [lopsided, symmetric], meter.handle(lm.model), max_scored=8)
    meter.detach()
    assert [grid_key(g) for g in ranked] == [grid_key(symmetric), grid_key(lopsided)]
    assert nlls[0] == pytest.approx(-4 * math.log(0.4), rel=0.05)
    assert nlls[1] > 10 * nlls[0]
    # Under the identity view alone the lopsided answer is the likelier one.
    one = stub_lm({answer(["12", "34"]): 0.6, answer(["11", "11"]): 0.4})
    alone, _ = poe_rank(one, [identity], [symmetric, lopsided], Meter().handle(one.model), max_scored=8)
    assert grid_key(alone[0]) == grid_key(lopsided)
    # Every scored token was charged: each view's prompt once, then 2 candidates x 4 views, whose
    # answers are fed after the cached prompt (all but the answer's last token).
    shape = meter.shape(lm.model)
    prompts = sum(forward_flops(shape, len(v.prompt), attention_context(0, len(v.prompt))) for v in views)
    answers = sum(forward_flops(shape, 6, attention_context(len(v.prompt), 6)) for v in views) * 2
    assert meter.flops == pytest.approx(prompts + answers)
    assert lm.model.fed == [len(v.prompt) for v in views] + [6] * 8


def test_scoring_after_a_cached_prompt_matches_score_answers():
    from tta.inference.decoding import score_answers
    from tta.model.loading import load_model
    from tta.inference.search import PromptCache

    for lm in (stub_lm({answer(["12", "34"]): 0.6, answer(["11", "11"]): 0.4}), load_model("random:tiny", device="cpu")):
        view = build_views(lm, small_task(), transforms_from_names(["rot90"]), 1, np.random.default_rng(0))[0]
        answers = [lm.format.answer_ids(grid(rows)) for rows in (["12", "34"], ["11", "11"], ["5"], ["123", "456", "789"])]
        cache = PromptCache(lm, view.prompt)
        got = [cache.nll(a) for a in answers]
        want = [s.nll for s in score_answers(lm, [view.prompt] * len(answers), answers)]
        assert got == pytest.approx(want, rel=0.02, abs=0.02)


def test_poe_stops_scoring_when_the_budget_runs_out():
    from tta.inference.search import poe_rank

    lm = stub_lm({answer(["12", "34"]): 0.6, answer(["11", "11"]): 0.4})
    views = build_views(lm, small_task(), transforms_from_names(["identity", "rot90"]), 1, np.random.default_rng(0))
    a, b = grid(["12", "34"]), grid(["11", "11"])
    meter = Meter(Budget(flops=1.0))
    meter.attach(lm.model)
    ranked, nlls = poe_rank(lm, views, [a, b], meter.handle(lm.model), max_scored=8)
    meter.detach()
    assert nlls == [] and meter.flops == 0 and [grid_key(g) for g in ranked] == [grid_key(a), grid_key(b)]

    # A budget for two of four views' prompts and both candidates in them: PoE over those two views.
    views = build_views(lm, small_task(), transforms_from_names(["identity", "rot90", "rot180", "transpose"]), 1,
                        np.random.default_rng(0))
    shape = Meter().shape(lm.model)
    cap = sum(forward_flops(shape, len(v.prompt), attention_context(0, len(v.prompt)))
              + 2 * forward_flops(shape, 6, attention_context(len(v.prompt), 6)) for v in views[:2])
    meter = Meter(Budget(flops=cap * 1.001))
    meter.attach(lm.model)
    ranked, nlls = poe_rank(lm, views, [a, b], meter.handle(lm.model), max_scored=8)
    meter.detach()
    assert meter.flops == pytest.approx(cap)
    assert [grid_key(g) for g in ranked] == [grid_key(b), grid_key(a)]
    assert nlls[0] == pytest.approx(-2 * math.log(0.4), rel=0.05)


# ---------------------------------------------------------------- the method under a budget

def run_method(lm, task, budget, **settings):
    cls = get_method("sampling")
    method = cls(make_config(cls, settings), lm, seed=0)
    meter = Meter(budget)
    meter.attach(lm.model)
    try:
        method.adapt(task, meter.handle(lm.model), 0)
        attempts, info = method.predict(task, meter.handle(lm.model), 0)
    finally:
        method.reset()
        meter.detach()
    return attempts, info, meter


@pytest.mark.parametrize("search, k", [("sample", 150), ("sample", 600), ("dfs", 50), ("dfs", 80)])
def test_the_method_processes_no_more_tokens_than_the_budget_allows(search, k):
    """A cap that pays for k tokens at the cheapest price a token can have (context 1): the model
    sees at most k tokens, prompts included, and the method still spends most of the cap."""
    lm = LoadedModel(StubLM({answer(["11", "11"]): 0.5, answer(["1"]): 0.5}, hidden_size=1, width=32), None,
                     CompactFormat(make_grid_tokenizer()), "stub", torch.device("cpu"))   # tokens cost ~the same
    shape = Meter().shape(lm.model)
    cap = k * forward_flops(shape, 1, 1)
    attempts, info, meter = run_method(lm, small_task(), Budget(flops=cap), search=search, select="vote",
                                       transforms=["identity", "rot90"], samples=8, decode_batch_size=16)
    assert meter.flops <= cap
    assert sum(lm.model.fed) <= k
    if search == "sample":
        assert info["generated_tokens"] <= sum(lm.model.fed)
    else:
        assert info["stopped_by_budget"]          # the whole search would take 92 tokens
    # it used the budget, not stopped at the first check -- or, sampling, it drew every sample asked
    # for (reading each prompt once per round leaves budget over at the larger cap)
    assert sum(lm.model.fed) >= 0.5 * k or (search == "sample" and info["samples"] == 2 * 8)
    assert len(attempts) == 1 and len(attempts[0]) == 2


def test_samples_zero_fills_the_budget_and_stops_at_max_samples_without_one():
    lm = stub_lm({answer(["11", "11"]): 0.7, answer(["1"]): 0.3})
    settings = dict(search="sample", select="vote", transforms=["identity", "rot90"], samples=0, max_samples=6)
    _, info, meter = run_method(lm, small_task(), Budget(), **settings)
    assert info["samples"] == 2 * 6                       # no budget: max_samples per view
    one_sample = meter.flops / info["samples"]
    counts = []
    for k in (3, 7):                                     # room for about k samples
        _, info, meter = run_method(lm, small_task(), Budget(flops=(k + 0.5) * one_sample), **settings)
        assert meter.flops <= (k + 0.5) * one_sample
        counts.append(info["samples"])
    assert 1 <= counts[0] < counts[1] <= 7                # a bigger budget buys more samples


@pytest.mark.parametrize("search", ["sample", "dfs"])
@pytest.mark.parametrize("select", ["vote", "poe"])
def test_method_never_crashes_on_exhaustion(search, select):
    lm = stub_lm({answer(["11", "11"]): 0.7, answer(["1"]): 0.3})
    task = small_task()
    settings = dict(search=search, select=select, transforms=["identity", "rot90"], samples=4)
    attempts, info, meter = run_method(lm, task, Budget(), **settings)
    assert grid_key(attempts[0][0]) == grid_key(grid(["11", "11"]))   # unlimited: the likeliest answer wins
    full = meter.flops
    for share in (1e-6, 0.1, 0.3, 0.6, 0.9):
        attempts, info, meter = run_method(lm, task, Budget(flops=share * full), **settings)
        assert len(attempts) == 1 and len(attempts[0]) == 2
        assert meter.flops <= share * full
    assert attempts[0][0] is not None      # with 90% of what it wanted it still submits an answer


def test_dfs_method_finds_the_answer_and_votes_across_views():
    lm = stub_lm({answer(["11", "11"]): 0.5, answer(["12", "34"]): 0.45})
    attempts, info, _ = run_method(lm, small_task(), Budget(), search="dfs", select="vote",
                                   transforms=["identity", "rot90", "rot180"])
    # "11/11" is found in all three views; each view's "12/34" maps back to a different grid.
    assert grid_key(attempts[0][0]) == grid_key(grid(["11", "11"]))
    assert info["candidates"] == 6 and info["distinct"] == [4]


def test_dfs_searches_more_views_until_the_cap_is_spent_or_max_views():
    """Fails if search=dfs leaves most of a cap unspent after its configured views (the equal-
    compute promise), overspends it, searches past max_views, or fills without a cap."""
    lm = stub_lm({answer(["11", "11"]): 0.5, answer(["12", "34"]): 0.45})
    settings = dict(search="dfs", select="vote", transforms=["identity", "rot90"])
    _, info, meter = run_method(lm, small_task(), Budget(), **settings)
    configured = meter.flops
    assert info["searched_views"] == 2 and meter.out_of_work == "no cap: the configured views only"
    cap = 12 * configured
    _, alone, meter = run_method(lm, small_task(), Budget(flops=cap), fill_views=False, **settings)
    assert alone["searched_views"] == 2 and meter.flops < 0.2 * cap
    _, info, meter = run_method(lm, small_task(), Budget(flops=cap), **settings)
    assert 12 <= info["searched_views"] <= 24 and 0.8 * cap <= meter.flops <= cap
    assert info["stopped_by_budget"] and info["candidates"] > 2 * 2   # the extra views' answers count too
    _, info, meter = run_method(lm, small_task(), Budget(flops=cap), max_views=5, **settings)
    assert info["searched_views"] == 5 and meter.out_of_work.startswith("max_views reached")


def test_bad_settings_are_one_line_errors():
    from tta.method import MethodError

    cls = get_method("sampling")
    for bad in (["search=beam"], ["select=best"], ["adapt=full"], ["threshold=1.5"], ["transforms=[\"spin\"]"],
                ["nope=1"]):
        with pytest.raises(MethodError) as error:
            make_config(cls, bad)
        assert "\n" not in str(error.value) and bad[0].split("=")[0] in str(error.value)


# ---------------------------------------------------------------- end to end

def test_end_to_end_on_a_random_tiny_model(tmp_path):
    import json

    from tta.model.loading import load_model
    from tta.run.runner import RunSpec, run
    from tta.run.solve import run_task
    from tta.data.datasets import load_dataset

    lm = load_model("random:tiny", device="cpu")
    task = load_dataset("gen-eval").tasks[0]
    cls = get_method("sampling")
    n_params = sum(p.numel() for p in lm.model.parameters())
    method = cls(make_config(cls, {"search": "dfs", "select": "poe", "adapt": "ttt", "transforms": ["identity", "rot90"],
                                   "max_forwards": 40, "max_examples": 4, "epochs": 1}), lm, seed=0)
    record = run_task(method, lm, task, Budget(), seed=0)
    assert record.error is None and record.extra["adapt"]["steps"] == 2
    assert record.flops > 0 and record.extra["predict"]["views"] == 2
    assert sum(p.numel() for p in lm.model.parameters()) == n_params   # reset removed the adapter

    out = run(RunSpec(method="sampling", dataset="gen-eval", model="random:tiny", limit=1, out=tmp_path / "run",
                      overrides=["transforms=[\"identity\",\"rot90\"]", "samples=2"]), progress=False)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["error"] is None and rows[0]["extra"]["predict"]["samples"] == 4
    assert json.loads((out / "manifest.json").read_text())["config"]["search"] == "sample"


def test_poe_scores_the_most_probable_candidates_first_whatever_the_sampling_order(monkeypatch):
    """All samples distinct and the most probable one drawn last: with room to score one
    candidate, product-of-experts must score that one, not the first drawn."""
    from methods.sampling import Candidate, Sampling, most_probable_first

    grids = [grid(["2"]), grid(["3"]), grid(["4"]), grid(["11", "11"])]
    logprobs = [-3.0, -2.5, -2.0, -0.2]   # the last drawn is the most probable
    drawn = [Candidate(0, "identity", g, lp) for g, lp in zip(grids, logprobs)]
    assert [grid_key(g) for g in most_probable_first(drawn)] == [grid_key(g) for g in grids[::-1]]
    # a grid drawn twice counts its best log-probability, and keeps its first place among ties
    twice = drawn + [Candidate(0, "rot90", grids[0], -0.1)]
    assert grid_key(most_probable_first(twice)[0]) == grid_key(grids[0])

    lm = stub_lm({answer(["11", "11"]): 0.9, answer(["2"]): 0.1})
    monkeypatch.setattr(Sampling, "sample", lambda self, views, room, budget, seed: (list(drawn), {"samples": 4}))
    attempts, info, _ = run_method(lm, small_task(), Budget(), search="sample", select="poe",
                                   transforms=["identity", "rot90"], max_scored=1)
    assert grid_key(attempts[0][0]) == grid_key(grids[3])
    assert len(info["poe_nll"][0]) == 1 and info["poe_nll"][0][0] == pytest.approx(-2 * math.log(0.9), abs=0.05)
    assert grid_key(attempts[0][1]) == grid_key(grids[2])   # the next most probable, unscored
