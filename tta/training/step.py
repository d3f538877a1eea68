"""One training step, shared by per-task training (`finetune.train`), the LESS warm-up and
pretraining: the loss of a padded batch under bf16 autocast, backward, (clip,) optimiser step,
schedule step.  Keeping it in one place keeps what a "step" costs and does the same for every
method that trains."""
from __future__ import annotations

import torch

from tta.model.attention import causal_attention
from tta.model.batching import pad_batch, pad_labels
from tta.model.encoding import Encoded
from tta.model.loading import autocast, autocasts

PAD_MULTIPLE = 64   # see pad_batch: repeated shapes keep the CPU kernels cached


def padded(lm, batch: list[Encoded], multiple: int = PAD_MULTIPLE):
    """(ids, mask, positions, labels) of training examples, right-padded to a multiple."""
    ids, mask, positions = pad_batch([e.input_ids for e in batch], lm.format, lm.device, "right", multiple)
    return ids, mask, positions, pad_labels([e.labels for e in batch], lm.device, multiple)


def batch_loss(model, ids, mask, positions, labels) -> torch.Tensor:
    """The mean loss over the labelled tokens of a right-padded batch, with the format's position
    ids (grid positions for the embedded model).  The mask is passed for the budget meter, which
    charges real tokens only; attention is causal without a mask (`tta.model.attention`: a TTT step
    of the embedded model 310 -> 236 ms on this 2-core CPU, benchmarks/train_step.py; the same
    loss and gradients, tests/test_ttt.py)."""
    with autocast(ids.device), causal_attention(model), _lora_inputs_as_they_are(model, autocasts(ids.device)):
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels).loss


def _lora_inputs_as_they_are(model, under_autocast: bool):
    """peft casts each LoRA layer's input to the adapter's dtype (fp32) before the adapter's
    matmuls, which autocast then casts back to bf16: an exact round trip, but a copy of every
    adapted layer's input and its gradient (6% of a TTT step of the embedded model in a profile,
    one thread).  Under autocast it is skipped; elsewhere the adapter needs it."""
    from peft.helpers import disable_input_dtype_casting
    return disable_input_dtype_casting(model, active=under_autocast)


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
