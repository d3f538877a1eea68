"""`--workers N` on one machine: tasks solved side by side by N worker processes.

Why: on a CPU, one task does not use many cores well.  The embedded model's matrices are small
(width 256), so a second thread buys little: `ttt_full` at 6.4e12 FLOPs on 6 arc2-new tasks took
80 s per task with `--threads 2` on 2 cores, and 10.5 minutes of CPU time over 8.1 minutes of wall
time (1.3x).  Two tasks at once, one thread each, keep both cores busy; until now that took
`--shard` and `tta merge` by hand.

How: the standard library's process pool (`concurrent.futures`). Its workers are forked from a
`forkserver`: a clean process that has imported torch, transformers and peft but run nothing (a
forked copy of a process that has run torch can hang in OpenMP, so never this one). `spawn`, used
before, imported them again in every worker, about 5 s each on this 2-core CPU, and an experiment
paid that for every cell. The server starts once per `tta` process and serves every cell's pool:
`tta experiment` of two 3-task cells (copy_input, common_output) at 2 workers took 19.3 s with
spawn and 14.3 s from the server, one host. A worker takes this process's current environment
variables and import path, as a spawned one would, not the server's from when it started. Each
worker loads the model and the method once, as the Ray workers do, with `threads` torch threads,
and runs the method's one-off setup itself. The pool starts a worker only when a task finds none
idle, and the first task handed out (`_describe`) waits for the first worker's setup: so a cache
that setup builds (LESS's gradient datastore) is built once, by the first worker, and the later
workers read it (tested in tests/test_worker_processes.py). This process keeps the run directory:
it hands out one task per idle worker and appends each record as it comes back, so resume,
`--retry-failed`, reports and the Kaggle submission work as with one process. A task's result does
not depend on which worker solves it (its seed comes from the task id), only on the thread count,
which the manifest records. A worker that dies (killed, out of memory) breaks the pool: the tasks
it held are retried once in a fresh pool, then recorded as failed. An interrupted run (Ctrl-C, or
SIGINT or SIGTERM to this process alone) ends its workers at once: the pool's own shutdown lets
each finish the task it holds, which at 8e12 FLOPs kept a stopped `tta experiment` alive for
minutes, computing results nobody would record.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from tta.method import get_method
from tta.run.record import TaskRecord
from tta.run.solve import RunError, RunSpec, TaskRunner, prepare

MAX_RETRIES = 1
MANAGER_EXIT_SECONDS = 5   # how long ending a pool (interrupted or broken) waits for its manager thread

# ---------------------------------------------------------------- inside a worker process

_runner: TaskRunner | None = None
_one_off: dict | None = None
_startup_error: BaseException | None = None


def _start_worker(spec: RunSpec, threads: int, environment: dict, import_path: list[str], run_pid: int) -> None:
    """Load the model and the method once, under the run process's environment and import path.
    An error (a model that cannot load, a contaminated dataset) is kept and raised by the first
    call, so it reaches the user as the same one-line error a one-process run gives, not as a pool
    that broke for no stated reason."""
    global _runner, _one_off, _startup_error
    _end_with_the_run(run_pid)
    os.environ.clear()
    os.environ.update(environment)
    sys.path[:] = import_path
    from tta.threads import choose_threads
    choose_threads(threads)
    try:
        cls, config, dataset, _, _ = prepare(spec)
        _runner = TaskRunner(spec, cls, config, dataset)
        _one_off = _runner.setup()
    except BaseException as e:  # noqa: BLE001  (given back to the parent by _solve)
        _startup_error = e


def _process_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie has ended: only its parent has not read its status)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):   # gone, or its number taken by another user's process
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):   # no /proc (macOS): signal 0 answered
        return True


def _end_with_the_run(run_pid: int, every_seconds: float = 1.0) -> None:
    """End this worker within `every_seconds` of the run's process ending.  A run killed outright
    (`kill -9`, the out-of-memory killer, a scheduler's hard limit) cannot stop its workers, and
    the fork server they come from outlives it too: measured, both workers of a killed icl run
    went on computing tasks nobody would record for minutes, and a resumed run shared the cores
    with them.  POSIX only: on Windows `os.kill(pid, 0)` would end the run's process."""
    if os.name != "posix":
        return

    def watch():
        while _process_alive(run_pid):
            time.sleep(every_seconds)
        os._exit(1)
    threading.Thread(target=watch, name="tta-end-with-the-run", daemon=True).start()


def _started():
    if _startup_error is not None:
        raise _startup_error
    return _runner


def _describe() -> tuple[dict | None, str]:
    return _one_off, _started().device


def _solve(task_id: str) -> TaskRecord:
    return _started().solve(task_id)


# ---------------------------------------------------------------- in the run's process

# What the fork server imports once, so that no worker imports it again.
SERVER_IMPORTS = ["tta.run.solve", "transformers.models.llama.modeling_llama", "peft"]


def _pool(spec: RunSpec, workers: int, threads: int) -> ProcessPoolExecutor:
    if "forkserver" not in multiprocessing.get_all_start_methods():   # Windows
        context = multiprocessing.get_context("spawn")
    else:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(SERVER_IMPORTS)
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_start_worker,
                               initargs=(spec, threads, _worker_environment(), list(sys.path), os.getpid()))


def _worker_environment() -> dict:
    """This process's environment, with its choice of CPU compute dtype made for every worker
    (`TTA_CPU_BF16`): a worker measuring for itself while the others load the cores could choose
    otherwise, and its tasks would round differently from its neighbours'."""
    from tta.model.loading import cpu_multiplies_bf16
    environment = dict(os.environ)
    environment.setdefault("TTA_CPU_BF16", "1" if cpu_multiplies_bf16() else "0")
    return environment


def _stop_now(pool: ProcessPoolExecutor) -> None:
    """Cancel the queued tasks and end the workers mid-task.  `shutdown(wait=False)` alone returns,
    but the interpreter's exit then waits for every worker to finish its task.  Python 3.14 has
    `terminate_workers()`; before it, the pool's process table (which `shutdown` drops, so it is
    read first) is the only handle on them.

    Then wait (a few seconds at most) for the pool's manager thread, which closes its wake-up pipe
    once it sees the workers gone. Python 3.11's exit hook writes to that pipe without the pool's
    lock, so an exit that overlaps the closing printed `OSError: [Errno 9] Bad file descriptor`
    with a traceback after the run's one-line "interrupted" (seen once in CI, in
    `test_an_interrupted_run_ends_its_workers_at_once`); after the thread has ended, the hook
    finds the pipe closed and skips it."""
    manager = getattr(pool, "_executor_manager_thread", None)
    if hasattr(pool, "terminate_workers"):
        pool.terminate_workers()
    else:
        workers = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in workers:
            if process.is_alive():
                process.terminate()
    if manager is not None:
        manager.join(timeout=MANAGER_EXIT_SECONDS)


def solve_in_processes(spec: RunSpec, todo: list[str], workers: int, threads: int):
    """(records as they finish, the one-off cost of one worker's setup, device), from `workers`
    processes (at most one per task in `todo`) of `threads` torch threads each.  Errors a worker
    meets while starting are raised here, before any task runs."""
    pool = _pool(spec, workers, threads)
    try:
        one_off, device = pool.submit(_describe).result()
    except BaseException:
        _stop_now(pool)
        raise
    method_name = get_method(spec.method).name
    return _gather(pool, spec, workers, threads, todo, method_name), one_off, device


def _gather(pool, spec, workers, threads, todo, method_name):
    queue = list(todo)
    attempts = dict.fromkeys(todo, 0)
    running = {}   # future -> task id; at most one task per worker, so a dead worker takes few along

    def fill():
        """Hand a task to each idle worker; False if the pool broke meanwhile (a worker died
        between a result and this hand-out: the task taken stays queued)."""
        while queue and len(running) < workers and stop is None:
            task_id = queue[0]
            try:
                future = pool.submit(_solve, task_id)
            except BrokenProcessPool:
                return False
            queue.pop(0)
            attempts[task_id] += 1
            running[future] = task_id
        return True

    stop = None   # a worker's RunError (its model left changed): the tasks in flight finish, no more start
    try:
        pool_ok = fill()
        while running or not pool_ok:
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED) if pool_ok else (list(running), None)
            broken = []
            for future in finished:
                task_id = running.pop(future)
                try:
                    yield future.result()
                except BrokenProcessPool:
                    broken.append(task_id)
                except RunError as e:   # the other workers' models are their own: their tasks stand
                    stop = stop or e
            if broken or not pool_ok:
                # Every task in flight fails with the pool, not only the one that killed it:
                # each gets one more try in a fresh pool.
                broken += list(running.values())
                running.clear()
                _stop_now(pool)   # its manager thread has already begun ending the other workers
                pool = _pool(spec, workers, threads)
                for task_id in reversed(broken):
                    if attempts[task_id] <= MAX_RETRIES:
                        queue.insert(0, task_id)
                    else:
                        yield TaskRecord.failed_task(task_id, method_name, "worker process died twice on this task")
            pool_ok = fill()
    except BaseException:   # interrupted, or the caller stopped reading: leave without waiting
        _stop_now(pool)
        raise
    pool.shutdown(wait=True)   # every worker idle: they exit at once
    if stop is not None:
        raise stop
