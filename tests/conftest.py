"""Shared fixtures: a tiny randomly initialised model and small hand-made tasks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tta.model.loading import load_model
from tta.data.tasks import Pair, Task


@pytest.fixture(scope="session")
def tiny():
    torch.set_num_threads(2)
    return load_model("random:tiny", device="cpu")


@pytest.fixture()
def cpu_bf16(monkeypatch):
    """The CPU treated as one that multiplies bf16 natively (autocast on), whatever this host is:
    for tests of the bf16 code paths, which a host without AMX or AVX512-BF16 would not take."""
    import tta.model.loading as loading
    monkeypatch.setattr(loading, "cpu_multiplies_bf16", lambda: True)


def grid(rows):
    return np.array(rows, dtype=np.int8)


def flip_task(task_id="flip", n_train=3, size=3, seed=0) -> Task:
    """A task whose rule is a left-right mirror."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n_train + 1):
        g = rng.integers(0, 10, size=(size, size)).astype(np.int8)
        pairs.append(Pair(g, g[:, ::-1].copy()))
    return Task(task_id, tuple(pairs[:n_train]), (pairs[n_train],))


def write_task(path, task_dict):
    path.write_text(json.dumps(task_dict))
    return path


GOOD = {"train": [{"input": [[1, 2], [3, 4]], "output": [[2, 1], [4, 3]]},
                  {"input": [[5, 0], [0, 5]], "output": [[0, 5], [5, 0]]}],
        "test": [{"input": [[7, 8], [9, 0]], "output": [[8, 7], [0, 9]]}]}
