"""A run directory's files, and `TaskRecord`: the one result of one task.

A run directory holds
* `manifest.json`  -- what ran (method, settings, model and its weights' hash, dataset and task
  ids, budget, seed, versions, commit, command) and when (each session's start, its last
  result, `finished`), rewritten atomically;
* `results.jsonl`  -- one `TaskRecord` per line, appended as each task finishes (one write of
  one whole line, then fsync), so a kill leaves whole records and at most a torn last line;
* `submission.json` -- the Kaggle submission of the records so far.

Every reader -- resume, report, merge, Ray -- goes through `read_records`, so a torn last line
means the same everywhere: the task did not finish, and it is run again on resume.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

MISSING_ERROR = "no result in results.jsonl (run unfinished or task skipped)"


class RecordError(ValueError):
    """A results file that cannot be read; the message names the file and line."""


@dataclass
class TaskRecord:
    task_id: str
    method: str
    n_demos: int = 0                 # demonstrations the task shows
    n_tokens: int = 0                # the task's size at one token per cell plus one per row
    attempts: list = field(default_factory=list)   # per test input: two grids (lists of rows) or None
    correct: list = field(default_factory=list)    # per test output: either attempt exact (empty if ungraded)
    score: float = 0.0               # share of the test outputs solved
    graded: bool = True              # the task's answers were known
    flops: float = 0.0               # charged to the task's budget
    eval_flops: float = 0.0          # the graded metrics' forward passes (measurement, not charged)
    seconds: float = 0.0
    peak_memory_mb: float = 0.0
    cpu_seconds: float | None = None   # the method's work in CPU seconds: every thread, and child processes that ended (None: not recorded)
    budget_share: float | None = None   # flops / cap
    stopped_by_budget: bool | None = None   # the method wanted more work than the cap paid for (None: not recorded)
    out_of_work: str | None = None      # why the method stopped below its cap, in its words
    budget_exhausted: bool = False      # older name of stopped_by_budget, kept for old readers
    error: str | None = None         # one line; the task counts as wrong
    metrics: dict = field(default_factory=dict)    # graded metrics per test output (shape_ok, cell_acc, nll, token_acc)
    extra: dict = field(default_factory=dict)      # the method's own adapt/predict records
    previous_error: str | None = None   # set when --retry-failed reran a failed task

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def missing(self) -> bool:
        return self.error == MISSING_ERROR

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        if data["previous_error"] is None:
            del data["previous_error"]
        return data

    @classmethod
    def from_json(cls, data, where: str) -> "TaskRecord":
        """A record read back, checked; unknown keys (from a newer version) are ignored."""
        if not isinstance(data, dict) or "task_id" not in data:
            raise RecordError(f"{where}: no task_id")
        if not isinstance(data.get("correct") or [], list):
            raise RecordError(f"{where}: 'correct' must be a list of booleans")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key, empty in (("attempts", []), ("correct", []), ("metrics", {}), ("extra", {})):
            if values.get(key) is None:
                values[key] = empty
        record = cls(**values)
        record.task_id = str(record.task_id)
        if record.correct and abs(float(data.get("score") or 0.0) - sum(map(bool, record.correct)) / len(record.correct)) > 1e-9:
            # The score is derived from `correct`; a disagreement means a runner bug.
            raise RecordError(f"{where}: score {data.get('score')} disagrees with correct {record.correct}")
        return record

    @classmethod
    def failed_task(cls, task_id: str, method: str, error: str, n_outputs: int = 1, task=None,
                    spent: dict | None = None) -> "TaskRecord":
        """A task that raised: every answer empty and wrong (ungraded if its answers are unknown),
        with what the method spent before it raised (`Meter.summary()`), if it got that far."""
        graded = task.has_solutions if task is not None else True   # a task that could not be read counts as wrong
        spent = spent or {}
        return cls(task_id=task_id, method=method, n_demos=len(task.train) if task is not None else 0,
                   n_tokens=task_size(task) if task is not None else 0,
                   attempts=[[None, None] for _ in range(n_outputs)],
                   correct=[False] * n_outputs if graded else [], graded=graded, error=error,
                   flops=spent.get("flops", 0.0), seconds=spent.get("seconds", 0.0), cpu_seconds=spent.get("cpu_seconds"),
                   peak_memory_mb=spent.get("peak_memory_mb", 0.0), budget_share=spent.get("budget_share"),
                   stopped_by_budget=spent.get("stopped_by_budget", False))

    @classmethod
    def missing_task(cls, task_id: str, method: str) -> "TaskRecord":
        """A task of the manifest with no line in results.jsonl (the run stopped before it)."""
        return cls(task_id=task_id, method=method, error=MISSING_ERROR)


def task_size(task) -> int:
    """A task's size at one token per cell plus one per row, all grids (the compact format's length)."""
    grids = [g for p in (*task.train, *task.test) for g in (p.input, p.output) if g is not None]
    return int(sum(g.shape[0] * (g.shape[1] + 1) for g in grids))


# ---------------------------------------------------------------- reading and writing

def read_records(path: Path, repair: bool = False) -> list[TaskRecord]:
    """The records of a results.jsonl (none if the file is absent).  A torn last line -- a kill
    during the write -- is a task that did not finish: skipped, and with `repair` cut off the
    file so the resumed run appends after whole lines.  Any other bad line, or a task twice, is
    a RecordError naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    records, seen, good_bytes = [], set(), 0
    for lineno, raw in enumerate(lines, start=1):
        last = lineno == len(lines)
        if not raw.strip():
            good_bytes += len(raw) + (0 if last else 1)
            continue
        where = f"{path}:{lineno}"
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as e:
            if last:   # no newline after it: the write never completed
                break
            raise RecordError(f"{where}: invalid JSON ({e.msg} at char {e.pos})") from None
        record = TaskRecord.from_json(parsed, where)
        if record.task_id in seen:
            # A silent "keep the last" could hide a retried failure; be explicit.
            raise RecordError(f"{where}: task {record.task_id} appears twice")
        seen.add(record.task_id)
        records.append(record)
        good_bytes += len(raw) + (0 if last else 1)
    if repair and good_bytes < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return records


def read_results(path: Path) -> list[dict]:
    """`read_records` as plain JSON dicts (for scripts and notebooks)."""
    return [r.to_json() for r in read_records(path)]


def record_line(record: TaskRecord) -> str:
    """A record as one line of strict JSON: a number that is not finite (a NaN loss in a method's
    record, an NLL that overflowed) is written as null.  Python writes NaN by default, which jq,
    JavaScript and other strict readers refuse, so one such number made the whole file unreadable to them."""
    return json.dumps(_finite_or_null(record.to_json()), allow_nan=False) + "\n"


def _finite_or_null(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def append_record(path: Path, record: TaskRecord) -> None:
    """One os.write of one complete line, then fsync: a kill leaves whole records only."""
    line = record_line(record).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def rewrite_records(path: Path, records: list[TaskRecord]) -> None:
    """Replace results.jsonl with `records` in one atomic step (a kill leaves the old file or the new)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write("".join(record_line(r) for r in records))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def submission(records: list[TaskRecord], tasks_in_order: list[str]) -> dict:
    """Kaggle format; every task present, an empty attempt as [[0]] so the file always validates."""
    by_id = {r.task_id: r for r in records}
    out = {}
    for task_id in tasks_in_order:
        record = by_id.get(task_id)
        if record is None:
            continue
        out[task_id] = [{"attempt_1": pair[0] or [[0]], "attempt_2": pair[1] or [[0]]}
                        for pair in record.attempts] or [{"attempt_1": [[0]], "attempt_2": [[0]]}]
    return out


def wall_seconds(manifest: dict) -> float | None:
    """Wall-clock seconds the run's sessions took to produce its results: from each session's
    start (the first, then each of `resumed`) to its last result, the last session to `finished`
    when it finished.  Work in flight when a session was stopped is not counted, since it left
    no result.  None when a session's end is not recorded (runs made before `last_result`), and
    for shards merged into one run, which may have run side by side or days apart."""
    if manifest.get("merged_from"):
        return None
    sessions = [manifest] + list(manifest.get("resumed") or [])
    total = 0.0
    for i, session in enumerate(sessions):
        end = session.get("last_result")
        if i == len(sessions) - 1 and manifest.get("finished"):
            end = manifest["finished"]
        if "last_result" in session and not end:   # stopped before its first result
            continue
        if not session.get("started") or not end:
            return None
        total += (datetime.fromisoformat(end) - datetime.fromisoformat(session["started"])).total_seconds()
    return total
