"""`tta pretrain`: train the embedded base model on augmented leave-one-out tasks, from scratch or,
with `init`, onward from another model's weights (continued pretraining on new data).

The recipe is the test-time training recipe at scale: every step draws fresh
augmented leave-one-out sequences from the training tasks (real ARC training
tasks and generated tasks), loss on the outputs only.  A plain loop, like
`tta.training.finetune`, because it must stop on a wall-clock limit, checkpoint and
resume exactly; it runs in bf16 on CUDA and under bf16 autocast on the CPU.

Checkpoints hold the model (safetensors), the AdamW moments (safetensors, not
a pickle) and `trainer_state.json`; rerunning the same command resumes.  The
output directory is a transformers model directory with a model card and
`training_data.json` (ids and content hashes of every training task, which
`tta run` uses to refuse contaminated evaluations).
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from tta.data import contamination
from tta.training.examples import leave_one_out_examples
from tta.model.batching import pad_batch, pad_labels
from tta.model.encoding import GRID_STRIDE, POSITIONS_KEY, ROW_STRIDE, format_for
from tta.training.step import PAD_MULTIPLE, training_step
from tta.model.loading import (ModelError, build_model, load_model, model_directory, pick_device,
                                quiet_transformers, save_model, weights_sha256)
from tta.threads import set_threads, usable_cpus
from tta.data.tasks import TaskError
from tta.data.datasets import load_dataset


@dataclass
class PretrainConfig:
    data: list = field(default_factory=lambda: ["arc1-train", "arc2-train", "gen-train"])
    # must not overlap the data
    exclude: list = field(default_factory=lambda: ["arc1-eval", "arc2-eval", "arc1-heldout", "gen-eval"])
    drop_overlap: bool = False     # drop overlapping training tasks instead of refusing
    size: str = "default"
    positions: str = "grid"        # "grid" (tta.model.encoding.GridPositions) or "sequential" (0, 1, 2, ...)
    minutes: float | None = None
    steps: int | None = None
    tokens_per_batch: int = 8192
    max_len: int = 2048
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: float = 0.03           # share of the run spent warming up
    min_lr_ratio: float = 0.1      # the cosine ends at lr * min_lr_ratio
    seed: int = 0
    checkpoint_minutes: float = 5.0
    log_every: int = 20
    workers: int | None = None     # processes drawing batches; None: none on the CPU, up to 8 on a GPU
    # A model directory (or "default", the embedded model) whose weights this run starts from, with
    # a fresh optimiser and schedule: `size` is then the init model's.  Its training_data.json is
    # carried into the new model's, so `tta run` still refuses what either run trained on.
    init: str | None = None


def learning_rate(c: PretrainConfig, progress: float) -> float:
    """Linear warm-up then cosine decay, as a function of the share of the run done (0..1), so a
    run bounded by minutes and one bounded by steps follow the same curve."""
    if progress < c.warmup:
        return c.lr * progress / c.warmup
    t = min(1.0, (progress - c.warmup) / max(1e-9, 1 - c.warmup))
    return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def load_training_tasks(c: PretrainConfig, log=print):
    """The training tasks, checked against every excluded dataset: an overlap is refused, or with
    `drop_overlap` the overlapping training tasks are dropped (and named in the log)."""
    tasks, origin = [], {}
    for entry in c.data:
        some = _weighted(entry)
        tasks += some
        for t in some:
            origin.setdefault(t.id, entry.partition("*")[0])   # the dataset, for contamination messages
    for name in c.exclude:
        excluded = load_dataset(name).tasks
        if c.drop_overlap:
            dropped = contamination.to_drop(tasks, excluded)
            if dropped:
                shown = sorted(dropped)
                log(f"dropped {len(dropped)} training tasks that overlap {name}: {', '.join(shown[:10])}"
                    + (" ..." if len(shown) > 10 else ""))
            tasks = [t for t in tasks if t.id not in dropped]
        contamination.check(contamination.fingerprint(tasks, origin), excluded, "+".join(c.data), name)
    return tasks, contamination.fingerprint(tasks, origin)


def _weighted(entry: str) -> list:
    """`NAME*K`: the dataset's tasks K times over, so each is drawn K times as often (the 400
    real training tasks would be 1% of the draws beside gen-train-large's 41,000)."""
    name, _, times = entry.partition("*")
    if times and not (times.isdigit() and int(times) >= 1):
        raise TaskError(f"--data {entry}: the weight after * must be a whole number >= 1")
    return load_dataset(name).tasks * int(times or 1)


def draw_batch(tasks, fmt, rng: np.random.Generator, tokens_per_batch: int, max_len: int):
    """Fresh augmented leave-one-out sequences until the batch holds `tokens_per_batch` tokens
    (padded to its longest); similar lengths come from drawing a pool and sorting it."""
    pool = []
    while sum(len(e) for e in pool) < 2 * tokens_per_batch:
        task = tasks[rng.integers(len(tasks))]
        examples = leave_one_out_examples(task, fmt, rng, max_examples=1, max_len=max_len)
        pool += [e.encoded for e in examples]
    pool.sort(key=len)
    start = rng.integers(len(pool))
    batch, width = [], 0
    for e in pool[start:] + pool[:start][::-1]:
        width_if = max(width, len(e))
        if width_if * (len(batch) + 1) > tokens_per_batch and batch:
            break
        batch.append(e)
        width = width_if
    return batch


class BatchStream(torch.utils.data.Dataset):
    """Batch number `step`, drawn from a generator seeded by (seed, step) and padded: the same
    batch whichever process draws it, so worker processes feed a GPU the batches the loop would
    have drawn itself, and a resumed run continues the stream of an uninterrupted one."""

    def __init__(self, tasks, fmt, c: PretrainConfig):
        self.tasks, self.fmt, self.c = tasks, fmt, c

    def __getitem__(self, step: int):
        batch = draw_batch(self.tasks, self.fmt, np.random.default_rng([self.c.seed, step]),
                           self.c.tokens_per_batch, self.c.max_len)
        ids, mask, positions = pad_batch([e.input_ids for e in batch], self.fmt, "cpu", "right", PAD_MULTIPLE)
        return ids, mask, positions, pad_labels([e.labels for e in batch], "cpu", PAD_MULTIPLE)


def batches_from(stream: BatchStream, first_step: int, dev: torch.device, workers: int | None):
    """Batches first_step, first_step + 1, ... in order.  On a GPU one process cannot draw
    augmented sequences as fast as a small model eats them (~1.4M tokens/s per core, measured),
    so worker processes draw ahead; on the CPU drawing is ~1% of a step and the cores train."""
    if workers is None:
        workers = 0 if dev.type == "cpu" else max(0, min(8, usable_cpus() - 2))
    steps = range(first_step, 2 ** 62)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, sampler=steps, num_workers=workers,
                                         pin_memory=dev.type == "cuda", prefetch_factor=4 if workers else None)
    for ids, mask, positions, labels in loader:
        yield (t.to(dev, non_blocking=True) for t in (ids, mask, positions, labels))


# ---------------------------------------------------------------- the starting weights

def init_directory(spec: str) -> Path:
    folder = model_directory(spec)
    if not (folder / "config.json").exists():
        raise ModelError(f"--init {spec}: not a model directory (needs config.json and *.safetensors weights)")
    return folder


def initial_model(c: PretrainConfig, out: Path):
    """A fresh model of `c.size`, or the weights of `c.init` (in float32, as the loop trains).  A
    continued run keeps the init model's size and position ids; its context becomes `c.max_len`
    (RoPE has no position table, so a longer context needs no new weights, only training)."""
    if not c.init:
        return build_model(c.size, seed=c.seed, max_context=c.max_len, positions=c.positions)
    folder = init_directory(c.init)
    lm = load_model(str(folder), device="cpu", dtype="float32")
    lm.model.config.max_position_embeddings = c.max_len
    seen = folder / "training_data.json"
    if seen.exists() and not (out / "training_data.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(seen, out / "training_data.json")   # merged with this run's data below
    return lm.model, lm.tokenizer


def describe_init(spec: str) -> dict:
    """Where a continued run's weights came from, for its trainer_state.json and model card."""
    folder = init_directory(spec)
    before = folder / "trainer_state.json"
    earlier = json.loads(before.read_text()) if before.exists() else {}
    seen = folder / "training_data.json"
    return {"model": spec, "weights_sha256": weights_sha256(str(folder)),
            "steps": earlier.get("step"), "tokens": earlier.get("tokens"),
            "datasets": json.loads(seen.read_text())["datasets"] if seen.exists() else []}


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(out: Path, model, tokenizer, optimizer, state: dict) -> None:
    from safetensors.torch import save_file
    save_model(model, tokenizer, out)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    moments = {}
    for i, p in enumerate(params):
        st = optimizer.state.get(p)
        if st:
            moments[f"{i}.exp_avg"] = st["exp_avg"].contiguous()
            moments[f"{i}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
            moments[f"{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    save_file(moments, str(out / "optimizer.safetensors"))
    tmp = out / "trainer_state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(out / "trainer_state.json")


def load_checkpoint(out: Path, model, optimizer) -> dict:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    saved = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    model.load_state_dict(saved.state_dict())
    moments = load_file(str(out / "optimizer.safetensors"))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        if f"{i}.exp_avg" in moments:
            optimizer.state[p] = {"exp_avg": moments[f"{i}.exp_avg"].to(p.device),
                                  "exp_avg_sq": moments[f"{i}.exp_avg_sq"].to(p.device),
                                  "step": moments[f"{i}.step"].reshape(()).clone()}
    return json.loads((out / "trainer_state.json").read_text())


def record_training_data(path: Path, datasets: list[str], fingerprint: dict) -> None:
    """What the model has seen, accumulated: a resumed run on other data adds to the record.  It
    keeps which training task holds each hash and which dataset each task came from, so that a
    refused evaluation task is named with the training task it matched (tta.data.contamination)."""
    if path.exists():
        seen = contamination.read_training_data(path)
        datasets = list(seen["datasets"]) + list(datasets)
        fingerprint = contamination.merge(seen, fingerprint)
    path.write_text(json.dumps(contamination.to_json(fingerprint, datasets)))


# ---------------------------------------------------------------- the loop

MAX_ROLLBACKS = 4


class LastGood:
    """The model and optimiser as they were after the last logged window whose loss was finite.
    A loss that turns NaN or infinite rolls the run back here with half the learning rate, instead
    of ending it: a one-shot GPU run (a lent machine, minutes of it) would otherwise keep only its
    last checkpoint.  (The medium size went to NaN at lr 1.5e-3 in such a run.)  A copy of the
    weights and the AdamW moments: 130 MB for the 10.6M-parameter size, taken every `log_every`
    steps."""

    def __init__(self, model, optimizer, step: int, tokens: int):
        self.keep(model, optimizer, step, tokens)

    def keep(self, model, optimizer, step: int, tokens: int) -> None:
        self.model = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.optimizer = copy.deepcopy(optimizer.state_dict())
        self.step, self.tokens = step, tokens

    def restore(self, model, optimizer) -> None:
        model.load_state_dict(self.model)
        optimizer.load_state_dict(copy.deepcopy(self.optimizer))


def pretrain(c: PretrainConfig, out: Path, device: str = "auto", command: str = "", log=print) -> dict:
    if c.minutes is None and c.steps is None:
        raise ValueError("give --minutes or --steps")
    set_threads()
    quiet_transformers()   # no "Writing model shards" bar at every checkpoint
    dev = pick_device(device)
    init = describe_init(c.init) if c.init else None   # a bad --init fails before the data loads
    tasks, fingerprint = load_training_tasks(c, log)
    model, tokenizer = initial_model(c, out)
    model.to(dev)
    fmt = format_for(tokenizer, model.config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay, betas=(0.9, 0.95))
    state = {"step": 0, "tokens": 0, "seconds": 0.0, "curve": [], "config": asdict(c)}
    if init:
        state["init"] = init
    if (out / "trainer_state.json").exists():
        state = load_checkpoint(out, model, optimizer)
        log(f"resuming from {out} at step {state['step']} ({state['tokens']:,} tokens)")
    # Each invocation is a phase (a resumed run may use other data or a longer schedule).
    state.setdefault("phases", []).append({"from_step": state["step"], "data": c.data, "minutes": c.minutes,
                                           "steps": c.steps, "command": command})
    out.mkdir(parents=True, exist_ok=True)
    record_training_data(out / "training_data.json", c.data, fingerprint)

    model.train()
    started, last_checkpoint, window = time.perf_counter(), time.perf_counter(), []
    seconds_before = state["seconds"]   # from earlier sessions of a resumed run
    elapsed = lambda: seconds_before + time.perf_counter() - started
    stream = BatchStream(tasks, fmt, c)
    batches = batches_from(stream, state["step"], dev, c.workers)
    last_good = LastGood(model, optimizer, state["step"], state["tokens"])
    while True:
        progress = max(state["step"] / c.steps if c.steps else 0.0,
                       elapsed() / (60 * c.minutes) if c.minutes else 0.0)
        if progress >= 1.0:
            break
        lr = learning_rate(c, progress) * state.get("lr_scale", 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids, mask, positions, labels = next(batches)
        loss = training_step(model, optimizer, (ids, mask, positions, labels), clip_norm=1.0)
        state["step"] += 1
        state["tokens"] += int(mask.sum())
        window.append(loss)
        if state["step"] % c.log_every == 0:
            mean_loss = float(torch.stack(window).mean())
            window = []
            if not math.isfinite(mean_loss):
                rollbacks = state.setdefault("rollbacks", [])
                if len(rollbacks) >= MAX_ROLLBACKS:
                    raise RuntimeError(f"pretraining loss is {mean_loss} at step {state['step']} "
                                       f"after {len(rollbacks)} rollbacks with halved learning rates")
                state["lr_scale"] = state.get("lr_scale", 1.0) / 2
                rollbacks.append({"loss": str(mean_loss), "at_step": state["step"], "back_to_step": last_good.step,
                                  "lr_scale": state["lr_scale"]})
                log(f"step {state['step']:6d}  loss {mean_loss}: back to step {last_good.step}, "
                    f"learning rate x{state['lr_scale']:g}")
                last_good.restore(model, optimizer)
                state["step"], state["tokens"] = last_good.step, last_good.tokens
                batches.close()
                batches = batches_from(stream, state["step"], dev, c.workers)   # the same batches again
                continue
            last_good.keep(model, optimizer, state["step"], state["tokens"])
            seconds = elapsed()
            state["curve"].append({"step": state["step"], "tokens": state["tokens"], "loss": round(mean_loss, 4),
                                   "minutes": round(seconds / 60, 2), "lr": lr})
            log(f"step {state['step']:6d}  loss {mean_loss:.4f}  lr {lr:.2e}  "
                f"{state['tokens'] / max(seconds, 1e-9):,.0f} tokens/s  {state['tokens']:,} tokens  {seconds / 60:.1f} min")
        if time.perf_counter() - last_checkpoint > 60 * c.checkpoint_minutes:
            _checkpoint(out, model, tokenizer, optimizer, state, elapsed(), command)
            last_checkpoint = time.perf_counter()
    batches.close()   # ends the worker processes
    _checkpoint(out, model, tokenizer, optimizer, state, elapsed(), command)
    write_model_card(out, state, model, command)
    return state


def _checkpoint(out, model, tokenizer, optimizer, state, seconds, command):
    state["seconds"] = seconds
    state["command"] = command or state.get("command", "")
    save_checkpoint(out, model, tokenizer, optimizer, state)


def write_model_card(out: Path, state: dict, model, command: str, evaluation: str | None = None) -> None:
    """README.md beside the weights: data, size, steps, tokens, loss curve, command, evaluation."""
    c = state["config"]
    n_params = sum(p.numel() for p in model.parameters())
    curve = state["curve"]
    shown = curve[:: max(1, len(curve) // 12)] + ([curve[-1]] if curve else [])
    rows = "\n".join(f"| {p['step']} | {p['tokens']:,} | {p['minutes']} | {p['loss']} |" for p in shown)
    phases = "\n".join(f"  - from step {p['from_step']}: `{p['command'] or '(not recorded)'}` (data: {', '.join(p['data'])})"
                       for p in state.get("phases", [])) or f"  - `{state.get('command') or command}`"
    seen = out / "training_data.json"
    datasets = json.loads(seen.read_text())["datasets"] if seen.exists() else c["data"]
    init = state.get("init")
    if init:   # training_data.json also lists what the init model saw; name that apart
        earlier = ", ".join(init.get("datasets") or []) or "the data its own model card names"
        datasets = list(c["data"]) + [f"and before it, for the init model, {earlier}"]
    eval_path = out / "evaluation.md"
    evaluation = evaluation or (eval_path.read_text() if eval_path.exists() else "Not evaluated yet.")
    positions = ("grid positions (`tta.model.encoding.GridPositions`): cell (r, c) of the g-th grid at "
                 f"{GRID_STRIDE} g + 1 + {ROW_STRIDE} r + c, so an output cell is always {GRID_STRIDE} after the same cell of its input. "
                 "Use `tta.inference.decoding.generate` (or pass `position_ids` from `CompactFormat.positions`); "
                 "`model.generate` numbers tokens 0, 1, 2, ... and gets worse answers."
                 if getattr(model.config, POSITIONS_KEY, None) == "grid" else "0, 1, 2, ... (plain).")
    origin = ("trained from scratch by `tta pretrain`." if not init else
              f"trained by `tta pretrain --init {init['model']}`: it starts from those weights "
              f"(sha256 {init['weights_sha256']}, {init['steps'] or 0:,} steps and {init['tokens'] or 0:,} tokens "
              "of earlier pretraining) with a fresh optimiser and schedule; the numbers below are this run's.")
    card = f"""# tta embedded base model

A Llama-architecture causal LM over the compact grid vocabulary (16 tokens: one per colour,
row end, input/output markers, bos/eos/pad), {origin}

- Size: `{c['size'] if not init else 'as ' + init['model']}` -- {n_params:,} parameters, {model.config.num_hidden_layers} layers,
  width {model.config.hidden_size}, at most {model.config.max_position_embeddings} tokens per sequence.
- Position ids: {positions}
- Data: augmented leave-one-out sequences (rotations/flips/transpose/upscaling/reflections/
  translations, colour permutations with 0 fixed, shuffled demonstration order) drawn fresh at
  every step from {', '.join(datasets)} (see the phases below); loss on outputs only. Sequences over {c['max_len']} tokens are skipped.
- Excluded: the data was checked against {', '.join(c['exclude'])} (ids and content hashes) and
  shares no task with them. `training_data.json` lists every training task id and hash;
  `tta run` refuses to evaluate this model on any of them unless `--force`.
- Optimiser: AdamW (betas 0.9/0.95, weight decay {c['weight_decay']}), peak lr {c['lr']}, warm-up
  {c['warmup']:.0%} then cosine to {c['min_lr_ratio']}x, ~{c['tokens_per_batch']} tokens per batch, grad clip 1.0.
- Trained: {state['step']:,} steps, {state['tokens']:,} tokens, {state['seconds'] / 60:.1f} minutes.
- Commands (each phase of the run, in order; a later phase resumes the earlier one):
{phases}

## Loss curve (training loss, mean over the last {c['log_every']} steps)

| step | tokens | minutes | loss |
|---|---|---|---|
{rows}

## Evaluation

{evaluation}
"""
    (out / "README.md").write_text(card)


def main_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
