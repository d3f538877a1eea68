"""Fine-tuning: one fresh LoRA adapter per task (peft), trained by a short loop.

A plain loop rather than trl's SFTTrainer: a Trainer is built per task (400+
times a run) and its setup (accelerate state, callbacks, dataloaders) costs
more than a whole test-time training run of the small default model; the loop
also has to check the task's budget before every step.
`benchmarks/train_step.py` measures the loop's overhead against a bare
forward+backward+optimiser step of the same batch.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field

import torch

from tta.budget import TaskBudget, harness_products
from tta.model.encoding import Encoded
from tta.model.loading import LoadedModel
from tta.settings import setting
from tta.training.step import PAD_MULTIPLE, padded, training_step  # noqa: F401  (PAD_MULTIPLE: for benchmarks)


class TrainingError(RuntimeError):
    pass


@dataclass
class TrainReport:
    steps: int = 0
    planned_steps: int = 0     # the steps the schedule was laid over (what the budget pays for)
    wanted_steps: int = 0      # the steps `epochs` passes would take
    stopped_by_budget: bool = False
    losses: list[float] = field(default_factory=list)
    checked: list[tuple[int, float]] = field(default_factory=list)   # (steps done, held-out NLL per token)
    kept_step: int | None = None   # the steps of the weights kept (a HeldOutCheck's choice)

    def as_dict(self) -> dict:
        out = {"steps": self.steps, "planned_steps": self.planned_steps, "wanted_steps": self.wanted_steps,
               "stopped_by_budget": self.stopped_by_budget,
               "first_loss": self.losses[0] if self.losses else None,
               "last_loss": self.losses[-1] if self.losses else None}
        if self.checked:
            out.update(held_out_nll=[[step, round(nll, 4)] for step, nll in self.checked], kept_step=self.kept_step)
        return out


@dataclass
class HeldOutCheck:
    """Model selection on a demonstration kept out of the training data: its output, teacher-forced
    after the other demonstrations (a few views of them), is scored before the first step and
    `checks` times spread over the planned steps; `train` ends with the weights of the lowest
    score.  Each scoring is a forward the budget pays for (`cost`)."""
    prompts: list[list[int]]
    answers: list[list[int]]
    checks: int

    def scorings(self) -> int:
        return self.checks + 1

    def scoring_cost(self, budget: TaskBudget, model=None) -> float:
        return budget.sequences_cost([len(p) + len(a) for p, a in zip(self.prompts, self.answers)], model)

    def cost(self, budget: TaskBudget, model=None) -> float:
        return self.scorings() * self.scoring_cost(budget, model)

    def check_steps(self, planned: int) -> set[int]:
        return {0, *(math.ceil(k * planned / self.checks) for k in range(1, self.checks + 1))}

    def nll(self, lm: LoadedModel) -> float:
        from tta.inference.decoding import score_answers
        with torch.no_grad():
            scores = score_answers(lm, self.prompts, self.answers)
        return sum(s.nll for s in scores) / sum(s.n_tokens for s in scores)


# ---------------------------------------------------------------- adapters

@dataclass
class LoRASettings:
    """A per-task adapter and its training, shared by every method that trains one: a LoRA
    (the paper's choice) or, with `adapter=full`, every weight of the model."""
    adapter: str = setting("lora", "lora: a fresh LoRA per task (paper); full: fine-tune every weight of the model "
                           "per task and restore them afterwards (cheap for a small model; uses `lr_full`)", before="lora")
    rank: int = setting(32, "LoRA rank (paper: 128 for 1B-8B models; 32 here, an eighth of the embedded model's width)", at_least=1)
    alpha: int = setting(4, "LoRA alpha; the update is scaled by alpha/rank, here 4/32 = 0.125 as in the paper (16/128)", at_least=1)
    targets: list = setting(["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
                            "modules that get adapters (paper: q, v and the MLP)")
    # A LoRA update grows with alpha/rank x lr.  8e-4 at scaling 0.125 is the step of 1e-4 at the
    # scaling 1.0 used before (1e-4 beat 3e-4 and 1e-3 there: true-answer NLL 0.185 / 0.196 / 0.246
    # on 10 gen-eval tasks at 2e12).  On 10 other gen-eval development tasks at 5e11 (18-39 steps):
    # NLL 0.241 (alpha 4, lr 8e-4), 0.242 (alpha 32, lr 1e-4), 0.244 (alpha 4, lr 1e-4), 5/10 exact
    # each (icl: NLL 0.244, 5/10) -- at this budget the choice hardly matters.
    lr: float = setting(8e-4, "AdamW learning rate (paper: 5e-5 for 1B/3B, 1e-4 for 8B, at larger models and 250-example epochs)", at_least=0)
    # Chosen on the development split (arc1-heldout, 20 tasks, 1e12 FLOPs, 24 steps): true-answer
    # NLL 0.254 / 0.219 / 0.205 / 0.215 and 2 / 3 / 4 / 3 solved at 3e-5 / 1e-4 / 3e-4 / 1e-3
    # (reports/real-arc-levers.md).  Checked again at 4e12 (about 100 steps) on 80 development
    # tasks: 1e-3 won 2 and lost 3 against 3e-4, with a higher true-answer NLL on arc1-heldout.
    lr_full: float = setting(3e-4, "AdamW learning rate when adapter=full (3e-4: best of 3e-5..1e-3 on the development "
                                   "split at 1e12 FLOPs; at 4e12, 1e-3 won 2 and lost 3 of 80 development tasks)", at_least=0,
                             before=3e-4)   # runs from before it trained a LoRA, which lr_full does not touch
    weight_decay: float = setting(0.01, "AdamW weight decay (paper: 0.01)", at_least=0)
    epochs: int = setting(2, "passes over the training examples at most; the steps are planned to what the budget pays for (paper: 2)", at_least=1)
    batch_size: int = setting(2, "training examples per step (paper: 2)", at_least=1)
    warmup_ratio: float = setting(0.1, "share of the planned steps with linear warm-up before the cosine decay (paper: 0.1)", at_least=0, at_most=1)
    # Measured on the development split (20 arc1-heldout tasks, ttt_full, 6.4e12 FLOPs): 3/20
    # solved against 5/20 without, true-answer NLL 0.254 against 0.201.  The held-out scores do
    # turn up (the best weights came at a median half of the steps, 14 of 18 tasks before the
    # end), but most tasks have 3 demonstrations and keeping one out cut the training examples
    # from 3,289 to 1,455 (reports/real-arc-levers.md).
    select_on_demo: bool = setting(False, "keep one demonstration out of the training data, score its output "
                                   "(after the others, 2 views) before training and `checks` times during it, "
                                   "and keep the weights that scored best (not in the paper; off: on the "
                                   "development split it solved 3/20 against 5/20, the held-out demo's data lost)",
                                   before=False)
    checks: int = setting(8, "held-out scorings spread over the planned steps when select_on_demo", before=8, at_least=1)
    # A batch is padded to its longest example.  Random pairs of a task's leave-one-out examples
    # (2 epochs, up to 250 examples) computed 1.31-1.35x the real tokens on 6 gen-eval tasks and
    # 1.01-1.29x on 5 arc1-eval tasks (1.19x over all 11); pairs of similar length 1.000-1.002x:
    # same examples, same steps, same FLOPs charged, less wall time.
    group_by_length: bool = setting(True, "pair examples of similar length in each batch, the batches in random order "
                                    "(1.3x fewer padded tokens on typical tasks); false: random pairs (paper)",
                                    before=False)

    def __post_init__(self):
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter={self.adapter!r}: expected one of {', '.join(ADAPTERS)}")
        parent = getattr(super(), "__post_init__", None)   # configs compose several settings pieces
        if parent:
            parent()

    @property
    def learning_rate(self) -> float:
        return self.lr_full if self.adapter == "full" else self.lr


ADAPTERS = ("lora", "full")



def attach_lora(lm: LoadedModel, rank: int, alpha: int, targets: list[str], dropout: float = 0.0, seed: int = 0):
    """Inject a freshly initialised LoRA adapter (peft) into the base model and return the peft
    wrapper.  The LoRA layers sit inside `lm.model` itself, so plain calls to `lm.model` (which
    the budget meter watches) run through the adapter; only the adapter is trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout,
                        bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    return get_peft_model(lm.model, config)


class FullWeights:
    """Every weight of the model made trainable for one task; `unload` puts the base weights back.
    For a model of a few million parameters a copy of the weights costs a few MB, so the per-task
    "adapter" can be the whole model (a LoRA saves memory only at billions of parameters)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.saved = {name: value.detach().clone() for name, value in model.state_dict().items()}
        for p in model.parameters():
            p.requires_grad_(True)

    def unload(self):
        with torch.no_grad():
            for name, value in self.model.state_dict().items():
                value.copy_(self.saved[name])
        return self.model


def new_adapter(lm: LoadedModel, settings: LoRASettings, seed: int):
    """A fresh per-task adapter with these settings (a peft LoRA, or `FullWeights`); remove it
    with `detach_lora` when the task is done."""
    if settings.adapter == "full":
        return FullWeights(lm.model)
    return attach_lora(lm, settings.rank, settings.alpha, settings.targets, seed=seed)


def train_adapter(lm: LoadedModel, examples: list[Encoded], budget: TaskBudget, lora: LoRASettings,
                  seed: int, held_out: "HeldOutCheck | None" = None) -> "TrainReport":
    """`train` with a method's `LoRASettings`."""
    return train(lm, examples, budget, lr=lora.learning_rate, epochs=lora.epochs, batch_size=lora.batch_size,
                 weight_decay=lora.weight_decay, warmup_ratio=lora.warmup_ratio, seed=seed,
                 group_by_length=lora.group_by_length, held_out=held_out)


@contextlib.contextmanager
def merged(adapter):
    """A LoRA merged into the base weights for the duration (prediction): a decode step then runs
    the base model's matmuls only -- 420 instead of 684 ops per forward of the embedded model, and
    the meter charges the base model's weights.  A `FullWeights` adapter has nothing to merge.

    Afterwards the base weights are copied back from a snapshot rather than trusted to peft's
    unmerge, which subtracts the product again: that left fp32 rounding (up to 3e-8, in 50,778 of
    the embedded model's 3.4M weights after one merge; bf16 weights lose far more), so each task's
    starting weights depended on the tasks its worker ran before, and a run with two workers was
    reproducible only up to near-ties.  The snapshot is kept in host memory, not on the
    accelerator: one copy of the targeted weights, as big as the model for an 8B LoRA on every
    projection.

    The merge and unmerge products (B @ A per adapted layer) are not charged: they are how the
    harness runs an adapter's decode at the base weights' price, and they cost little -- 3.7e8
    FLOPs for the embedded model with the default LoRA (rank 32 on q, v and the MLP), 0.07% of
    the default 5e11 cap (`python benchmarks/meter_overhead.py`, which measures it with a task's
    meter watching bare products)."""
    can_merge = hasattr(adapter, "merge_adapter")
    if not can_merge:
        yield
        return
    lora = [p for name, p in adapter.named_parameters() if "lora_" in name]
    was_trainable = [p.requires_grad for p in lora]
    targeted = [m.get_base_layer().weight for m in adapter.modules() if hasattr(m, "lora_A")]
    snapshot = [w.detach().to("cpu", copy=True) for w in targeted]
    with harness_products():
        adapter.merge_adapter()
    for p in lora:
        p.requires_grad_(False)   # the meter recounts its weights when the trainable set changes
    try:
        yield
    finally:
        for p, trainable in zip(lora, was_trainable):
            p.requires_grad_(trainable)
        with harness_products():
            adapter.unmerge_adapter()   # peft's bookkeeping of what is merged
        with torch.no_grad():
            for w, saved in zip(targeted, snapshot):
                w.copy_(saved)


def detach_lora(lm: LoadedModel, adapter) -> None:
    """Remove the adapter (a LoRA or `FullWeights`), leaving the base weights as they were: the
    model is never reloaded."""
    adapter.unload()
    for p in lm.model.parameters():
        p.requires_grad_(False)


def batches(examples: list[Encoded], batch_size: int, epochs: int, seed: int,
            group_by_length: bool = False) -> list[list[Encoded]]:
    """Shuffled batches for every epoch, planned up front so the schedule knows the step count.
    With `group_by_length`, each epoch's shuffled examples are sorted by length (stably: equal
    lengths stay in random order) before being cut into batches, and the batches are shuffled:
    every example is still seen once per epoch, in a random step, but beside one of its length."""
    rng = random.Random(seed)
    plan = []
    for _ in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        if group_by_length:
            order.sort(key=lambda i: len(examples[i]))
        epoch = [[examples[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]
        if group_by_length:
            rng.shuffle(epoch)
        plan += epoch
    return plan


class _Selection:
    """The held-out scorings during one `train` call and the best weights so far (a copy of the
    trainable parameters: a few MB for the embedded model even with every weight trained)."""

    def __init__(self, lm: LoadedModel, params: list, held_out: HeldOutCheck, planned: int, budget: TaskBudget):
        self.lm, self.params, self.held_out = lm, params, held_out
        self.at = held_out.check_steps(planned)
        self.scoring_flops = held_out.scoring_cost(budget, lm.model)
        self.checked: list[tuple[int, float]] = []
        self.best: tuple[float, int, list] | None = None

    def check(self, steps: int, last: bool = False) -> None:
        already = bool(self.checked) and self.checked[-1][0] == steps
        if already or (steps not in self.at and not last):
            return
        nll = self.held_out.nll(self.lm)   # scored in eval mode; the training mode comes back
        self.checked.append((steps, nll))
        if self.best is None or nll < self.best[0]:
            self.best = (nll, steps, [p.detach().clone() for p in self.params])

    def cost_left(self, steps: int) -> float:
        """What the scorings after `steps` steps will cost (the last one included)."""
        return sum(1 for at in self.at if at > steps) * self.scoring_flops

    def restore_best(self) -> int:
        _, steps, weights = self.best
        with torch.no_grad():
            for p, w in zip(self.params, weights):
                p.copy_(w)
        return steps


def plan_to_budget(plan: list[list[Encoded]], budget: TaskBudget, model) -> list[list[Encoded]]:
    """The longest prefix of `plan` the budget can pay for (all of it when it fits), so the
    learning-rate schedule is laid over the steps that will run instead of being cut off."""
    costs = [budget.training_cost([len(e) for e in batch], model) for batch in plan]
    if budget.can_afford(sum(costs)):
        return plan
    left, steps = budget.remaining(), 0
    for cost in costs:
        if cost > left:
            break
        left -= cost
        steps += 1
    return plan[:steps]


# Under a seconds cap, the step whose time sets the plan: the second, since the first also pays for
# one-off work (the optimiser's state, first-call allocations).  Timed on the first, a 3-s ttt_lora
# task on the tiny test model planned its training to end at 0.87 s of the 1.5 s it had.
TIMED_STEP = 2


def _device_clock(device) -> float:
    """The wall clock once the device has finished the work queued on it (a GPU runs a step
    after Python has moved on, so an unsynchronised clock times only the launch)."""
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind == "mps":
        torch.mps.synchronize()
    return time.perf_counter()


def steps_in_time(plan: list[list[Encoded]], seconds: float, seconds_per_token: float) -> int:
    """How many of `plan`'s steps `seconds` pay for at `seconds_per_token` (timed on a first step:
    a step's time grows with its tokens)."""
    steps, spent = 0, 0.0
    for batch in plan:
        spent += seconds_per_token * sum(len(e) for e in batch)
        if spent > seconds:
            break
        steps += 1
    return steps


def train(lm: LoadedModel, examples: list[Encoded], budget: TaskBudget, lr: float, epochs: int, batch_size: int,
          weight_decay: float = 0.01, warmup_ratio: float = 0.1, seed: int = 0,
          group_by_length: bool = False, held_out: HeldOutCheck | None = None) -> TrainReport:
    """AdamW with a cosine schedule and linear warm-up over the trainable parameters of `lm.model`,
    for `epochs` passes over `examples` or as many steps of them as `budget` pays for (a phase
    that must leave room for prediction passes `budget.holding_back(...)`).  Under a seconds cap
    the steps cannot be priced beforehand, so an early step is timed and the schedule laid over
    the steps the phase's seconds then pay for at that speed (`steps_in_time`); every step still
    checks the clock, and training stops there.  With
    `held_out`, the steps are planned to what its scorings leave, and the weights kept are those
    its scorings liked best."""
    from transformers import get_cosine_schedule_with_warmup

    model = lm.model
    params = [p for p in model.parameters() if p.requires_grad]
    wanted = batches(examples, batch_size, epochs, seed, group_by_length)
    plan = plan_to_budget(wanted, budget.holding_back(held_out.cost(budget, model)) if held_out else budget, model)
    report = TrainReport(planned_steps=len(plan), wanted_steps=len(wanted), stopped_by_budget=len(plan) < len(wanted))
    if not params or not plan:
        return report
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * len(plan)), len(plan))
    model.train()
    losses = []
    selection = _Selection(lm, params, held_out, len(plan), budget) if held_out else None
    timed = budget.seconds_left() != float("inf")
    while report.steps < len(plan):
        batch = plan[report.steps]
        if selection:
            selection.check(report.steps)
        scorings_left = selection.cost_left(report.steps) if selection else 0.0
        if not budget.can_afford(budget.training_cost([len(e) for e in batch], model) + scorings_left):
            report.stopped_by_budget = True
            break
        timing = timed and report.steps == TIMED_STEP - 1 and len(plan) > TIMED_STEP
        if timing:
            started = _device_clock(lm.device)
        loss = training_step(model, optimizer, padded(lm, batch), schedule)
        losses.append(loss)   # kept on the device: no host sync inside the loop
        report.steps += 1
        if timing:
            seconds_per_token = (_device_clock(lm.device) - started) / max(1, sum(len(e) for e in batch))
            plan = plan[:TIMED_STEP + steps_in_time(plan[TIMED_STEP:], budget.seconds_left(), seconds_per_token)]
            report.planned_steps = len(plan)
            report.stopped_by_budget = report.stopped_by_budget or len(plan) < len(wanted)
            if selection:
                selection.at = held_out.check_steps(len(plan))
            # The same warm-up and cosine, laid over the steps that will now run, those done behind it.
            schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * len(plan)), len(plan))
            for _ in range(TIMED_STEP):
                schedule.step()
    if selection:
        selection.check(report.steps, last=True)
        report.checked, report.kept_step = selection.checked, selection.restore_best()
    model.eval()
    report.losses = [float(x) for x in losses]
    if any(not math.isfinite(x) for x in report.losses):
        raise TrainingError(f"loss became {report.losses[-1]} (not finite) during test-time training")
    return report
