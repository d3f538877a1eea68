"""How many CPU threads torch uses, and how they wait.

The default is the number of cores this process may run on (its CPU affinity), lowered to a
container's CPU quota when there is one: `os.cpu_count()` can be the host's, and more OpenMP
threads than cores makes every small op crawl.  `--threads N` (`tta run`, `tta experiment`,
`tta pretrain`) or OMP_NUM_THREADS overrides it.

Waiting: OpenMP threads spin between parallel regions by default, which on a machine shared with
other jobs burns the cores those jobs need; `tta` asks them to sleep instead (OMP_WAIT_POLICY=
PASSIVE, unless the user set a policy).  `benchmarks/threads.py` measures both policies, alone
and with two runs side by side.
"""
from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path

_chosen: int | None = None   # set by --threads


def usable_cpus() -> int:
    """The cores this process may run on: in a container or VM `os.cpu_count()` can be the
    host's, and that many OpenMP threads on a few cores make every small CPU op crawl."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The container's CPU quota in cores (cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us`), or None."""
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def default_threads(root: Path = Path("/sys/fs/cgroup")) -> int:
    quota = cpu_quota(root)
    cores = usable_cpus()
    return max(1, min(cores, math.floor(quota))) if quota else cores


def choose_threads(n: int | None) -> None:
    """`--threads N`: every later `set_threads()` in this process uses N."""
    global _chosen
    if n is not None and n < 1:
        raise ValueError(f"--threads {n}: expected at least 1")
    _chosen = n


def threads_per_worker(workers: int) -> int:
    """Torch threads for each of `workers` processes solving tasks side by side (`--workers`):
    --threads or OMP_NUM_THREADS when given, else this process's cores shared out (at least 1)."""
    if _chosen is not None:
        return _chosen
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, default_threads() // workers)


def passive_wait() -> None:
    """Ask OpenMP threads to sleep, not spin, while they wait (unless the user chose a policy).
    Only effective before torch loads its OpenMP runtime, so the command line calls it first."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def set_threads() -> int:
    """Set torch's intra-op threads: --threads, else OMP_NUM_THREADS, else `default_threads()`."""
    import torch

    if _chosen is not None:
        torch.set_num_threads(_chosen)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(default_threads())
    return torch.get_num_threads()


def child_processes() -> set[int]:
    """This process's descendants: its child processes, theirs, and so on (Linux: each thread's
    /proc/PID/task/*/children); empty where unknown.  Descendants, not children only: a child
    that waits, idle, for a grandchild of its own (a shell running a command) hides the work."""
    found, parents = set(), [os.getpid()]
    while parents:
        children = set()
        for listing in Path(f"/proc/{parents.pop()}/task").glob("*/children"):
            try:
                children.update(int(pid) for pid in listing.read_text().split())
            except (OSError, ValueError):   # the process or thread ended in the meantime
                pass
        parents.extend(children - found)
        found |= children
    return found


def left_working(threads_before: set, children_before: set = frozenset(), window: float = 0.1) -> list[str]:
    """The Python threads and child processes started since `threads_before` and
    `children_before` that still compute: more than a tenth of `window` seconds of CPU time in the
    next `window` seconds.  Why: work a method leaves running after its task spends compute no cap
    sees, charged to whichever task runs next (the meter charges a forward in any thread to the
    task being measured) or to none: a plugin whose thread ran forwards for 3 s after `predict`
    returned had each of three tasks charged 0 FLOPs, and a child process left running shows in
    no task's `cpu_seconds` until it ends.  Idle threads and processes (a pool kept for later
    tasks, a progress bar's monitor) use no CPU and are not named.  Threads need per-thread CPU
    clocks (Linux, macOS), processes Linux's /proc; elsewhere they are not checked."""
    threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()] \
        if hasattr(time, "pthread_getcpuclockid") else []
    children = sorted(child_processes() - set(children_before))
    if not threads and not children:
        return []

    def thread_seconds(thread):
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
        except (OSError, OverflowError, TypeError):   # the thread ended in the meantime
            return None

    def process_seconds(pid):
        try:   # utime and stime, the 14th and 15th fields of /proc/PID/stat, in clock ticks
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):   # the process ended in the meantime
            return None

    work = [(t.name, thread_seconds, t) for t in threads] + [(f"process {pid}", process_seconds, pid) for pid in children]
    first = [seconds(what) for _, seconds, what in work]
    time.sleep(window)
    working = []
    for (name, seconds, what), then in zip(work, first):
        now = seconds(what)
        if then is not None and now is not None and now - then > window / 10:
            working.append(name)
    return working
