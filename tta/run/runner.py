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
import sys
from datetime import datetime, timezone
from pathlib import Path

from tta.data.datasets import Dataset
from tta.run.record import (append_record, atomic_write_json, read_records, read_results,  # noqa: F401  (read_results: for callers)
                            rewrite_records, submission)
from tta.run.time_limit import task_limit
from tta.run.solve import (IDENTITY_KEYS, RunError, RunSpec, TaskRunner, config_hash, git_commit,  # noqa: F401
                           package_versions, prepare)


LOCK_NAME = ".tta.lock"


class DirectoryBusy(RunError):
    """Another live process holds the run directory (see `DirectoryClaim`)."""


class DirectoryClaim:
    """One writer per run directory: an exclusive advisory lock on `<out>/.tta.lock`, held while
    the run writes.  A second `tta run` (or experiment cell) pointed at a directory in use stops
    with a one-line error instead of solving the same tasks twice and appending duplicate
    records.  The operating system drops the lock if the process dies, so a killed run never
    blocks its resume.  (No-op where `fcntl` is missing, i.e. Windows.)"""

    def __init__(self, out: Path):
        self.out, self.handle = out, None

    def take(self, wait: bool = False) -> None:
        """Claim the directory; if another process holds it, raise `DirectoryBusy`, or with
        `wait` block until that process lets go."""
        if self.handle is not None or not self.out.is_dir():
            return
        try:
            import fcntl
        except ImportError:
            return
        handle = open(self.out / LOCK_NAME, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise DirectoryBusy(f"{self.out}: another tta run is writing to this directory (pid {holder}); "
                                "wait for it to finish, or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            (self.out / LOCK_NAME).unlink(missing_ok=True)
            self.handle.close()
            self.handle = None


def run(spec: RunSpec, progress: bool = True, executor: str = "local", ray_address: str | None = None,
        log=None, wait_for_directory: bool = False, workers: int | None = None) -> Path:
    """Run `spec` into its directory and return the directory.  `workers`: with the local
    executor, that many processes solve tasks side by side (`tta.run.worker_processes`; default
    one, this process); with Ray, that many actors (default one per GPU, else per CPU).  `log` (a callable taking one line,
    e.g. printing to stderr) gets the run header before work starts and each task's error as it
    happens.  One process writes a directory at a time (`DirectoryClaim`): a directory in use
    raises `DirectoryBusy`, or with `wait_for_directory` the run waits for it (and then reads
    what the other process wrote, so it redoes nothing)."""
    cls, config, dataset, out, manifest = prepare(spec)
    claim = DirectoryClaim(out)
    try:
        claim.take()
    except DirectoryBusy:
        if not wait_for_directory:
            raise
        claim.take(wait=True)
        cls, config, dataset, out, manifest = prepare(spec)   # what the other process wrote meanwhile
    try:
        return _run(spec, progress, executor, ray_address, log, cls, config, dataset, out, manifest, claim, workers)
    finally:
        claim.release()


def _run(spec, progress, executor, ray_address, log, cls, config, dataset, out, manifest, claim, workers) -> Path:
    say = log or (lambda line: None)
    results_path = out / "results.jsonl"
    records = read_records(results_path, repair=True)
    retried = {r.task_id: r.error for r in records if r.failed} if spec.retry_failed else {}
    done = {r.task_id for r in records if r.task_id not in retried}
    todo = [task_id for task_id in dataset.ids if task_id not in done]

    if not todo and manifest.get("finished"):
        # Nothing to do: the manifest keeps saying who produced the results (an experiment that
        # passes over its finished cells used to stamp them with its own commit and command).
        say(run_header(manifest, dataset, out, len(done), 0, "cpu", cls.needs_model))
        return out
    now = _now()
    if "git_commit" in manifest:   # a resume: the first session's provenance stays, this one is added
        session = {"started": now, "git_commit": git_commit(), "command": spec.command, "tasks": len(todo)}
        added = {k: v for k, v in dataclasses.asdict(config).items() if k not in manifest.get("config", {})}
        if added:   # settings the method gained since, at the values that reproduce the run's (`before`)
            session["settings_added"] = added
        manifest.setdefault("resumed", []).append(session)
    else:
        manifest.update({"started": now, "versions": package_versions(), "git_commit": git_commit(),
                         "command": spec.command})
        session = manifest
    session["last_result"] = None   # recorded, so a session that ends before any result counts 0 s
    if spec.task_timeout and executor == "ray":
        raise RunError("--task-timeout: Ray runs tasks outside a process's main thread, where no timer signal "
                       "reaches; use the local executor (with --workers)")
    limit = task_limit(spec.task_timeout, spec.budget.seconds)[0]   # given, or a seconds cap's default guard
    if limit and executor != "ray":
        session["task_timeout"] = limit
    if workers is not None and workers < 1:
        raise RunError(f"--workers {workers}: expected at least 1")
    manifest.update({"executor": executor, "finished": None})
    manifest.pop("workers", None)
    if executor == "ray":
        say(run_header(manifest, dataset, out, len(done), len(retried), "ray", cls.needs_model))
        from tta.run.ray_executor import solve_on_ray
        results, one_off, device = solve_on_ray(spec, todo, ray_address, workers)
    elif executor == "local" and (workers or 1) > 1 and todo:
        from tta.run.worker_processes import solve_in_processes
        from tta.threads import default_threads, threads_per_worker
        workers = min(workers, len(todo))
        threads, cores = threads_per_worker(workers), default_threads()
        if workers * threads > cores:
            say(f"note: {workers} workers x {threads} threads on {cores} cores: tasks share cores, so seconds "
                "per task (and --budget-seconds caps) are not those of a task alone")
        results, one_off, device = solve_in_processes(spec, todo, workers, threads)
        device = f"{device} ({workers} worker processes)"
        manifest.update(threads=threads, workers=workers)
        say(run_header(manifest, dataset, out, len(done), len(retried), device, cls.needs_model))
    elif executor == "local":
        runner = TaskRunner(spec, cls, config, dataset)
        say(run_header(manifest, dataset, out, len(done), len(retried), runner.device, cls.needs_model))
        one_off, device = (runner.setup() if todo else None), runner.device
        manifest["threads"] = runner.threads
        results = (runner.solve(task_id) for task_id in todo)
    else:
        raise RunError(f"unknown executor {executor!r} (local, ray)")
    manifest["device"] = device
    if one_off and "one_off" not in manifest:
        manifest["one_off"] = one_off
    out.mkdir(parents=True, exist_ok=True)   # only now: a run that cannot start leaves no empty directory
    claim.take()   # a new directory: claimed as soon as it exists
    atomic_write_json(out / "manifest.json", manifest)
    if retried:   # the failed records go only now that the run has started; each comes back below
        records = [r for r in records if r.task_id not in retried]
        rewrite_records(results_path, records)

    bar = _progress(len(dataset.ids), len(done), progress, cls.name)
    if executor == "local" and not manifest.get("workers") and progress:
        # Every method spends (nearly) its cap, so the share spent is the task's progress.
        runner.on_progress = lambda share: bar.set_postfix_str(
            f"task {len(records) + 1}/{len(dataset.ids)}: {share:.0%} of its cap", refresh=True)
    solved = sum(r.score for r in records)
    for record in results:   # written by this process alone, in the order tasks finish
        if record.task_id in retried:
            record.previous_error = retried[record.task_id]
        append_record(results_path, record)
        records.append(record)
        atomic_write_json(out / "submission.json", submission(records, dataset.ids))
        # When this session's latest result landed: a session stopped by a signal writes no
        # `finished`, and without its end the run's wall time (`wall_seconds`) is unknown.
        session["last_result"] = _now()
        atomic_write_json(out / "manifest.json", manifest)
        solved += record.score
        bar.update(1)
        bar.set_postfix(score=f"{solved:.1f}/{len(records)}", failed=sum(r.failed for r in records))
        if record.failed:
            with bar.external_write_mode(file=sys.stderr):
                say(f"task {record.task_id} failed: {record.error}")
    bar.close()
    atomic_write_json(out / "submission.json", submission(records, dataset.ids))
    manifest["finished"] = _now()
    atomic_write_json(out / "manifest.json", manifest)
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
    manifests = [_read_manifest(d) for d in shard_dirs]
    first = manifests[0]
    for d, m in zip(shard_dirs[1:], manifests[1:]):
        for key in (k for k in IDENTITY_KEYS if k != "task_ids"):
            if m[key] != first[key]:
                raise RunError(f"{d}: differs from {shard_dirs[0]} in {key}; shards of one run must agree")
    records, owner = {}, {}
    for d, m in zip(shard_dirs, manifests):
        for r in _finished_records(d, m, "shard"):
            if r.task_id in owner:
                raise RunError(f"{d}: task {r.task_id} is also in {owner[r.task_id]}; shards overlap")
            owner[r.task_id], records[r.task_id] = d, r
    task_ids = sorted(owner)
    counts = {m["shard"][1] for m in manifests if "shard" in m}
    if counts and (len(counts) > 1 or sorted(m["shard"][0] for m in manifests) != list(range(counts.pop()))):
        raise RunError("the directories are not shards 0..n-1 of one run (see each manifest's shard)")
    merged = {k: v for k, v in first.items() if k != "shard"}
    merged.update(task_ids=task_ids, merged_from=[str(d) for d in shard_dirs],
                  started=min(m.get("started") or "" for m in manifests),
                  finished=max(m.get("finished") or "" for m in manifests) or None)
    merged["config_hash"] = config_hash(merged)
    merged["one_off"] = first.get("one_off")
    return _write_merged(out, [records[t] for t in task_ids], merged)


# ---------------------------------------------------------------- overlays

# What an overlay may not change: a rerun of part of a run keeps its method, model, tasks'
# dataset, budget and seed; only settings may differ, and the merged manifest names them.
OVERLAY_MUST_MATCH = ("method", "model", "model_sha256", "dataset", "budget", "seed")


def overlay(base_dir: Path, rerun_dirs: list[Path], out: Path, command: str | None = None) -> Path:
    """A new run directory holding `base_dir`'s results, with every task that a rerun also ran
    replaced by the rerun's result (a later rerun wins over an earlier one).

    For a declared partial rerun: say, the tasks of a run that a setting (`max_views`) stopped
    early, rerun without it, while the tasks it did not stop keep their results.  The reruns
    must agree with the base in method, model, weights, dataset, budget and seed, run only
    tasks of the base, and have finished.  Their settings may differ: the manifest's
    `overlaid` lists, per rerun, its tasks, command and the settings that differ from the
    base's `config` (which the other tasks ran with), and `tta compare` shows it beside the run.
    That the base's remaining results are what the rerun's settings would have given is the
    user's claim to check (a rerun of one such task, for instance); the merge cannot know it.
    Wall time per task is not recorded for the result: the runs ran at different times."""
    base_dir, rerun_dirs = Path(base_dir), [Path(d) for d in rerun_dirs]
    base = _read_manifest(base_dir)
    records = {r.task_id: r for r in read_records(base_dir / "results.jsonl")}
    overlaid, finished = [], [base.get("finished") or ""]
    for d in rerun_dirs:
        rerun = _read_manifest(d)
        for key in OVERLAY_MUST_MATCH:
            if rerun.get(key) != base.get(key):
                raise RunError(f"{d}: differs from {base_dir} in {key}; an overlay may differ in settings only")
        outside = sorted(set(rerun["task_ids"]) - set(base["task_ids"]))
        if outside:
            raise RunError(f"{d}: {len(outside)} tasks are not tasks of {base_dir} ({', '.join(outside[:5])})")
        rerun_records = _finished_records(d, rerun, "rerun")
        records.update({r.task_id: r for r in rerun_records})
        overlaid.append({"run": str(d), "config_hash": rerun.get("config_hash"), "command": rerun.get("command"),
                         "git_commit": rerun.get("git_commit"),
                         "settings": _setting_differences(base, rerun),
                         "tasks": [r.task_id for r in rerun_records]})
        finished.append(rerun.get("finished") or "")
    merged = {k: v for k, v in base.items() if k not in ("resumed", "last_result", "shard")}
    merged.update(merged_from=[str(base_dir)] + [str(d) for d in rerun_dirs], overlaid=overlaid,
                  base_command=base.get("command"), command=command, finished=max(finished) or None)
    # The overlay is a run of its own: its hash covers what was overlaid, so it never equals the base's.
    merged["config_hash"] = hashlib.sha256((config_hash(merged) + json.dumps(overlaid, sort_keys=True)).encode()).hexdigest()[:12]
    return _write_merged(out, [records[t] for t in base["task_ids"] if t in records], merged)


def _finished_records(d: Path, manifest: dict, what: str) -> list:
    """The records of run directory `d`, which must hold one for every task its manifest lists."""
    records = read_records(Path(d) / "results.jsonl")
    missing = sorted(set(manifest["task_ids"]) - {r.task_id for r in records})
    if missing:
        raise RunError(f"{d}: {len(missing)} tasks have no result yet ({', '.join(missing[:5])}); finish the {what} first")
    return records


def _write_merged(out: Path, records: list, manifest: dict) -> Path:
    """Write a run directory made by `tta merge`: the records in task order, the manifest, the
    submission.  Never into a directory that already holds results."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / "results.jsonl").exists():
        raise RunError(f"{out}: already holds results; merge into a new directory")
    for record in records:
        append_record(out / "results.jsonl", record)
    atomic_write_json(out / "manifest.json", {k: v for k, v in manifest.items() if v is not None})
    atomic_write_json(out / "submission.json", submission(records, manifest["task_ids"]))
    return out


def _read_manifest(d: Path) -> dict:
    path = Path(d) / "manifest.json"
    if not path.exists():
        raise RunError(f"{d}: not a run directory (no manifest.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: invalid JSON ({e})") from None


def _setting_differences(base: dict, rerun: dict) -> dict:
    """{setting: [base value, rerun value]} for each setting the two runs' configs disagree on.
    A setting added to the method after a run was recorded counts at the value that reproduces
    what the method did then (its `before`), as when a run is resumed."""
    configs = [m.get("config") or {} for m in (base, rerun)]
    try:
        from tta.method import get_method, load_plugins
        from tta.settings import as_recorded_now
        load_plugins(base.get("plugins") or [])
        config_cls = get_method(base["method"]).Config
        configs = [as_recorded_now(config_cls, c, m.get("budget")) for c, m in zip(configs, (base, rerun))]
    except Exception:   # a method that no longer loads: compare the configs as recorded
        pass
    old, new = configs
    return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
