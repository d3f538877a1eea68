"""Prompt reading and decode steps of a Llama-architecture model as short sequences of tensor
operations, for batched decoding (`tta.inference.decoding.FastSteps`).

A decode step reads one new token per row.  For the embedded 3.4M-parameter model its matmuls
are tiny, and transformers' forward spends the step on ~420 small operations (casts, norms,
rotary, cache bookkeeping, hooks) and on casting the whole fp32 key cache to bf16 for the
attention matmul.  `FastDecoder.step` does the same arithmetic in ~200 operations (half of them
views) over weights prepared once per batch (q/k/v fused into one bf16 matrix, gate and up into
another) and a key/value cache of its own, written in place.  `read_prompts` fills that cache
and, in the last layer, carries only each row's last position past its keys and values.
`benchmarks/decoding.py` (2 threads, 36 views): batched decoding 0.80 s through the forward,
0.57-0.65 s here, 4.9-5.5x one `generate()` per view over three runs.

On long prompts a step is mostly reading the cache, so the cache is bf16 and attended to by
`scaled_dot_product_attention` (see `__init__`).  Measured on one host, one thread, against
the fp32 cache and matmuls this replaced: arc1-eval task 5 (4 greedy views of ~550 tokens)
4.68 -> 3.06 s; 92e50de0 (5,656 tokens, `ttt_full` at 1e12: 56 views, no training step) 88.6
-> 65.6 s of task time, the same answers and charge; the 36 short gen-eval views of
`benchmarks/decoding.py` 0.89 -> 0.86 s.  Sampling's copies read each other's answer slots,
masked: 4 copies of 4 views, 9.3 -> 10.3 s on task 5 (0.53 -> 0.61 s on gen-eval tasks 0-1).

The arithmetic is transformers' under autocast (bf16 linear layers and attention, fp32
residual stream and norms); the kernels differ, so logits differ in rounding only.  On the
12 views of gen-eval task 0, 2 greedy answers differ from the forward's, both more likely under
the all-fp32 model than the forward's (log-likelihood -5.44 against -5.97, -5.13 against
-6.02); on the 10 that agree, the answer's log-likelihood is off the all-fp32 model's by
0.003-0.039 here and 0.003-0.053 through the forward.
`tests/test_fast_decode.py` checks the logits against the model's forward, with grouped heads,
copies and a merged LoRA, and that the embedded model's answers (but near ties) and charges are
the forward's.

Only models it can reproduce get it (`FastDecoder.unsupported` says why not): Llama layers with
SiLU, no biases, a rotary embedding with fixed frequencies, and linear layers that are plain or
a LoRA merged into its base.  Everything else decodes through the model's forward.

The harness meters a forward through hooks on the model's layers; this code does not run them,
so its caller charges each call by the same formula (`tta.budget.charge_forward`), to every
meter attached to the model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tta.model.loading import autocasts

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


class _Norm:
    """An RMSNorm's scale in fp32 and its epsilon: the residual stream here is fp32 whatever the
    model's dtype (as under autocast for an fp32 model; more precise for a bf16 one)."""

    def __init__(self, norm):
        self.weight, self.eps = norm.weight.detach().float(), norm.variance_epsilon

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


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
        if type(base.model.embed_tokens) is not torch.nn.Embedding:
            return f"input embedding {type(base.model.embed_tokens).__name__} (an adapter on it?)"
        return None

    def __init__(self, model):
        base = _base(model)
        config = base.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.embed = base.model.embed_tokens.weight.detach()
        # bf16 products as under autocast; fp32 where the device does not autocast (a CPU
        # without native bf16 matmuls, see `tta.model.loading.cpu_multiplies_bf16`).
        fp32_weights = self.embed.dtype == torch.float32
        self.dtype = BF16 if autocasts(self.embed.device) or not fp32_weights else torch.float32
        self.final_norm = _Norm(base.model.norm)
        # The head's weights rounded to bf16 as under autocast, multiplied in fp32: for a small
        # vocabulary (16 x 256) the fp32 product takes 3 us, bf16 12 us.
        self.head = _weight(base.lm_head).to(self.dtype).float()
        rotary = base.model.rotary_emb
        self.inv_freq, self.rope_scale = rotary.inv_freq.detach().float(), float(rotary.attention_scaling)
        self.layers = []
        for layer in base.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(dict(
                norm1=_Norm(layer.input_layernorm), norm2=_Norm(layer.post_attention_layernorm), scaling=attn.scaling,
                qkv=torch.cat([_weight(attn.q_proj), _weight(attn.k_proj), _weight(attn.v_proj)]).to(self.dtype),
                out=_weight(attn.o_proj).to(self.dtype),
                gate_up=torch.cat([_weight(mlp.gate_proj), _weight(mlp.up_proj)]).to(self.dtype),
                down=_weight(mlp.down_proj).to(self.dtype)))
        # The cache: per layer one buffer of keys and one of values in `self.dtype` (bf16 unless
        # the CPU lacks it), (prompts, kv_heads, slots, dim).  Slots 0 .. prompt_length-1 hold the prompts (right-padded); after them,
        # the answer tokens, interleaved by copy: token j of copy c at prompt_length + j x copies
        # + c.  So a step reads one contiguous prefix of each prompt's buffer, and the copies of
        # a prompt (sampling) read its part once, as more query rows of one attention call
        # (benchmarks/sampling.py: 4 copies per prompt).  A step reads the whole cache (memory-
        # bound: on long prompts most of the step), so it is kept in bf16 and attended to by
        # `scaled_dot_product_attention`, whose CPU kernel reads bf16 at full speed: 16 rows x 4
        # heads over 1,800 positions, one thread, 1.4-1.5 ms per layer, against 2.8 ms for the fp32
        # cache and plain matmuls this replaced (and 3.5 ms for bf16 through matmul).  bf16 keys
        # and values are what transformers' forward attends to under autocast.
        self.keys: list[torch.Tensor] = []     # (prompts, kv_heads, slots, dim), bf16
        self.values: list[torch.Tensor] = []   # the same
        self.prompts = self.copies = 0         # rows = prompts x copies (p0, p0, ..., p1, ...)
        self.prompt_length = self.length = 0   # positions each row has cached: its prompt's, and in all

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for `positions` (any shape), with a trailing head_dim axis, in fp32."""
        freqs = positions[..., None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos() * self.rope_scale, angles.sin() * self.rope_scale

    def _split_heads(self, qkv: torch.Tensor):
        """(rows, [tokens,] q|k|v) -> q (rows, [tokens,] heads, dim), k and v (..., kv_heads, dim)."""
        q, k, v = qkv.split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                             self.kv_heads * self.head_dim], dim=-1)
        lead = qkv.shape[:-1]
        return (q.view(*lead, self.heads, self.head_dim), k.view(*lead, self.kv_heads, self.head_dim),
                v.view(*lead, self.kv_heads, self.head_dim))

    def _mlp(self, x: torch.Tensor, layer: dict) -> torch.Tensor:
        gate, up = F.linear(layer["norm2"](x).to(self.dtype), layer["gate_up"]).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, layer["down"])

    def _attend(self, q: torch.Tensor, i: int, allowed: torch.Tensor) -> torch.Tensor:
        """One query per row (rows, heads, dim) against the first slots of layer `i`'s cache:
        `allowed` (prompts, 1, copies x groups, slots) is true where a query may look.  The
        copies of a prompt and the query heads sharing a key/value head are the query rows of
        one attention over the prompt's buffer.  Returns (rows, heads * dim)."""
        prompts, copies, kv_heads, dim = self.prompts, self.copies, self.kv_heads, self.head_dim
        groups, slots = self.heads // kv_heads, allowed.shape[-1]
        q = q.view(prompts, copies, kv_heads, groups, dim).transpose(1, 2).reshape(prompts, kv_heads, copies * groups, dim)
        out = F.scaled_dot_product_attention(q.to(self.dtype), self.keys[i][:, :, :slots], self.values[i][:, :, :slots],
                                             attn_mask=allowed, scale=self.layers[i]["scaling"])
        return out.view(prompts, kv_heads, copies, groups, dim).transpose(1, 2).reshape(prompts * copies, -1)

    def _query_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """(prompts, copies, slots) -> (prompts, 1, copies x groups, slots): every query head of
        a row looks where the row may."""
        groups = self.heads // self.kv_heads
        prompts, copies, slots = allowed.shape
        return allowed[:, :, None].expand(-1, -1, groups, -1).reshape(prompts, 1, copies * groups, slots)

    @torch.no_grad()
    def read_prompts(self, ids: torch.Tensor, positions: torch.Tensor, last: torch.Tensor, capacity: int) -> torch.Tensor:
        """Read right-padded prompts (rows x tokens: `ids`, `positions`; `last` = each row's last
        real position) into the cache, with room for `capacity` positions in all, and return the
        next-token logits after each prompt (fp32, rows x vocabulary).

        As transformers' forward under autocast with causal attention (a real token never sees
        the pads after it), except the last layer: only the last position of each row goes on
        past its keys and values (attention, output projection, MLP), since only its logits are
        wanted; that layer's one query per row attends as a decode step does."""
        rows, tokens = ids.shape
        device = ids.device
        self.prompts, self.copies, self.prompt_length, self.length = rows, 1, tokens, tokens
        self.last = last   # each row's last real prompt position: the pads after it stay masked
        self.keys, self.values = [], []
        self._reserve(tokens + max(1, capacity - tokens), device)
        cos, sin = self._rotary(positions)                     # (rows, tokens, dim)
        cos, sin = cos[:, None], sin[:, None]                  # (rows, 1, tokens, dim): every head
        x = self.embed[ids].float()                            # fp32 residual stream
        row_index = torch.arange(rows, device=device)
        for i, layer in enumerate(self.layers):
            qkv = F.linear(layer["norm1"](x).to(self.dtype), layer["qkv"])
            q, k, v = (t.transpose(1, 2) for t in self._split_heads(qkv))   # (rows, heads, tokens, dim)
            k = (k * cos + _rotate_half(k) * sin).to(self.dtype)
            self.keys[i][:, :, :tokens] = k
            self.values[i][:, :, :tokens] = v
            if i + 1 < len(self.layers):
                q = q * cos + _rotate_half(q) * sin
                attended = F.scaled_dot_product_attention(q.to(self.dtype), k, v, is_causal=True,
                                                          scale=layer["scaling"],
                                                          enable_gqa=self.kv_heads != self.heads)
                x = x + F.linear(attended.transpose(1, 2).reshape(rows, tokens, -1), layer["out"])
                x = self._mlp(x, layer)
            else:   # the last layer: each row's last position only
                q = q[row_index, :, last]                      # (rows, heads, dim)
                q = q * cos[row_index, 0, last][:, None] + _rotate_half(q) * sin[row_index, 0, last][:, None]
                x = x[row_index, last] + F.linear(self._attend(q, i, self._query_mask(self._prompt_allowed()[:, None])), layer["out"])
                x = self._mlp(x, layer)
        return F.linear(self.final_norm(x), self.head)

    def _prompt_allowed(self) -> torch.Tensor:
        """(prompts, prompt_length): true up to each prompt's last real token (not its pads)."""
        return torch.arange(self.prompt_length, device=self.last.device)[None, :] <= self.last[:, None]

    def _slots_used(self) -> int:
        """Slots holding something: the prompts and every copy's answer tokens so far."""
        return self.prompt_length + (self.length - self.prompt_length) * self.copies

    def _reserve(self, slots: int, device) -> None:
        """Buffers of `slots` slots per prompt, keeping what the current ones hold."""
        # Zeros, not uninitialised memory: `step_at` reads every row's slots up to the deepest row's,
        # and a masked slot still enters the weighted sum of values with weight 0 -- 0 x NaN left
        # there by the allocator is NaN (it made searches lose nodes at random).
        shape = (self.prompts, self.kv_heads, slots, self.head_dim)
        keys = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in self.layers]
        values = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in self.layers]
        used = self._slots_used() if self.keys else 0
        for new, old in zip(keys + values, self.keys + self.values):
            new[:, :, :used] = old[:, :, :used]
        self.keys, self.values = keys, values

    def repeat_rows(self, copies: int) -> None:
        """Each row `copies` times in a row (rows p0, p0, ..., p1, p1, ...), before any answer
        token: sampling draws several answers from one read of each prompt.  The prompts' part
        of the cache stays one copy; each copy gets room for as many answer tokens as before."""
        if self.length != self.prompt_length:
            raise ValueError("repeat_rows comes before the first decode step")
        room = self.keys[0].shape[2] - self.prompt_length
        self.copies *= copies
        self._reserve(self.prompt_length + room * copies, self.keys[0].device)

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows, in this order (a search whose other rows have finished): later
        steps compute and read the cache for these alone."""
        if self.copies != 1:
            raise ValueError("keep_rows needs one row per prompt")
        index = torch.tensor(rows, device=self.last.device)
        self.keys = [part.index_select(0, index) for part in self.keys]
        self.values = [part.index_select(0, index) for part in self.values]
        self.last, self.prompts = self.last.index_select(0, index), len(rows)

    @torch.no_grad()
    def step(self, ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Next-token logits (fp32, rows x vocabulary) for one new token per row.  `ids` and
        `positions` are (rows,) or (rows, 1); `allowed` (rows, cached + 1) says which cache
        positions (the prompt's, then the row's answer tokens, the new one last) each row
        attends to."""
        ids, positions = ids.reshape(-1), positions.reshape(-1)
        prompts, copies, tokens = self.prompts, self.copies, self.prompt_length
        own = self.length - tokens   # the new token's place among the row's own
        first = tokens + own * copies   # its copy 0's slot; copy c's is first + c
        if first + copies > self.keys[0].shape[2]:
            self._reserve(tokens + 2 * (own + 1) * copies, ids.device)
        self.length += 1
        allowed = allowed[:, : self.length].bool().view(prompts, copies, self.length)
        if copies > 1:   # a row's answer token j is in slot j x copies + its copy: the others' are not its own
            mine = torch.eye(copies, dtype=torch.bool, device=ids.device)        # (row's copy, slot's copy)
            answer = allowed[:, :, tokens:, None] & mine[None, :, None, :]       # (prompts, copies, own + 1, copies)
            allowed = torch.cat([allowed[:, :, :tokens], answer.flatten(2)], dim=-1)

        def write(i: int, k: torch.Tensor, v: torch.Tensor) -> None:   # each copy at its slot
            self.keys[i][:, :, first:first + copies] = k.view(prompts, copies, self.kv_heads, -1).transpose(1, 2)
            self.values[i][:, :, first:first + copies] = v.view(prompts, copies, self.kv_heads, -1).transpose(1, 2)

        return self._decode(ids, positions, self._query_mask(allowed), write)

    def _decode(self, ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor, write) -> torch.Tensor:
        """One new token per row through every layer: `write(i, keys, values)` puts the token's
        rotated key and its value into layer i's cache, then the query attends to the cache's
        first slots where `allowed` (see `_attend`).  Next-token logits, fp32."""
        cos, sin = self._rotary(positions[:, None])   # (rows, 1, dim): every head
        x = self.embed[ids].float()   # fp32 residual stream, as under autocast
        for i, layer in enumerate(self.layers):
            q, k, v = self._split_heads(F.linear(layer["norm1"](x).to(self.dtype), layer["qkv"]))
            write(i, k * cos + _rotate_half(k) * sin, v)
            attended = self._attend(q * cos + _rotate_half(q) * sin, i, allowed)
            x = self._mlp(x + F.linear(attended, layer["out"]), layer)
        return F.linear(self.final_norm(x), self.head)

    @torch.no_grad()
    def step_at(self, ids: torch.Tensor, positions: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """Next-token logits for one new token per row, each row at its own depth: row r's token
        goes to its generated slot `slots[r]` (0 = the first after the prompt) and attends to its
        prompt and its slots before that one.  What a slot held from an abandoned branch is
        overwritten or masked, so a depth-first search backtracks by naming a lower slot.
        For one row per prompt (no `repeat_rows`)."""
        if self.copies != 1:
            raise ValueError("step_at needs one row per prompt")
        ids, positions = ids.reshape(-1), positions.reshape(-1)
        own = max(slots) + 1
        if self.prompt_length + own > self.keys[0].shape[2]:
            self._reserve(self.prompt_length + 2 * own, ids.device)
        self.length = self.prompt_length + own
        rows = torch.arange(len(slots), device=ids.device)
        slot = torch.tensor(slots, device=ids.device)
        allowed = torch.cat([self._prompt_allowed(), torch.arange(own, device=ids.device)[None, :] <= slot[:, None]], dim=1)
        at = self.prompt_length + slot   # each row's slot in its prompt's buffer

        def write(i: int, k: torch.Tensor, v: torch.Tensor) -> None:   # each row at its own slot
            self.keys[i][rows, :, at] = k.to(self.dtype)   # an indexed write does not cast as a slice does
            self.values[i][rows, :, at] = v.to(self.dtype)

        return self._decode(ids, positions, self._query_mask(allowed[:, None]), write)
