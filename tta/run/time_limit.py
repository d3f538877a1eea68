"""A wall-clock limit per task (`tta run --task-timeout SECONDS`).

A method that hangs, or runs far past a seconds cap it does not ask about, would hold the whole
run.  The limit is a timer signal (POSIX `setitimer`): when it fires, `TaskTimeout` is raised in
the task's own code, the task is recorded as failed with one line, and the run goes on.  It
stops Python code between operations; a single long torch operation finishes first, and a hang
inside native code (a deadlock in a C library) is not interrupted.  Signals reach only a
process's main thread, which is where tasks run in this process and in `--workers` processes;
elsewhere (a Ray actor's thread, Windows) the limit cannot be set and `time_limit` says so.

Why not a seconds cap enforced the same way: a seconds cap is the budget a method plans its work
to (and `can_afford` answers it); the timeout is the harness's guard against a method that does
not, set well above the cap so that no method that plans to it meets it.  So a run with a seconds
cap and no `--task-timeout` gets one by default (`task_limit`): twice the cap plus a minute.
Without it, a method that never asks ran on for as long as it liked (a plugin looping over model
forwards under `--budget-seconds 3` was still running after 10 minutes), and the seconds cap that
the comparison promises would hold only for methods that ask.  A built-in method stops asking
for work once its cap is spent and overruns it by the unit of work in flight at most.
"""
from __future__ import annotations

import contextlib
import signal
import threading


class TaskTimeout(BaseException):
    """A task that ran past its wall-clock limit, raised inside it by the timer.  A BaseException,
    so that a method's own `except Exception` cannot swallow it and carry on."""


def can_limit() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


GUARD_FACTOR, GUARD_SLACK_SECONDS = 2, 60   # a seconds cap's default limit: twice the cap plus a minute


def task_limit(task_timeout: float | None, seconds_cap: float | None) -> tuple[float | None, str]:
    """The wall seconds a task may run (None: no limit) and how its error names the limit: the
    `--task-timeout` given, else under a seconds cap twice the cap plus 60 s, where a timer can
    be set (not in a Ray actor's thread)."""
    if task_timeout:
        return task_timeout, f"--task-timeout of {task_timeout:g} s"
    if seconds_cap and can_limit():
        limit = GUARD_FACTOR * seconds_cap + GUARD_SLACK_SECONDS
        return limit, (f"time limit of {limit:g} s ({GUARD_FACTOR:g} x its {seconds_cap:g}-s cap + "
                       f"{GUARD_SLACK_SECONDS:g} s, the default without --task-timeout)")
    return None, ""


@contextlib.contextmanager
def time_limit(seconds: float | None, name: str | None = None):
    """Raise `TaskTimeout` in the code inside if it runs longer than `seconds` (None: no limit);
    its message names the limit as `name` says (see `task_limit`; default: a `--task-timeout`)."""
    if not seconds:
        yield
        return
    if not can_limit():
        raise RuntimeError("--task-timeout needs a POSIX timer signal in the main thread; it cannot be set here")

    def stop(signum, frame):
        raise TaskTimeout(f"the task ran past its {name or f'--task-timeout of {seconds:g} s'}")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
