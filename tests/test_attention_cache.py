"""The speed-ups below the model: the decode-step and blocked training attention kernels, the
reserved KV cache and the linear weights cast once per decode.  Each must compute what the
library's own path computes."""
import pytest
import torch

from tta.model import attention
from tta.model.attention import BlockCausalAttention, _decode_step, decode_attention
from tta.model.cache import reserved_cache


def test_decode_step_attention_equals_sdpa_with_the_same_mask():
    """Fails if the decode kernel drops the mask, the scale, or mixes up the grouped heads."""
    torch.manual_seed(0)
    rows, heads, kv_heads, keys, dim = 3, 4, 2, 37, 16
    query = torch.randn(rows, heads, 1, dim)
    key, value = torch.randn(rows, kv_heads, keys, dim), torch.randn(rows, kv_heads, keys, dim)
    mask = torch.rand(rows, 1, 1, keys) > 0.3
    mask[..., -1] = True
    module = torch.nn.Module().eval()
    ours, _ = _decode_step(module, query, key, value, mask, scaling=0.3)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(2, dim=1), value.repeat_interleave(2, dim=1), attn_mask=mask, scale=0.3)
    assert torch.allclose(ours, expected.transpose(1, 2), atol=1e-5)
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert torch.allclose(_decode_step(module, query, key, value, additive, scaling=0.3)[0], ours, atol=1e-5)


@pytest.mark.parametrize("length,block", [(150, 64), (64, 64), (40, 256)])
def test_blocked_training_attention_matches_float64_as_closely_as_the_flash_kernel(length, block):
    """Fails if a block sees keys after its rows (causality), drops a block's share of the key
    or value gradient, or gets the softmax backward wrong: errors would be of order one, not of
    bf16 rounding.  Lengths that are not multiples of the block cover the last, short block."""
    torch.manual_seed(0)
    shape = (2, 3, length, 16)
    inputs = [torch.randn(shape) for _ in range(3)]
    grad_out = torch.randn(shape)
    scale = 0.3

    def run(kernel, dtype):
        leaves = [x.to(dtype).requires_grad_() for x in inputs]
        out = kernel(*leaves)
        out.backward(grad_out.to(dtype))
        return [out.double()] + [x.grad.double() for x in leaves]

    def flash(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

    reference = run(flash, torch.float64)
    ours = run(lambda q, k, v: BlockCausalAttention.apply(q, k, v, scale, block), torch.bfloat16)
    theirs = run(flash, torch.bfloat16)
    for name, mine, flash_value, exact in zip(("out", "dq", "dk", "dv"), ours, theirs, reference):
        relative = lambda x: ((x - exact).abs().max() / exact.abs().max()).item()   # noqa: E731
        assert relative(mine) < max(2 * relative(flash_value), 2e-2), name


def test_causal_calls_take_the_blocks_only_where_they_are_measured_faster(monkeypatch, cpu_bf16):
    """Fails if training on the CPU under autocast stops reaching the blocks (the rotary
    embedding hands them fp32 queries), or their values in fp32, or if forward-only calls, fp32
    without autocast, fp16, attention dropout or inputs too long for the kept softmax reach
    them; and if autocast changes what the blocks compute."""
    from tta.model.loading import autocast
    calls = []
    real_apply = BlockCausalAttention.apply
    monkeypatch.setattr(BlockCausalAttention, "apply", lambda *a: calls.append(a[2].dtype) or real_apply(*a))
    query = torch.randn(1, 2, 8, 4, requires_grad=True)
    module = torch.nn.Module().train()
    with autocast(torch.device("cpu")):
        under_autocast, _ = attention._causal_sdpa(module, query, query, query, None)
        with torch.no_grad():
            attention._causal_sdpa(module, query, query, query, None)
        attention._causal_sdpa(module, query, query, query, None, dropout=0.1)
    attention._causal_sdpa(module, query, query, query, None)
    half = query.detach().half().requires_grad_()
    attention._causal_sdpa(module, half, half, half, None)
    low = query.detach().bfloat16().requires_grad_()
    plain, _ = attention._causal_sdpa(module, query, query, low, None)
    assert calls == [torch.bfloat16, torch.bfloat16]
    assert torch.equal(under_autocast, plain)
    monkeypatch.setattr(attention, "MAX_SAVED_BYTES", 2 * 8 * (8 + attention.BLOCK) // 2 * 2 - 1)
    attention._causal_sdpa(module, low, low, low, None)
    assert len(calls) == 2


def test_the_decode_kernel_is_swapped_in_only_while_decoding_and_only_for_sdpa(tiny):
    config = tiny.model.config
    assert config._attn_implementation == "sdpa"
    with decode_attention(tiny.model):
        assert config._attn_implementation == "tta_decode"
    assert config._attn_implementation == "sdpa"
    config._attn_implementation = "eager"
    try:
        with decode_attention(tiny.model):
            assert config._attn_implementation == "eager"   # a user's choice is left alone
    finally:
        config._attn_implementation = "sdpa"


def _feed(cache, steps, rows=2):
    """Prompt of 5 positions, then one position per step; every 3rd step repeats the rows (as
    sampling does after its prompt) once.  Returns the keys and values the cache handed back."""
    torch.manual_seed(1)
    out = []
    for step, length in enumerate([5] + [1] * steps):
        if step == 3:
            cache.batch_repeat_interleave(2)
            rows *= 2
        keys, values = torch.randn(rows, 2, length, 4), torch.randn(rows, 2, length, 4)
        out.append(tuple(t.clone() for t in cache.update(keys, values, 0)))
    return out


@pytest.mark.parametrize("capacity", [4, 8, 64])   # smaller than the prompt, outgrown mid-way, ample
def test_the_reserved_cache_hands_back_what_the_dynamic_cache_does(capacity):
    """Fails on a wrong write offset, a buffer left stale after rows are repeated, or growth that
    loses positions."""
    from transformers import DynamicCache

    ours, theirs = _feed(reserved_cache(capacity), 9), _feed(DynamicCache(), 9)
    for (k, v), (k_ref, v_ref) in zip(ours, theirs):
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


def test_weights_cast_once_for_decoding_give_the_same_answers_and_are_put_back(tiny, monkeypatch, cpu_bf16):
    """Fails if the cast copies change what autocast computes, leak out of the decode (fp32 weights
    not restored), or touch a weight tied to the input embeddings."""
    import contextlib

    import tta.inference.decoding as decoding
    from conftest import flip_task
    from tta.model.loading import autocast_weights

    tasks = [flip_task(f"t{i}", size=2 + i, seed=i) for i in range(3)]
    prompts = [tiny.format.encode(list(t.train), t.test[0].input).input_ids for t in tasks]
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    cast = decoding.generate(tiny, prompts, max_new_tokens=12, batch_size=3)
    monkeypatch.setattr(decoding, "autocast_weights", lambda model, device: contextlib.nullcontext())
    plain = decoding.generate(tiny, prompts, max_new_tokens=12, batch_size=3)
    assert [(g.tokens, g.logprob) for g in cast] == [(g.tokens, g.logprob) for g in plain]
    after = tiny.model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())

    tied = torch.nn.ModuleDict({"embed": torch.nn.Embedding(5, 4), "head": torch.nn.Linear(4, 5, bias=False),
                                "other": torch.nn.Linear(4, 4)})
    tied["head"].weight = tied["embed"].weight
    with autocast_weights(tied, torch.device("cpu")):
        assert tied["head"].weight.dtype == torch.float32 and tied["other"].weight.dtype == torch.bfloat16
    assert tied["other"].weight.dtype == torch.float32
