"""How many CPU threads torch uses."""
from __future__ import annotations

import os

import torch


def usable_cpus() -> int:
    """The cores this process may run on: in a container or VM `os.cpu_count()` can be the
    host's, and that many OpenMP threads on a few cores make every small CPU op crawl."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_threads() -> None:
    """Use every usable core for intra-op parallelism unless the user set a number."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(usable_cpus())
