"""The decode step of a Llama-architecture model as a short sequence of tensor operations.

A decode step reads one new token per row.  For the embedded 3.4M-parameter model its matmuls
are tiny, and transformers' forward spends the step on ~420 small operations (casts, norms,
rotary, cache bookkeeping, hooks) and on casting the whole fp32 key cache to bf16 for the
attention matmul.  `FastDecoder` does the same arithmetic in ~200 operations (half of them views)
over weights prepared once per decode (q/k/v fused into one bf16 matrix, gate and up into
another) and a key/value cache of its own, written in place.  `benchmarks/decoding.py` (2
threads, 36 views): batched decoding 0.80 -> 0.67 s, 4.8x one `generate()` per view.

The arithmetic is transformers' under autocast (bf16 linear layers, fp32 residual stream and
norms) except attention over the cache, done in fp32 here (faster on the CPU, see `__init__`):
logits differ in rounding only, and on the benchmark's 36 views 1 greedy answer differs.
`tests/test_fast_decode.py` checks the logits against the model's forward, with grouped heads
and a merged LoRA, and that the embedded model's answers and charges are the forward's.

Only models it can reproduce get it (`FastDecoder.unsupported` says why not): Llama layers with
SiLU, no biases, a rotary embedding with fixed frequencies, and linear layers that are plain or
a LoRA merged into its base.  Everything else decodes through the model's forward.

The harness meters a forward through hooks on the model's layers; this step does not run
them, so the decoder charges each step by the same formula (`tta.budget.charge_forward`), to
every meter attached to the model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BF16 = torch.bfloat16


def _base(model):
    """The `...ForCausalLM` under a PEFT wrapper, if any."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _weight(linear) -> torch.Tensor | None:
    """The weight a linear layer multiplies by: its own, or a merged LoRA's base weight (an
    unmerged adapter, or a bias, cannot be reproduced here: None).  Detached, so that a later
    `weight.data = ...` (`tta.model.loading.autocast_weights` putting fp32 back) leaves it be."""
    if getattr(linear, "bias", None) is not None:
        return None
    if isinstance(linear, torch.nn.Linear):
        return linear.weight.detach()
    base = getattr(linear, "base_layer", None)
    if isinstance(base, torch.nn.Linear) and base.bias is None and getattr(linear, "merged", False):
        return base.weight.detach()
    return None


def _rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class FastDecoder:
    """Decode steps for one batch: `FastDecoder(model, cache, capacity)` right after the prompts
    were read into `cache` (a transformers cache), then `step(...)` once per new token."""

    @staticmethod
    def unsupported(model) -> str | None:
        """Why this model cannot use the fast step (None: it can)."""
        base = _base(model)
        config = getattr(base, "config", None)
        if getattr(config, "model_type", None) != "llama":
            return f"model type {getattr(config, 'model_type', None)!r} (Llama only)"
        if getattr(config, "hidden_act", None) != "silu":
            return f"activation {config.hidden_act!r}"
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            return "linear biases"
        rotary = getattr(getattr(base, "model", None), "rotary_emb", None)
        if rotary is None or getattr(rotary, "rope_type", "default") not in ("default", "linear", "llama3"):
            return f"rotary embedding {getattr(rotary, 'rope_type', None)!r} (its frequencies change with length)"
        for layer in base.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                if _weight(linear) is None:
                    return "an unmerged adapter or a biased linear layer"
        if _weight(base.lm_head) is None:
            return "an adapted or biased output head"
        return None

    def __init__(self, model, cache, capacity: int):
        base = _base(model)
        config = base.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.embed = base.model.embed_tokens.weight.detach()
        self.final_norm = base.model.norm
        # The head's weights rounded to bf16 as under autocast, multiplied in fp32: for a small
        # vocabulary (16 x 256) the fp32 product takes 3 us, bf16 12 us.
        self.head = _weight(base.lm_head).to(BF16).float()
        rotary = base.model.rotary_emb
        self.inv_freq, self.rope_scale = rotary.inv_freq.float(), float(rotary.attention_scaling)
        self.layers = []
        for layer in base.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(dict(
                norm1=layer.input_layernorm, norm2=layer.post_attention_layernorm, scaling=attn.scaling,
                qkv=torch.cat([_weight(attn.q_proj), _weight(attn.k_proj), _weight(attn.v_proj)]).to(BF16),
                out=_weight(attn.o_proj).to(BF16),
                gate_up=torch.cat([_weight(mlp.gate_proj), _weight(mlp.up_proj)]).to(BF16),
                down=_weight(mlp.down_proj).to(BF16)))
        # The cache: the prompts' keys and values copied once into buffers with room for the
        # answers, in fp32, keys transposed to (dim, position).  Attention over the cache is 12 x 4
        # matrix-vector products per layer, which the CPU does faster in fp32 than in bf16 (for 12
        # rows x 500 positions, q kᵀ and the weighted sum of values take 76 + 84 us in fp32, 168 +
        # 144 us in bf16), and a (position, dim) slice made the bf16 matmul copy it first (1.9 ms
        # per layer at 1,000 positions).  So here attention is in fp32, where transformers' forward
        # under autocast computes it in bf16: the logits differ in rounding only (see the tests).
        self.keys, self.values = [], []
        for layer in cache.layers:
            rows, kv_heads, length, dim = layer.keys.shape
            room = max(capacity, length)
            keys = torch.empty((rows, kv_heads, dim, room), dtype=torch.float32, device=layer.keys.device)
            values = torch.empty((rows, kv_heads, room, dim), dtype=torch.float32, device=layer.keys.device)
            keys[..., :length] = layer.keys.transpose(-1, -2)
            values[:, :, :length] = layer.values
            self.keys.append(keys)
            self.values.append(values)
        self.length = length

    @torch.no_grad()
    def step(self, ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Next-token logits (fp32, rows x vocabulary) for one new token per row.  `ids` and
        `positions` are (rows,) or (rows, 1); `allowed` (rows, cached + 1) says which cache
        positions (the new one last) each row attends to."""
        ids, positions = ids.reshape(-1), positions.reshape(-1)
        rows, t = ids.shape[0], self.length
        if t >= self.values[0].shape[2]:
            self._grow()
        freqs = positions[:, None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]   # (rows, 1, head_dim): every head
        cos, sin = angles.cos() * self.rope_scale, angles.sin() * self.rope_scale
        masked = ~allowed[:, None, None, : t + 1].bool()
        groups = self.heads // self.kv_heads
        x = self.embed[ids]   # fp32 residual stream, as under autocast
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            qkv = F.linear(_rms_norm(x, layer["norm1"]).to(BF16), layer["qkv"])
            q, k, v = qkv.split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                 self.kv_heads * self.head_dim], dim=-1)
            q = q.view(rows, self.heads, self.head_dim)
            k = k.view(rows, self.kv_heads, self.head_dim)
            q = q * cos + _rotate_half(q) * sin
            keys[..., t] = k * cos + _rotate_half(k) * sin
            values[:, :, t] = v.view(rows, self.kv_heads, self.head_dim)
            # Query heads grouped under the key/value head they share: (rows, kv_heads, groups, dim).
            q = q.view(rows, self.kv_heads, groups, self.head_dim)
            scores = torch.matmul(q, keys[..., : t + 1]) * layer["scaling"]
            weights = torch.softmax(scores.masked_fill(masked, float("-inf")), dim=-1)
            attended = torch.matmul(weights, values[:, :, : t + 1]).reshape(rows, -1)
            x = x + F.linear(attended.to(BF16), layer["out"])
            gate, up = F.linear(_rms_norm(x, layer["norm2"]).to(BF16), layer["gate_up"]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer["down"])
        self.length = t + 1
        return F.linear(_rms_norm(x, self.final_norm), self.head)

    def _grow(self) -> None:
        """More answer tokens than reserved: double the buffers."""
        for i, (keys, values) in enumerate(zip(self.keys, self.values)):
            self.keys[i] = keys.new_empty((*keys.shape[:3], 2 * keys.shape[3]))
            self.keys[i][..., : self.length] = keys[..., : self.length]
            self.values[i] = values.new_empty((*values.shape[:2], 2 * values.shape[2], values.shape[3]))
            self.values[i][:, :, : self.length] = values[:, :, : self.length]
