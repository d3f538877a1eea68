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

The arithmetic is transformers' under autocast (bf16 linear layers and prompt attention, fp32
residual stream and norms) except one query per row against the cache -- every decode step and
the prompts' last layer -- done in fp32 here (faster on the CPU, see `__init__`): logits differ
in rounding only, and on the benchmark's 36 views 1 greedy answer differs.  The rounding is
the smaller one: on the best answers of 5 views of gen-eval task 0, the answer's log-likelihood
is off the all-fp32 model's by 0.003-0.024 here and 0.007-0.045 through the forward under
autocast.  (One of them, at probability 0.088 in fp32, passed a 0.09 search threshold through
the forward and does not here.)
`tests/test_fast_decode.py` checks the logits against the model's forward, with grouped heads
and a merged LoRA, and that the embedded model's answers and charges are the forward's.

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
        self.final_norm = _Norm(base.model.norm)
        # The head's weights rounded to bf16 as under autocast, multiplied in fp32: for a small
        # vocabulary (16 x 256) the fp32 product takes 3 us, bf16 12 us.
        self.head = _weight(base.lm_head).to(BF16).float()
        rotary = base.model.rotary_emb
        self.inv_freq, self.rope_scale = rotary.inv_freq.detach().float(), float(rotary.attention_scaling)
        self.layers = []
        for layer in base.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(dict(
                norm1=_Norm(layer.input_layernorm), norm2=_Norm(layer.post_attention_layernorm), scaling=attn.scaling,
                qkv=torch.cat([_weight(attn.q_proj), _weight(attn.k_proj), _weight(attn.v_proj)]).to(BF16),
                out=_weight(attn.o_proj).to(BF16),
                gate_up=torch.cat([_weight(mlp.gate_proj), _weight(mlp.up_proj)]).to(BF16),
                down=_weight(mlp.down_proj).to(BF16)))
        # The cache, in two parts per layer: the prompts' keys and values, one copy per prompt
        # however many answers are drawn from it (sampling), and each row's own generated ones,
        # in buffers with room for the answer.  fp32, keys transposed to (dim, position).
        # Attention over the cache is matrix-vector products, which the CPU does faster in fp32
        # than in bf16 (12 rows x 500 positions: q kᵀ and the weighted sum of values take 76 + 84 us
        # in fp32, 168 + 144 us in bf16), and a (position, dim) slice made the bf16 matmul copy it
        # first (1.9 ms per layer at 1,000 positions).  So decode steps attend in fp32, where
        # transformers' forward under autocast attends in bf16: logits differ in rounding only.
        # A step reads the whole cache (memory-bound: half the step); the copies of a prompt read
        # its part once, as one matrix product (benchmarks/sampling.py: 4 copies per prompt).
        self.prompt_keys: list[torch.Tensor] = []     # (prompts, kv_heads, dim, prompt tokens)
        self.prompt_values: list[torch.Tensor] = []   # (prompts, kv_heads, prompt tokens, dim)
        self.keys: list[torch.Tensor] = []            # (rows, kv_heads, dim, room): generated
        self.values: list[torch.Tensor] = []          # (rows, kv_heads, room, dim)
        self.prompts = self.copies = 0                # rows = prompts x copies (p0, p0, ..., p1, ...)
        self.prompt_length = self.length = 0          # positions cached: the prompts', and in all

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
        gate, up = F.linear(layer["norm2"](x).to(BF16), layer["gate_up"]).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, layer["down"])

    def _attend(self, q: torch.Tensor, i: int, masked: torch.Tensor, own: int) -> torch.Tensor:
        """One query per row (rows, heads, dim; fp32) against layer `i`'s cache: the prompt's
        positions and the first `own` generated slots of each row.  `masked` (prompts, 1, copies,
        1, positions) is true where a row must not look.  Returns (rows, heads * dim)."""
        prompts, copies, kv_heads, dim = self.prompts, self.copies, self.kv_heads, self.head_dim
        groups, tokens = self.heads // kv_heads, self.prompt_length
        rows = prompts * copies
        # Query heads grouped under the key/value head they share, and, for the prompt's part,
        # the copies of a prompt as more rows of one product: (prompts, kv_heads, copies, groups, dim).
        q_rows = q.view(rows, kv_heads, groups, dim)
        q_prompts = q.view(prompts, copies, kv_heads, groups, dim).transpose(1, 2)
        scores = torch.matmul(q_prompts.reshape(prompts, kv_heads, copies * groups, dim), self.prompt_keys[i])
        scores = scores.view(prompts, kv_heads, copies, groups, tokens)
        if own:
            own_scores = torch.matmul(q_rows, self.keys[i][..., :own])   # (rows, kv_heads, groups, own)
            own_scores = own_scores.view(prompts, copies, kv_heads, groups, own).transpose(1, 2)
            scores = torch.cat([scores, own_scores], dim=-1)
        weights = torch.softmax((scores * self.layers[i]["scaling"]).masked_fill(masked, float("-inf")), dim=-1)
        out = torch.matmul(weights[..., :tokens].reshape(prompts, kv_heads, copies * groups, tokens),
                           self.prompt_values[i]).view(prompts, kv_heads, copies, groups, dim)
        if own:
            own_weights = weights[..., tokens:].transpose(1, 2).reshape(rows, kv_heads, groups, own)
            own_out = torch.matmul(own_weights, self.values[i][:, :, :own])
            out = out + own_out.view(prompts, copies, kv_heads, groups, dim).transpose(1, 2)
        return out.transpose(1, 2).reshape(rows, -1)

    @torch.no_grad()
    def read_prompts(self, ids: torch.Tensor, positions: torch.Tensor, last: torch.Tensor, capacity: int) -> torch.Tensor:
        """Read right-padded prompts (rows x tokens: `ids`, `positions`; `last` = each row's last
        real position) into the cache, with room for `capacity` positions in all, and return the
        next-token logits after each prompt (fp32, rows x vocabulary).

        As transformers' forward under autocast with causal attention (a real token never sees
        the pads after it), except the last layer: only the last position of each row goes on
        past its keys and values (attention, output projection, MLP), since only its logits are
        wanted; that layer's one query per row attends in fp32, as a decode step does."""
        rows, tokens = ids.shape
        device = ids.device
        self.prompts, self.copies, self.prompt_length, self.length = rows, 1, tokens, tokens
        self.last = last   # each row's last real prompt position: the pads after it stay masked
        self.prompt_keys = [torch.empty((rows, self.kv_heads, self.head_dim, tokens), device=device) for _ in self.layers]
        self.prompt_values = [torch.empty((rows, self.kv_heads, tokens, self.head_dim), device=device) for _ in self.layers]
        self._reserve(rows, max(1, capacity - tokens), device)
        cos, sin = self._rotary(positions)                     # (rows, tokens, dim)
        cos, sin = cos[:, None], sin[:, None]                  # (rows, 1, tokens, dim): every head
        x = self.embed[ids].float()                            # fp32 residual stream
        row_index = torch.arange(rows, device=device)
        for i, layer in enumerate(self.layers):
            qkv = F.linear(layer["norm1"](x).to(BF16), layer["qkv"])
            q, k, v = (t.transpose(1, 2) for t in self._split_heads(qkv))   # (rows, heads, tokens, dim)
            k = k * cos + _rotate_half(k) * sin
            self.prompt_keys[i].copy_(k.transpose(-1, -2))
            self.prompt_values[i].copy_(v)
            if i + 1 < len(self.layers):
                q = q * cos + _rotate_half(q) * sin
                attended = F.scaled_dot_product_attention(q.to(BF16), k.to(BF16), v, is_causal=True,
                                                          scale=layer["scaling"],
                                                          enable_gqa=self.kv_heads != self.heads)
                x = x + F.linear(attended.transpose(1, 2).reshape(rows, tokens, -1), layer["out"])
                x = self._mlp(x, layer)
            else:   # the last layer: each row's last position only
                q = q[row_index, :, last]                      # (rows, heads, dim)
                q = q * cos[row_index, 0, last][:, None] + _rotate_half(q) * sin[row_index, 0, last][:, None]
                masked = (torch.arange(tokens, device=device)[None, :] > last[:, None])[:, None, None, None, :]
                x = x[row_index, last] + F.linear(self._attend(q, i, masked, 0).to(BF16), layer["out"])
                x = self._mlp(x, layer)
        return F.linear(self.final_norm(x), self.head)

    def _reserve(self, rows: int, room: int, device) -> None:
        """Buffers for `room` generated positions per row, keeping those generated so far."""
        own = self.length - self.prompt_length
        # Zeros, not uninitialised memory: `step_at` reads every row's slots up to the deepest row's,
        # and a masked slot still enters the weighted sum of values with weight 0 -- 0 x NaN left
        # there by the allocator is NaN (it made searches lose nodes at random).
        keys = [torch.zeros((rows, self.kv_heads, self.head_dim, room), device=device) for _ in self.layers]
        values = [torch.zeros((rows, self.kv_heads, room, self.head_dim), device=device) for _ in self.layers]
        if own:
            repeat = rows // self.keys[0].shape[0]
            for new, old in zip(keys, self.keys):
                new[..., :own] = old[..., :own].repeat_interleave(repeat, dim=0)
            for new, old in zip(values, self.values):
                new[:, :, :own] = old[:, :, :own].repeat_interleave(repeat, dim=0)
        self.keys, self.values = keys, values

    def repeat_rows(self, copies: int) -> None:
        """Each row `copies` times in a row (rows p0, p0, ..., p1, p1, ...): sampling draws several
        answers from one read of each prompt.  The prompts' part of the cache stays one copy."""
        self.copies *= copies
        self._reserve(self.prompts * self.copies, self.values[0].shape[2], self.values[0].device)

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows, in this order (a search whose other rows have finished): later
        steps compute and read the cache for these alone."""
        if self.copies != 1:
            raise ValueError("keep_rows needs one row per prompt")
        index = torch.tensor(rows, device=self.last.device)
        for parts in (self.prompt_keys, self.prompt_values, self.keys, self.values):
            parts[:] = [part.index_select(0, index) for part in parts]
        self.last, self.prompts = self.last.index_select(0, index), len(rows)

    @torch.no_grad()
    def step(self, ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Next-token logits (fp32, rows x vocabulary) for one new token per row.  `ids` and
        `positions` are (rows,) or (rows, 1); `allowed` (rows, cached + 1) says which cache
        positions (the new one last) each row attends to."""
        ids, positions = ids.reshape(-1), positions.reshape(-1)
        own = self.length - self.prompt_length   # the new token's place among the row's own
        if own >= self.values[0].shape[2]:
            self._reserve(self.prompts * self.copies, 2 * (own + 1), ids.device)
        self.length += 1
        masked = ~allowed[:, : self.length].bool().view(self.prompts, 1, self.copies, 1, self.length)

        def write(i: int, k: torch.Tensor, v: torch.Tensor) -> None:   # every row at the same slot
            self.keys[i][..., own] = k
            self.values[i][:, :, own] = v

        return self._decode(ids, positions, masked, own + 1, write)

    def _decode(self, ids: torch.Tensor, positions: torch.Tensor, masked: torch.Tensor, own: int, write) -> torch.Tensor:
        """One new token per row through every layer: `write(i, keys, values)` puts the token's
        rotated key and its value into layer i's cache, then the query attends to the first `own`
        generated slots and the prompt, except where `masked`.  Next-token logits, fp32."""
        cos, sin = self._rotary(positions[:, None])   # (rows, 1, dim): every head
        x = self.embed[ids].float()   # fp32 residual stream, as under autocast
        for i, layer in enumerate(self.layers):
            q, k, v = self._split_heads(F.linear(layer["norm1"](x).to(BF16), layer["qkv"]))
            write(i, k * cos + _rotate_half(k) * sin, v)
            attended = self._attend(q * cos + _rotate_half(q) * sin, i, masked, own)
            x = self._mlp(x + F.linear(attended.to(BF16), layer["out"]), layer)
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
        if own > self.values[0].shape[2]:
            self._reserve(self.prompts, 2 * own, ids.device)
        self.length = self.prompt_length + own
        rows = torch.arange(len(slots), device=ids.device)
        slot = torch.tensor(slots, device=ids.device)
        masked = torch.cat([torch.arange(self.prompt_length, device=ids.device)[None, :] > self.last[:, None],
                            torch.arange(own, device=ids.device)[None, :] > slot[:, None]], dim=1)
        masked = masked.view(self.prompts, 1, 1, 1, -1)

        def write(i: int, k: torch.Tensor, v: torch.Tensor) -> None:   # each row at its own slot
            self.keys[i][rows, :, :, slot] = k
            self.values[i][rows, :, slot] = v.float()   # an indexed write does not cast as a slice does

        return self._decode(ids, positions, masked, own, write)
