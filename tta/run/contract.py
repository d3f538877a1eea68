"""What a method hands back to the runner, checked against the plugin contract (docs/plugins.md).

A method of the user's own may return numpy scalars in its records, a torch tensor as an
attempt, or a bare grid where a pair of attempts belongs.  The first two are converted; anything
the runner cannot score or store exactly fails that task with a one-line error that says which
hook returned what, instead of a traceback from `json` or numpy that ends the whole run (or, for
a bare grid, rows scored as attempts without a word).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tta.data.tasks import MAX_SIZE, N_COLOURS
from tta.method import MethodError


def predict_result(result) -> tuple[list, dict]:
    """`predict`'s return value split into (attempts, record).  A bare list of attempts is
    refused: for a task with two test inputs it would unpack silently into the wrong parts."""
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[1], (dict, type(None)))):
        raise MethodError(f"predict returned {_kind(result)}; it must return (attempts, record), "
                          "e.g. `return [[grid, None]], {}`")
    return result[0], result[1] or {}


def checked_attempts(attempts, n_tests: int) -> list[list[np.ndarray | None]]:
    """Exactly two attempts (a grid or None) per test input, each grid int8 and within ARC's
    limits; a shorter list of attempts is padded with None."""
    if not isinstance(attempts, (list, tuple)):
        raise MethodError(f"predict's attempts are {_kind(attempts)}, not a list with one list of attempts per test input")
    if len(attempts) != n_tests:
        raise MethodError(f"method returned {len(attempts)} answers for {n_tests} test inputs")
    checked = []
    for i, pair in enumerate(attempts):
        pair = [] if pair is None else pair
        if isinstance(pair, np.ndarray) and pair.ndim == 2:
            raise MethodError(f"predict's answer for test input {i} is one grid, not a list of attempts; "
                              "return [grid, None] or [grid, second_grid]")
        if not isinstance(pair, (list, tuple)):
            raise MethodError(f"predict's answer for test input {i} is {_kind(pair)}, not a list of attempts")
        if len(pair) > 2:
            raise MethodError(f"predict gave {len(pair)} attempts for test input {i}; two are scored (pass@2)")
        pair = list(pair) + [None] * (2 - len(pair))
        checked.append([_grid(a, f"predict's test input {i}, attempt {k + 1}") for k, a in enumerate(pair)])
    return checked


def _grid(value, where: str) -> np.ndarray | None:
    if value is None:
        return None
    if hasattr(value, "detach"):   # a torch tensor, on any device
        value = value.detach().cpu().numpy()
    try:
        grid = np.asarray(value)
    except ValueError:   # numpy refuses ragged rows
        raise MethodError(f"{where}: ragged rows, not a grid") from None
    if grid.ndim != 2 or grid.size == 0:
        hint = " (a bare grid where a list of attempts [grid, None] belongs?)" if grid.ndim == 1 else ""
        raise MethodError(f"{where}: an array of shape {grid.shape}, not a 2-D grid{hint}")
    if max(grid.shape) > MAX_SIZE:
        raise MethodError(f"{where}: shape {grid.shape}, more than {MAX_SIZE} cells a side")
    if grid.dtype.kind not in "iuf" or (grid.dtype.kind == "f" and not np.all(grid == np.round(grid))):
        raise MethodError(f"{where}: cells of type {grid.dtype}, not integers")
    bad = np.argwhere((grid < 0) | (grid >= N_COLOURS))
    if len(bad):
        r, c = bad[0]
        raise MethodError(f"{where}: cell ({r},{c}) is {grid[r, c]}, outside the colours 0-{N_COLOURS - 1}")
    return grid.astype(np.int8)


def json_record(value, where: str):
    """A method's record (setup, adapt or predict) as plain JSON values: numpy scalars and arrays,
    torch tensors, tuples and paths are converted; anything else is refused, naming the key."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MethodError(f"{where} is {_kind(value)}, not a dict (or None)")
    return _plain(value, where)


def _plain(value, where: str):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k.item() if isinstance(k, np.generic) else k): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if hasattr(value, "detach") and hasattr(value, "tolist"):   # a torch tensor
        return value.detach().cpu().tolist()
    if isinstance(value, Path):
        return str(value)
    raise MethodError(f"{where} holds {_kind(value)}, which a JSON record cannot store")


def _kind(value) -> str:
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
