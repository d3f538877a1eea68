"""The fast decode step (`tta.model.fast_decode`): it must compute what the model's own forward
computes, be used only where it can, and be charged as the model's forward would be."""
import numpy as np
import pytest
import torch

from tta.budget import Budget, Meter
from tta.inference.decoding import generate, score_answers
from tta.model.attention import causal_attention
from tta.model.cache import reserved_cache
from tta.model.fast_decode import FastDecoder
from tta.model.loading import cache_keyword, autocast, load_model, output_cache


def _llama(kv_heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
                         initializer_range=0.1)   # logits spread wider than at the default 0.02
    return LlamaForCausalLM(config).eval()


def _steps_both_ways(model, prompts, steps=6, copies=1):
    """Next-token logits after right-padded `prompts` and after each of `steps` tokens fed to
    every row (`copies` rows per prompt, each fed its own tokens): from the model's forward
    (under autocast, as the decoder runs it) and from `FastDecoder`."""
    rows, length = len(prompts), max(map(len, prompts))
    ids = torch.zeros(rows, length, dtype=torch.long)
    mask = torch.zeros(rows, length, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, :len(p)], mask[r, :len(p)] = torch.tensor(p), 1
    positions = torch.arange(length).expand(rows, -1)
    lengths = mask.sum(1)
    cache = reserved_cache(length + steps)
    with torch.no_grad(), autocast(torch.device("cpu")), causal_attention(model):
        out = model(input_ids=ids, position_ids=positions, use_cache=True, **{cache_keyword(): cache})
    cache = output_cache(out)
    theirs = [out.logits[torch.arange(rows), lengths - 1].float()]
    fast = FastDecoder(model)
    ours = [fast.read_prompts(ids, positions, lengths - 1, length + 2)]   # outgrown on the way: the buffers grow
    if copies > 1:
        cache.batch_repeat_interleave(copies)
        fast.repeat_rows(copies)
        rows, mask, lengths = rows * copies, mask.repeat_interleave(copies, 0), lengths.repeat_interleave(copies)
        theirs[0], ours[0] = theirs[0].repeat_interleave(copies, 0), ours[0].repeat_interleave(copies, 0)
    for step in range(steps):
        token = torch.tensor([(3 * step + r) % 16 for r in range(rows)])
        position = lengths + step
        mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.long)], dim=1)
        with torch.no_grad(), autocast(torch.device("cpu")):
            out = model(input_ids=token[:, None], position_ids=position[:, None], use_cache=True,
                        attention_mask=mask[:, None, None, :].bool(), **{cache_keyword(): cache})
        theirs.append(out.logits[:, -1].float())
        ours.append(fast.step(token, position, mask))
    return torch.stack(theirs), torch.stack(ours)


@pytest.mark.parametrize("kv_heads,copies", [(4, 1), (2, 1), (2, 3)])   # plain, grouped-query, copies
def test_fast_steps_give_the_logits_of_the_model_forward(kv_heads, copies):
    """Fails on a wrong rotary position, a pad attended to (the second prompt is padded), a
    mixed-up key/value head group, a missing norm or residual, the wrong last prompt position,
    a cache write at the wrong offset (the later steps would drift), or copies of a prompt
    mixed up with each other or with another prompt's."""
    theirs, ours = _steps_both_ways(_llama(kv_heads), [[1, 2, 3, 4, 5, 6, 7], [1, 8, 9]], copies=copies)
    # Both attend to a bf16 cache, with different kernels: rounding apart (2% of
    # the logits' spread when measured; a wrong position, mask or head is of the spread's order).
    assert (ours - theirs).abs().max() < 0.05 * theirs.std(), ((ours - theirs).abs().max(), theirs.std())
    top2 = theirs.topk(2, dim=-1).values
    clear = top2[..., 0] - top2[..., 1] > 0.1   # no near-tie that rounding may flip
    assert clear.float().mean() >= 0.25 and (ours.argmax(-1) == theirs.argmax(-1))[clear].all()


def _forward_last_logits(model, sequence: list[int]) -> torch.Tensor:
    with torch.no_grad(), autocast(torch.device("cpu")):
        return model(input_ids=torch.tensor([sequence]), position_ids=torch.arange(len(sequence))[None]).logits[0, -1].float()


def test_rows_at_their_own_depths_get_the_logits_of_their_own_prefix(monkeypatch):
    """`step_at`, as a depth-first search drives it: rows of different prompt lengths, at
    different depths, backtracking (a slot written again) and rows dropped on the way.  Fails if
    a row attends to a slot of an abandoned branch or beyond its depth, to another row's slots,
    to the pads after its prompt, if dropping rows mixes up the survivors' caches, or if a slot
    no row wrote yet (row 1 at slot 0 while row 0 is at slot 2) leaks what the allocator left
    there: uninitialised memory is NaN here, as it can be."""
    model = _llama(2)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [1, 8, 9], [4, 4, 2, 7, 1]]
    rows, length = len(prompts), max(map(len, prompts))
    ids = torch.zeros(rows, length, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, :len(p)] = torch.tensor(p)
    # (row, slot, token) per step: row 0 goes deep and backtracks to slot 1; row 1 backtracks to
    # slot 0 twice; row 2 is dropped after the third step.  Slot 4 outgrows the buffers.
    schedule = [[(0, 0, 3), (1, 0, 5), (2, 0, 9)],
                [(0, 1, 11), (1, 1, 6), (2, 1, 2)],
                [(0, 2, 7), (1, 0, 12), (2, 2, 13)],
                [(0, 1, 14), (1, 1, 10)],
                [(0, 2, 15), (1, 0, 1)],
                [(0, 3, 2), (1, 1, 8)],
                [(0, 4, 3), (1, 2, 9)]]
    empty = torch.empty
    with monkeypatch.context() as patched:
        patched.setattr(torch, "empty", lambda *shape, **kw: empty(*shape, **kw).fill_(float("nan")))
        fast = FastDecoder(model)
        fast.read_prompts(ids, torch.arange(length).expand(rows, -1), torch.tensor([len(p) - 1 for p in prompts]), length + 2)
        paths = [[] for _ in prompts]   # each row's answer tokens so far, as the cache should hold them
        alive, steps = [0, 1, 2], []
        for moves in schedule:
            if [r for r, _, _ in moves] != alive:
                fast.keep_rows([alive.index(r) for r, _, _ in moves])
                alive = [r for r, _, _ in moves]
            for r, slot, token in moves:
                paths[r] = paths[r][:slot] + [token]
            ours = fast.step_at(torch.tensor([t for _, _, t in moves]),
                                torch.tensor([len(prompts[r]) + slot for r, slot, _ in moves]), [slot for _, slot, _ in moves])
            steps.append((moves, ours, [list(paths[r]) for r, _, _ in moves]))
    for moves, ours, row_paths in steps:
        for row, ((r, _, _), path) in enumerate(zip(moves, row_paths)):
            theirs = _forward_last_logits(model, prompts[r] + path)
            assert (ours[row] - theirs).abs().max() < 0.05 * theirs.std(), (moves, r)


def test_the_fast_step_is_used_only_where_it_reproduces_the_model():
    """Fails if a model it cannot reproduce (another architecture, an unmerged adapter, biases)
    were decoded by it, or if a merged LoRA were refused."""
    from peft import LoraConfig, get_peft_model
    model = _llama(4)
    assert FastDecoder.unsupported(model) is None
    adapted = get_peft_model(_llama(4), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert "adapter" in FastDecoder.unsupported(adapted)
    adapted.merge_adapter()
    assert FastDecoder.unsupported(adapted) is None
    model.config.hidden_act = "gelu"
    assert "activation" in FastDecoder.unsupported(model)
    from transformers import GPT2Config, GPT2LMHeadModel
    assert "Llama only" in FastDecoder.unsupported(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2)))


def test_a_merged_lora_decodes_as_its_model_does():
    """Fails if the fast step reads a merged LoRA's base weight before the merge, or the adapter
    twice."""
    from peft import LoraConfig, get_peft_model
    adapted = get_peft_model(_llama(4), LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"],
                                                   init_lora_weights=False)).eval()
    adapted.merge_adapter()
    theirs, ours = _steps_both_ways(adapted, [[1, 2, 3, 4, 5], [6, 7]])
    assert (ours - theirs).abs().max() < 0.05 * theirs.std()


@pytest.fixture(scope="module")
def embedded():
    torch.set_num_threads(2)
    return load_model("default", device="cpu")


def _views(lm, n_tasks=1):
    from tta.data.augment import inference_transforms
    from tta.data.datasets import load_dataset
    from tta.inference.predict import answer_room, build_views
    tasks = load_dataset("gen-eval").tasks[:n_tasks]
    return [([v.prompt for v in build_views(lm, t, inference_transforms(), 2, np.random.default_rng(0))],
             answer_room(lm.format, t)) for t in tasks]


def _metered(lm, run, cap=None):
    """(what `run(meter)` returns, the FLOPs a meter attached to `lm.model` charged meanwhile),
    the meter capped at `cap` FLOPs."""
    meter = Meter(Budget(flops=cap))
    meter.attach(lm.model)
    try:
        return run(meter), meter.flops
    finally:
        meter.detach()


def test_batched_decoding_answers_and_charges_as_through_the_model_forward(embedded):
    """The embedded model on a task's 12 views: the same answers but where a near tie went the
    other way, log-probabilities within rounding, and the FLOPs charged to a meter the decode
    was not given (compute must not escape the meter because the steps bypass the model's
    hooks)."""
    (views, room), = _views(embedded)
    (slow, slow_flops), (quick, quick_flops) = (
        _metered(embedded, lambda meter: generate(embedded, views, max_new_tokens=room, fast_steps=fast))
        for fast in (False, True))
    # Both paths attend in bf16, with different kernels, so a greedy choice between two tokens
    # a rounding apart can differ: 2 of the 12 answers did when measured, each one the fp32
    # model finds more likely than the forward's (-5.44 against -5.97, -5.13 against -6.02).
    # A wrong cache, mask or position changes most answers, and for the worse.
    same = [a.tokens == b.tokens for a, b in zip(quick, slow)]
    assert sum(same) >= len(same) - 3, same
    with_end = [g.tokens + [embedded.format.eos_id] * g.finished for g in quick + slow]
    likelihood = [-s.nll for s in score_answers(embedded, views + views, with_end)]
    for row in (r for r, equal in enumerate(same) if not equal):
        assert likelihood[row] > likelihood[len(views) + row] - 0.5, (row, likelihood[row], likelihood[len(views) + row])
    # Per answer token, where the answers agree: the two paths round bf16 differently, by an
    # amount that depends on the host's kernels (up to 0.0026 per token measured; 0.0012 here).
    # A wrong cache or position costs far more.
    assert max(abs(a.logprob - b.logprob) / len(a.tokens) for a, b, equal in zip(quick, slow, same) if equal) < 0.005
    # Equal but for the output head after the prompts: the forward runs it on each distinct last
    # prompt position for every row, the fast path on each row's own (a 1e-5 difference here).
    assert quick_flops == pytest.approx(slow_flops, rel=1e-4) and quick_flops > 0


def test_a_budget_stops_fast_steps_where_it_stops_model_steps(embedded):
    """Fails if the fast path asks the budget a different question than the model path, or
    charges a step the cap could not pay for."""
    (views, room), = _views(embedded)

    def decode(cap, fast):
        out, flops = _metered(embedded, lambda meter: generate(
            embedded, views, budget=meter.handle(embedded.model), max_new_tokens=room, fast_steps=fast), cap)
        return flops, [len(g.tokens) for g in out]

    whole, lengths = decode(None, True)
    cap = 0.98 * whole   # the prompts and most of the answers
    (fast_flops, fast_lengths), (slow_flops, slow_lengths) = decode(cap, True), decode(cap, False)
    assert fast_lengths == slow_lengths and sum(fast_lengths) < sum(lengths)
    assert fast_flops <= cap and fast_flops == pytest.approx(slow_flops, rel=1e-4)


def test_depth_first_search_through_the_fast_decoder_finds_what_the_forward_finds(embedded):
    """Fails if backtracking leaves stale positions in the fast decoder's cache (a sibling would
    see its brother's token), or if the search's forwards escape the meter."""
    from tta.inference.search import dfs
    (views, room), = _views(embedded)

    def search(fast):
        results = [dfs(embedded, view, max_new_tokens=room, threshold=0.02, fast=fast) for view in views[:4]]
        return {(i, tuple(c.tokens)): c.logprob for i, r in enumerate(results) for c in r.completions
                if c.logprob > -3.5}

    (slow, slow_flops), (quick, quick_flops) = (_metered(embedded, lambda meter: search(fast)) for fast in (False, True))
    assert quick.keys() == slow.keys() and len(quick) >= 2   # well above the threshold (-3.9): the same answers
    assert all(abs(quick[k] - slow[k]) < 0.06 for k in quick)
    assert quick_flops > 0 and quick_flops == pytest.approx(slow_flops, rel=0.1)


def test_searches_side_by_side_find_and_charge_what_searches_one_at_a_time_do(embedded):
    """`dfs_many` over 6 views in batches of 4 (the second batch of 2; searches ending at
    different times drop out of their batch).  Fails if a row's search sees another row's
    nodes or a stale branch (different answers or probabilities), if dropping finished rows
    mixes up the others, or if a batched step charges other than the nodes it computed."""
    from tta.inference.search import dfs, dfs_many
    (views, room), = _views(embedded)
    views = views[:6]

    def completions(results):   # above the threshold (-3.9), where rounding cannot move them across
        return [{tuple(c.tokens): c.logprob for c in r.completions if c.logprob > -3.7} for r in results]

    alone, alone_flops = _metered(embedded, lambda meter: [dfs(embedded, v, max_new_tokens=room, threshold=0.02)
                                                           for v in views])
    together, together_flops = _metered(embedded, lambda meter: dfs_many(embedded, views, max_new_tokens=room,
                                                                         threshold=0.02, batch_size=4))
    assert len({r.forwards for r in alone}) > 1   # the searches do end at different times
    for one, many in zip(completions(alone), completions(together)):
        assert one.keys() == many.keys()
        assert all(abs(one[k] - many[k]) < 0.02 for k in one)   # batched bf16 products: rounding apart
    assert sum(map(len, completions(alone))) >= 3
    # The same nodes, up to a node whose probability rounding moves across the threshold.
    assert all(abs(a.forwards - b.forwards) <= 0.02 * a.forwards for a, b in zip(alone, together))
    per_node = alone_flops / sum(r.forwards for r in alone)
    assert abs(together_flops - alone_flops) <= per_node * sum(abs(a.forwards - b.forwards) for a, b in zip(alone, together)) + 1e-6 * alone_flops


def test_under_a_cap_a_batch_of_searches_advances_together_and_gives_up_its_later_searches_first(embedded):
    """Fails if a batched search overspends the cap, if the budget pays some searches' nodes
    while earlier searches of the batch are cut, if a cut search returns an answer it would not
    have found uncut, or if the views after a stopped batch are searched anyway."""
    from tta.inference.search import dfs_many
    (views, room), = _views(embedded)
    views = views[:6]
    search = lambda meter, batch: dfs_many(embedded, views, meter.handle(embedded.model), max_new_tokens=room,
                                           threshold=0.02, batch_size=batch)
    full, whole = _metered(embedded, lambda meter: search(meter, 6))
    cut, spent = _metered(embedded, lambda meter: search(meter, 6), 0.8 * whole)
    assert spent <= 0.8 * whole and all(r.stopped_by_budget for r in cut)
    forwards = [r.forwards for r in cut]
    assert forwards == sorted(forwards, reverse=True) and forwards[0] - forwards[-1] <= 1   # in step, later first
    assert all(r.forwards < f.forwards for r, f in zip(cut, full))
    for r, f in zip(cut, full):   # well above the threshold: batches of other sizes round differently
        clear = lambda result: {tuple(c.tokens) for c in result.completions if c.logprob > -3.7}
        assert clear(r) <= clear(f)
    grouped, spent = _metered(embedded, lambda meter: search(meter, 2), 0.3 * whole)
    assert spent <= 0.3 * whole and all(r.stopped_by_budget for r in grouped)
    assert grouped[0].forwards > 0 and [r.forwards for r in grouped[2:]] == [0, 0, 0, 0]


def test_a_bf16_model_decodes_with_an_fp32_residual_stream():
    """Fails if a model held in bf16 (as on a GPU) breaks the fast path's dtypes."""
    model = _llama(2)
    fast = FastDecoder(model.to(torch.bfloat16))
    ids, positions = torch.tensor([[1, 2, 3, 4]]), torch.arange(4)[None]
    first = fast.read_prompts(ids, positions, torch.tensor([3]), 8)
    after = fast.step(torch.tensor([5]), torch.tensor([4]), torch.ones(1, 5))
    assert first.dtype == after.dtype == torch.float32 and torch.isfinite(after).all()
    with torch.no_grad():
        reference = model.float()(input_ids=torch.tensor([[1, 2, 3, 4, 5]]), position_ids=torch.arange(5)[None]).logits[0, -1]
    assert (after[0] - reference).abs().max() < 0.1 * reference.std()   # bf16 weights: rounding apart


@pytest.mark.parametrize("native_bf16", [True, False])
def test_the_cpu_computes_in_bf16_only_where_it_multiplies_bf16_natively(monkeypatch, native_bf16):
    """Fails if a CPU without native bf16 matmuls still gets bf16 autocast, cast weights or a bf16
    fast-decoder cache (there torch's scalar bf16 kernel ran ~18x slower than fp32), or if one with
    them loses it; and if `TTA_CPU_BF16` stops deciding."""
    import tta.model.loading as loading
    from tta.model.loading import autocast_weights, autocasts, cpu_multiplies_bf16
    monkeypatch.setattr(loading, "cpu_multiplies_bf16", lambda: native_bf16)
    cpu = torch.device("cpu")
    assert autocasts(cpu) is native_bf16 and autocasts(torch.device("cuda"))
    model = load_model("random:tiny", device="cpu").model
    with autocast_weights(model, cpu):
        assert model.lm_head.weight.dtype == (torch.bfloat16 if native_bf16 else torch.float32)
    assert model.lm_head.weight.dtype == torch.float32
    assert FastDecoder(model).dtype == (torch.bfloat16 if native_bf16 else torch.float32)
    monkeypatch.undo()
    for setting, expected in (("1", True), ("0", False)):
        cpu_multiplies_bf16.cache_clear()
        monkeypatch.setenv("TTA_CPU_BF16", setting)
        assert cpu_multiplies_bf16() is expected
    cpu_multiplies_bf16.cache_clear()
