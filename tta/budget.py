"""Compute accounting: the one place where FLOPs are counted.

The harness, not the method, counts what a method spends.  `Meter.attach`
hooks the model's top-level forward, so every forward pass -- decoding,
scoring, a training step, or a user's own call -- is charged, whoever makes
it.  A forward run with gradients enabled on a model in training mode is
charged for its backward pass too.

Formula (DESIGN.md section 4; Kaplan et al. 2020):

* forward, per token: ``2 * N`` + attention ``2 * n_layer * ctx * d_model``
  where N counts every parameter the token touches except the input embedding
  (a lookup, not a matmul; the output projection *is* counted) and ``ctx`` is
  the number of positions the token attends to (its own included);
* backward, per token: activation gradients ``2 * N`` plus twice the forward
  attention term, and weight gradients ``2 * N_trainable``.  Full fine-tuning
  is thus ``6 N`` per token, LoRA ``4 N + 2 N_lora`` (N includes the adapters).

Only real tokens are charged, never padding, so the spend does not depend on
how a method batches its work.
"""
from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelShape:
    n_params: int         # parameters a token touches (input embedding excluded)
    n_trainable: int      # parameters that receive gradients
    n_layer: int
    d_model: int


def model_shape(model: torch.nn.Module) -> ModelShape:
    embedding = model.get_input_embeddings().weight
    params = [p for p in model.parameters() if p is not embedding]
    output = model.get_output_embeddings()
    # A tied output projection shares the embedding's tensor but is a real matmul per token.
    tied_output = embedding.numel() if output is not None and output.weight is embedding else 0
    config = model.config
    return ModelShape(n_params=sum(p.numel() for p in params) + tied_output,
                      n_trainable=sum(p.numel() for p in params if p.requires_grad),
                      n_layer=config.num_hidden_layers, d_model=config.hidden_size)


def attention_context(n_past: int, n_new: int) -> int:
    """Sum over `n_new` tokens, appended after `n_past`, of the positions each attends to."""
    return n_new * n_past + n_new * (n_new + 1) // 2


def forward_flops(shape: ModelShape, n_tokens: int, context: int) -> float:
    return 2.0 * shape.n_params * n_tokens + 2.0 * shape.n_layer * shape.d_model * context


def backward_flops(shape: ModelShape, n_tokens: int, context: int) -> float:
    activations = 2.0 * shape.n_params * n_tokens + 4.0 * shape.n_layer * shape.d_model * context
    weights = 2.0 * shape.n_trainable * n_tokens
    return activations + weights


def training_step_flops(shape: ModelShape, n_tokens: int, context: int) -> float:
    return forward_flops(shape, n_tokens, context) + backward_flops(shape, n_tokens, context)


def batch_tokens_and_context(attention_mask: torch.Tensor | None, input_len: int, batch: int) -> tuple[int, int]:
    """Real tokens in this forward and their summed attention context, from the attention mask
    (which spans cached and new positions)."""
    if attention_mask is None:
        return batch * input_len, batch * attention_context(0, input_len)
    mask = attention_mask.detach().to("cpu", torch.int64)
    new = mask[:, -input_len:].sum(dim=1)
    past = mask.sum(dim=1) - new
    context = new * past + new * (new + 1) // 2
    return int(new.sum()), int(context.sum())


@dataclass
class Budget:
    """A per-task cap: FLOPs, wall seconds, or neither (None = unlimited)."""
    flops: float | None = None
    seconds: float | None = None

    def as_dict(self) -> dict:
        return {"flops": self.flops, "seconds": self.seconds}


class Meter:
    """Counts FLOPs, seconds and peak memory for the task at hand, against its budget."""

    def __init__(self, budget: Budget | None = None):
        self.budget = budget or Budget()
        self.flops = 0.0
        self.uncharged_flops = 0.0   # evaluation-only compute (graded metrics), recorded apart
        self._charging = True
        self._started = time.perf_counter()
        self._shape_cache: dict[int, tuple[int, ModelShape]] = {}
        self._handles = []

    # ---- attaching to models
    def attach(self, model: torch.nn.Module) -> None:
        """Charge every forward of `model` (hook on its top-level module)."""
        self._handles.append(model.register_forward_pre_hook(self._on_forward, with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _shape(self, model) -> ModelShape:
        # Adapters change N and N_trainable; recount when the parameter count or trainable set changes.
        key = sum(p.numel() for p in model.parameters() if p.requires_grad) * 1_000_003 + len(list(model.parameters()))
        cached = self._shape_cache.get(id(model))
        if cached is None or cached[0] != key:
            cached = (key, model_shape(model))
            self._shape_cache[id(model)] = cached
        return cached[1]

    def _on_forward(self, model, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        batch, length = ref.shape[0], ref.shape[1]
        n_tokens, context = batch_tokens_and_context(kwargs.get("attention_mask"), length, batch)
        shape = self._shape(model)
        cost = forward_flops(shape, n_tokens, context)
        if model.training and torch.is_grad_enabled():
            cost += backward_flops(shape, n_tokens, context)
        self.charge(cost)

    # ---- charging
    def charge(self, flops: float) -> None:
        if self._charging:
            self.flops += flops
        else:
            self.uncharged_flops += flops

    @contextlib.contextmanager
    def uncharged(self):
        """Compute that is measurement, not method (e.g. the teacher-forced NLL of the true answer)."""
        previous, self._charging = self._charging, False
        try:
            yield
        finally:
            self._charging = previous

    # ---- the cap
    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._started

    def remaining_flops(self) -> float:
        return float("inf") if self.budget.flops is None else self.budget.flops - self.flops

    def can_afford(self, flops: float = 0.0) -> bool:
        if self.budget.seconds is not None and self.seconds >= self.budget.seconds:
            return False
        return flops <= self.remaining_flops()

    def exhausted(self) -> bool:
        return not self.can_afford(0.0) or self.remaining_flops() <= 0

    def summary(self) -> dict:
        return {"flops": self.flops, "eval_flops": self.uncharged_flops, "seconds": round(self.seconds, 3),
                "peak_memory_mb": peak_memory_mb()}


def peak_memory_mb() -> float:
    """Peak accelerator memory on CUDA; on the CPU the process's peak resident memory so far."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def reset_peak_memory() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
