"""One training step, shared by per-task training (`finetune.train`), the LESS warm-up and
pretraining: the loss of a padded batch under bf16 autocast, backward, (clip,) optimiser step,
schedule step.  Keeping it in one place keeps what a "step" costs and does the same for every
method that trains."""
from __future__ import annotations

import contextlib

import torch

from tta.model.batching import pad_batch, pad_labels
from tta.model.encoding import Encoded
from tta.model.loading import autocast

PAD_MULTIPLE = 64   # see pad_batch: repeated shapes keep the CPU kernels cached


def padded(lm, batch: list[Encoded], multiple: int = PAD_MULTIPLE):
    """(ids, mask, positions, labels) of training examples, right-padded to a multiple."""
    ids, mask, positions = pad_batch([e.input_ids for e in batch], lm.format, lm.device, "right", multiple)
    return ids, mask, positions, pad_labels([e.labels for e in batch], lm.device, multiple)


CAUSAL = "tta_causal_sdpa"


def _causal_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for right-padded training batches: plain causal SDPA, no mask.  A real token
    never sees a pad under the causal mask (pads come after it) and pads carry no loss, so the
    loss and gradients are those of the masked batch; the kernel skips the upper triangle and
    the mask: a TTT step of the embedded model 310 -> 236 ms on this 2-core CPU
    (benchmarks/train_step.py), the same loss (tests/test_ttt.py)."""
    heads, kv_heads = query.shape[1], key.shape[1]
    if kv_heads != heads:   # grouped-query attention: share each key/value head
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                           dropout_p=dropout if module.training else 0.0)
    return out.transpose(1, 2).contiguous(), None


def _register_causal() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(CAUSAL, _causal_sdpa)


@contextlib.contextmanager
def causal_attention(model):
    """The model's SDPA attention swapped for `_causal_sdpa` for the duration (right-padded
    batches only).  An unknown implementation also makes transformers skip building a mask --
    and with it the packed-sequence guess from jumps in grid position ids.  Other attention
    implementations (eager, flash) are left alone."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    _register_causal()
    config._attn_implementation = CAUSAL
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


def batch_loss(model, ids, mask, positions, labels) -> torch.Tensor:
    """The mean loss over the labelled tokens of a right-padded batch, with the format's position
    ids (grid positions for the embedded model).  The mask is passed for the budget meter, which
    charges real tokens only; attention is causal (see `_causal_sdpa`)."""
    with autocast(ids.device), causal_attention(model):
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels).loss


def training_step(model, optimizer, tensors, schedule=None, clip_norm: float | None = None) -> torch.Tensor:
    """Forward, backward, optimiser (and schedule) step on one padded batch; the loss, detached
    and left on the device (reading it back would sync the host every step)."""
    loss = batch_loss(model, *tensors)
    loss.backward()
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    optimizer.step()
    if schedule is not None:
        schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
