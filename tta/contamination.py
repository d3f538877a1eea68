"""Keeping evaluation data out of training data.

Tasks are compared by id and by a content hash of their grids, because the
same puzzle appears under different ids in different releases (ARC-AGI-2's
training split holds 376 of the 400 ARC-AGI-1 evaluation tasks).  A model
trained by `tta pretrain` records what it saw in `training_data.json` beside
its weights; `tta run` refuses to evaluate it on those tasks unless forced.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tta.tasks import Task


class ContaminationError(ValueError):
    """Evaluation tasks overlap training data; the message is one line."""


def test_input_hash(task: Task) -> str:
    """A hash of the test inputs alone: what makes a puzzle the same puzzle for evaluation."""
    h = hashlib.sha256()
    for pair in task.test:
        h.update(repr(pair.input.shape).encode() + pair.input.tobytes())
    return h.hexdigest()[:16]


def content_hashes(task: Task) -> set[str]:
    """Hashes of the task's test inputs and of every demonstration pair, so an overlap is found even
    when a release reorders or trims the demonstrations."""
    hashes = {"t:" + test_input_hash(task)}
    for pair in task.train:
        hashes.add("d:" + hashlib.sha256(repr(pair.input.shape).encode() + pair.input.tobytes()
                                         + repr(pair.output.shape).encode() + pair.output.tobytes()).hexdigest()[:16])
    return hashes


def fingerprint(tasks: list[Task]) -> dict:
    return {"ids": sorted(t.id for t in tasks), "hashes": sorted({h for t in tasks for h in content_hashes(t)})}


def overlap(train_fp: dict, evaluated: list[Task]) -> list[str]:
    """Ids of evaluated tasks whose id, test input or any demonstration pair appears in the training data."""
    ids, hashes = set(train_fp["ids"]), set(train_fp["hashes"])
    return sorted(t.id for t in evaluated
                  if t.id in ids or "t:" + test_input_hash(t) in hashes
                  or len({h for h in content_hashes(t) if h.startswith("d:")} & hashes) >= 2)


def to_drop(training: list[Task], evaluated: list[Task]) -> set[str]:
    """Ids of the training tasks to leave out so that `check` passes: each that overlaps an
    evaluated task by itself, and, where an evaluated task is covered only by pieces of several
    (one shared demonstration pair each, common among many generated tasks on small grids),
    every training task that shares any grid pair with it."""
    dropped = set(overlap(fingerprint(evaluated), training))
    kept = [t for t in training if t.id not in dropped]
    by_id = {t.id: t for t in evaluated}
    for hit in overlap(fingerprint(kept), evaluated):
        hashes = content_hashes(by_id[hit])
        dropped |= {t.id for t in kept if t.id == hit or content_hashes(t) & hashes}
    return dropped


def check(train_fp: dict, evaluated: list[Task], train_name: str, eval_name: str) -> None:
    hits = overlap(train_fp, evaluated)
    if hits:
        shown = ", ".join(hits[:5]) + (f" and {len(hits) - 5} more" if len(hits) > 5 else "")
        raise ContaminationError(f"{eval_name}: {len(hits)} of {len(evaluated)} tasks appear in the training data "
                                 f"{train_name} (by id or content): {shown}; exclude them or pass --drop-overlap")


def check_model_data(lm, model_spec: str, dataset, force: bool = False) -> None:
    """Refuse to evaluate a model on tasks listed in its `training_data.json` (unless `force`)."""
    path = Path(getattr(lm.model, "name_or_path", "") or "") / "training_data.json"
    if force or not path.exists():
        return
    seen = json.loads(path.read_text())
    try:
        check(seen, dataset.tasks, f"of model {model_spec}", dataset.name)
    except ContaminationError as e:
        raise ContaminationError(str(e).replace("exclude them or pass --drop-overlap", "pass --force to evaluate anyway")) from None
