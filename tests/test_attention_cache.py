"""The decoder's speed-ups below the model: the decode-step attention kernel, the reserved KV
cache and the linear weights cast once per decode.  Each must compute what the library's own
path computes."""
import pytest
import torch

from tta.model.attention import _decode_step, decode_attention
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


def test_weights_cast_once_for_decoding_give_the_same_answers_and_are_put_back(tiny, monkeypatch):
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
