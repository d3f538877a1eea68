"""Two attention kernels for shapes where the CPU's general SDPA kernel is slow, swapped in for
the duration of a call through transformers' attention registry.

- `causal_attention(model)`: right-padded batches (training, and the prompts of a batched decode)
  run plain causal SDPA without a mask.  A real token never sees a pad under the causal mask (the
  pads come after it), so the outputs at real positions are those of the masked batch; the kernel
  skips the upper triangle and the mask.
  On the CPU, training calls (bf16, or fp32 under bf16 autocast, with gradients) go through
  `BlockCausalAttention`, blocks of query rows with a hand-written backward, instead of the
  flash kernel: 1.5x faster forward+backward (below).  Forward-only calls stay with flash.
- `decode_attention(model)`: one new token per row against a KV cache (a decode step) runs as two
  small matmuls and a softmax.  The CPU flash kernel tiles the query dimension, which is 1 here:
  4.2 ms per call for 12 rows x 1,000 cached tokens, against 0.44 ms for the matmuls (one
  thread).  Longer queries (the prompt) still go to SDPA.

Both leave models configured with another implementation (eager, flash-attention) alone."""
from __future__ import annotations

import contextlib

import torch

CAUSAL = "tta_causal_sdpa"
DECODE = "tta_decode"


def _shared_heads(query, key, value):
    """Grouped-query attention: repeat each key/value head for the query heads that share it."""
    heads, kv_heads = query.shape[1], key.shape[1]
    if kv_heads != heads:
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    return key, value


def _blocks_forward(query, key, value, scale: float, block: int, keep: list):
    """softmax(q k^T * scale, causal) v, `block` query rows at a time, each block against the keys
    up to its end, every matmul in the dtype of `key` and `value` (bf16); each block's softmax
    goes to `keep`."""
    length, dtype = query.shape[2], value.dtype
    out = torch.empty(value.shape, dtype=dtype, device=value.device)
    above_diagonal = torch.ones(block, block, dtype=torch.bool, device=query.device).triu_(1)
    with torch.autocast(query.device.type, enabled=False):   # the dtypes are chosen here
        scaled_query = (query * scale).to(dtype)
        for start in range(0, length, block):
            end = min(length, start + block)
            scores = torch.matmul(scaled_query[:, :, start:end], key[:, :, :end].transpose(-1, -2))
            scores[..., start:end].masked_fill_(above_diagonal[:end - start, :end - start], float("-inf"))
            weights = torch.softmax(scores, dim=-1)   # fp32 inside, rounded to bf16
            out[:, :, start:end] = torch.matmul(weights, value[:, :, :end])
            keep.append(weights)
    return out


class BlockCausalAttention(torch.autograd.Function):
    """Causal attention in blocks of query rows (each against the keys up to its end) with a
    hand-written backward, every matmul in bf16.  Why: the CPU flash kernel's small tiles do not
    reach the bf16 GEMM.  The embedded model's training shapes (2 x 4 heads x 1,000 tokens x 64
    dims, forward+backward), medians on this CPU: flash 46 ms at one thread and 24.5 ms at two,
    blocks 30 and 17 ms (1,700 tokens: 105 / 57 against 68 / 40 ms); flash was ~55% of a TTT
    step (`benchmarks/train_step.py` shows the effect on the step).

    The cost is memory: every block's softmax is kept for the backward, in bf16
    (B x H x L x (L + block) / 2 values per layer; 16 MB at the shapes above), so `_causal_sdpa`
    uses it only under `MAX_SAVED_BYTES`.

    Rounding: the scores are a bf16 matmul's output (flash accumulates them in fp32).  Against
    float64 the largest errors of the output and gradients are flash's within 2x
    (`tests/test_attention_cache.py`).  Through the whole embedded model, a LoRA's gradient on
    one gen-eval example is 3.9% from an fp32 model's in norm, against 3.1% with flash; bf16
    autocast itself is most of that.  fp32 scores cost a third of the forward's time in a TTT
    step (39% -> 36% of the bf16 rate).  Forward-only calls do not come here: with fp32
    scores the blocks measured 0.73-1.47x flash's speed (two threads, 12 x 1,000 tokens: 0.73x),
    and bf16 scores doubled the error of the answers' log-probabilities."""

    @staticmethod
    def forward(ctx, query, key, value, scale: float, block: int):
        # Queries and keys come in fp32 under autocast: cast once, and kept for the backward in bf16.
        low_query, low_key = query.to(value.dtype), key.to(value.dtype)
        probabilities = []
        out = _blocks_forward(query, low_key, value, scale, block, keep=probabilities)
        ctx.save_for_backward(low_query, low_key, value, out, *probabilities)
        ctx.scale, ctx.block, ctx.input_dtypes = scale, block, (query.dtype, key.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        low_query, low_key, value, out, *probabilities = ctx.saved_tensors
        scale, block, dtype = ctx.scale, ctx.block, value.dtype
        query_dtype, key_dtype = ctx.input_dtypes
        grad_out = grad_out.to(dtype).contiguous()
        # delta_i = sum_j P_ij dP_ij = dO_i . O_i, the softmax backward's row term
        delta = (grad_out.float() * out.float()).sum(-1, keepdim=True).to(dtype)
        grad_query = torch.empty_like(low_query)
        # key and value gradients collect a term from every later block: accumulate in fp32
        grad_key = torch.zeros(low_key.shape, dtype=torch.float32, device=low_key.device)
        grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
        for weights, start in zip(probabilities, range(0, low_query.shape[2], block)):
            end = start + weights.shape[2]
            block_grad = grad_out[:, :, start:end]
            grad_value[:, :, :end] += torch.matmul(weights.transpose(-1, -2), block_grad).float()
            # same-dtype elementwise ops: mixed bf16/fp32 ones take a slow unvectorised path (10x)
            grad_scores = torch.matmul(block_grad, value[:, :, :end].transpose(-1, -2))
            grad_scores = grad_scores.sub_(delta[:, :, start:end]).mul_(weights)
            grad_query[:, :, start:end] = torch.matmul(grad_scores, low_key[:, :, :end])
            grad_key[:, :, :end] += torch.matmul(grad_scores.transpose(-1, -2), low_query[:, :, start:end]).float()
        return (grad_query.to(query_dtype).mul_(scale), grad_key.mul_(scale).to(key_dtype),
                grad_value.to(dtype), None, None)


BLOCK = 256                 # query rows per block (128 and 64 measured 7-11% slower)
MAX_SAVED_BYTES = 2 ** 28   # the softmax kept for one layer's backward; above it, flash


def _blocked_dtype(value) -> torch.dtype | None:
    """The dtype the blocks multiply values in: bf16 as it is, fp32 under bf16 CPU autocast (the
    rotary embedding returns Llama's queries and keys in fp32 even under autocast: the blocks'
    scores take them as they come).  Others (fp16, plain fp32) are not measured: None."""
    if value.dtype == torch.bfloat16:
        return value.dtype
    if value.dtype == torch.float32 and torch.is_autocast_enabled("cpu") \
            and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        return torch.bfloat16
    return None


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _blocks_fit(query, key, value, dropout: float) -> bool:
    """Where the blocks are measured faster: CPU, bf16 (or under bf16 autocast), training with
    gradients, no attention dropout, and the kept softmax under MAX_SAVED_BYTES."""
    batch, heads, length, _ = query.shape
    kept = batch * heads * length * (length + BLOCK) // 2 * 2
    return (query.device.type == "cpu" and _blocked_dtype(value) is not None and dropout == 0.0
            and _needs_grad(query, key, value) and kept <= MAX_SAVED_BYTES)


def _causal_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    key, value = _shared_heads(query, key, value)
    dropout = dropout if module.training else 0.0
    if _blocks_fit(query, key, value, dropout):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        out = BlockCausalAttention.apply(query, key, value.to(_blocked_dtype(value)), scale, BLOCK)
        return out.transpose(1, 2).contiguous(), None
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                           dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None


def _decode_step(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """One query per row: softmax(q k^T * scale + mask) v, the matmuls in the inputs' dtype (bf16
    under autocast) and the softmax in fp32.  Against an fp32 computation its output is as close
    as SDPA's (max error 1e-3 for both, 12 rows x 1,000 keys); 0.44 ms against SDPA's 4.2 ms
    (one thread of this CPU).  Converting the cache to fp32 every step costs 1.0 ms."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    key, value = _shared_heads(query, key, value)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale
    if attention_mask is not None:
        scores = (scores.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool
                  else scores + attention_mask)
    out = torch.matmul(torch.softmax(scores, dim=-1).to(value.dtype), value)
    return out.transpose(1, 2).contiguous(), None


_registered = False


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        AttentionInterface.register(CAUSAL, _causal_sdpa)
        AttentionInterface.register(DECODE, _decode_step)
        _registered = True


@contextlib.contextmanager
def _swapped(model, name: str):
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    _register()
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


def causal_attention(model):
    """Right-padded batches only.  An unknown implementation also makes transformers skip building
    a mask -- and with it the packed-sequence guess from jumps in grid position ids."""
    return _swapped(model, CAUSAL)


def decode_attention(model):
    """Decode steps with a 4-D boolean mask (see `tta.inference.decoding`); other calls use SDPA."""
    return _swapped(model, DECODE)


def uses_sdpa(model) -> bool:
    """Whether the swaps above apply (the model's configured attention is SDPA)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", "sdpa") == "sdpa"
