"""Fine-tuning: one fresh LoRA adapter per task (peft), trained by a short loop.

A plain loop rather than trl's SFTTrainer: a Trainer is built per task (400+
times a run) and its setup (accelerate state, callbacks, dataloaders) costs
more than a whole test-time training run of the small default model; the loop
also has to check the task's budget before every step.
`benchmarks/train_step.py` measures the loop's overhead against a bare
forward+backward+optimiser step of the same batch.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from tta.budget import Meter, attention_context, training_step_flops
from tta.decoding import pad_batch, pad_labels
from tta.encoding import Encoded
from tta.models import LoadedModel, autocast


PAD_MULTIPLE = 64   # see pad_batch: repeated shapes keep the CPU kernels cached


class TrainingError(RuntimeError):
    pass


@dataclass
class TrainReport:
    steps: int = 0
    planned_steps: int = 0
    stopped_by_budget: bool = False
    losses: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"steps": self.steps, "planned_steps": self.planned_steps,
                "stopped_by_budget": self.stopped_by_budget,
                "first_loss": self.losses[0] if self.losses else None,
                "last_loss": self.losses[-1] if self.losses else None}


# ---------------------------------------------------------------- adapters

def attach_lora(lm: LoadedModel, rank: int, alpha: int, targets: list[str], dropout: float = 0.0, seed: int = 0):
    """Inject a freshly initialised LoRA adapter (peft) into the base model and return the peft
    wrapper.  The LoRA layers sit inside `lm.model` itself, so plain calls to `lm.model` (which
    the budget meter watches) run through the adapter; only the adapter is trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout,
                        bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    return get_peft_model(lm.model, config)


def detach_lora(lm: LoadedModel, peft_model) -> None:
    """Remove the adapter, leaving the base weights as they were: the model is never reloaded."""
    peft_model.unload()
    for p in lm.model.parameters():
        p.requires_grad_(False)


def batches(examples: list[Encoded], batch_size: int, epochs: int, seed: int) -> list[list[Encoded]]:
    """Shuffled batches for every epoch, planned up front so the schedule knows the step count."""
    rng = random.Random(seed)
    plan = []
    for _ in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        plan += [[examples[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]
    return plan


def step_cost(meter: Meter, model, batch: list[Encoded]) -> float:
    shape = meter._shape(model)
    tokens = sum(len(e) for e in batch)
    context = sum(attention_context(0, len(e)) for e in batch)
    return training_step_flops(shape, tokens, context)


def train(lm: LoadedModel, examples: list[Encoded], meter: Meter, lr: float, epochs: int, batch_size: int,
          weight_decay: float = 0.01, warmup_ratio: float = 0.1, seed: int = 0,
          reserve_flops: float = 0.0) -> TrainReport:
    """AdamW with a cosine schedule and linear warm-up over the trainable parameters of `lm.model`.
    Before each step the meter must afford the step plus `reserve_flops` (kept for prediction);
    otherwise training stops there and the model is used as it is."""
    from transformers import get_cosine_schedule_with_warmup

    model = lm.model
    params = [p for p in model.parameters() if p.requires_grad]
    plan = batches(examples, batch_size, epochs, seed)
    report = TrainReport(planned_steps=len(plan))
    if not params or not plan:
        return report
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * len(plan)), len(plan))
    model.train()
    losses = []
    for batch in plan:
        if not meter.can_afford(step_cost(meter, model, batch) + reserve_flops):
            report.stopped_by_budget = True
            break
        ids, mask, positions = pad_batch([e.input_ids for e in batch], lm.format, lm.device, "right", PAD_MULTIPLE)
        labels = pad_labels([e.labels for e in batch], lm.device, PAD_MULTIPLE)
        with autocast(lm.device):
            loss = model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())   # kept on the device: no host sync inside the loop
        report.steps += 1
    model.eval()
    report.losses = [float(x) for x in losses]
    if any(not math.isfinite(x) for x in report.losses):
        raise TrainingError(f"loss became {report.losses[-1]} (not finite) during test-time training")
    return report
