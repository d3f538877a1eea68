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
not, set well above the cap so that no method that plans to it meets it.
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


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise `TaskTimeout` in the code inside if it runs longer than `seconds` (None: no limit)."""
    if not seconds:
        yield
        return
    if not can_limit():
        raise RuntimeError("--task-timeout needs a POSIX timer signal in the main thread; it cannot be set here")

    def stop(signum, frame):
        raise TaskTimeout(f"the task ran past its --task-timeout of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
