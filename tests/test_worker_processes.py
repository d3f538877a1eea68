"""`--workers N`: tasks solved side by side by local worker processes give the one-process
results, one record per task; a worker killed mid-task loses only that task; a worker that
cannot start stops the run with the one-line error a one-process run gives; an interrupted run
ends its workers at once."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from tta.cli import main
from tta.data.datasets import load_dataset
from tta.run.runner import RunSpec, read_results, run

IDS = load_dataset("gen-eval").ids[:4]
TINY_ICL = dict(method="icl", dataset="gen-eval", limit=4, model="random:tiny", seed=3,
                overrides=['transforms=["identity","rot90"]', "orders=1"])


def outcome(out):
    return sorted((r["task_id"], r["attempts"], r["correct"], r["metrics"].get("nll"))
                  for r in read_results(out / "results.jsonl"))


def test_two_workers_give_the_one_process_results(tmp_path):
    one = run(RunSpec(**TINY_ICL, out=tmp_path / "one"), progress=False)
    two = run(RunSpec(**TINY_ICL, out=tmp_path / "two"), progress=False, workers=2)
    assert len(outcome(one)) == 4 and outcome(two) == outcome(one)
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["workers"] == 2 and manifest["threads"] >= 1 and "2 worker processes" in manifest["device"]
    # Nothing left to do: a rerun with workers resumes without redoing or duplicating a task.
    run(RunSpec(**TINY_ICL, out=tmp_path / "two"), progress=False, workers=2)
    assert sorted(r["task_id"] for r in read_results(two / "results.jsonl")) == sorted(IDS)


def test_a_worker_killed_mid_task_loses_only_that_task(tmp_path, monkeypatch):
    # tests/ is on sys.path here, and spawned workers start with the parent's sys.path.
    marker = tmp_path / "died"
    monkeypatch.setenv("TTA_TEST_DIE_ON", IDS[1])
    monkeypatch.setenv("TTA_TEST_MARKER", str(marker))
    out = run(RunSpec(method="ray_helpers:DieOnce", dataset="gen-eval", limit=4, out=tmp_path / "die"),
              progress=False, workers=2)
    records = read_results(out / "results.jsonl")
    assert marker.exists()                                        # a worker really died on IDS[1]
    assert sorted(r["task_id"] for r in records) == sorted(IDS)   # every task is there, once
    assert all(r["error"] is None for r in records)               # the killed one was retried


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" not in status.read_text()    # a zombie has ended; only its parent can reap it
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def two_workers_sleeping_in_tasks(tmp_path):
    """A run of `--workers 2` whose two workers sleep in their tasks: (the run's process, the
    workers' pids).  Afterwards no worker is left sleeping, whatever the test found."""
    pids = tmp_path / "pids"
    pids.mkdir()
    tests_dir = str(Path(__file__).parent)
    env = dict(os.environ, TTA_TEST_PIDS=str(pids),
               PYTHONPATH=os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-c", "from tta.cli import main; main()", "run", "--method",
               "ray_helpers:SleepForever", "--dataset", "gen-eval", "--limit", "4", "--workers", "2",
               "--quiet", "--out", str(tmp_path / "r")]
    run_process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while len(list(pids.iterdir())) < 2:
            assert run_process.poll() is None, run_process.communicate()
            assert time.monotonic() < deadline, "the two workers never started their tasks"
            time.sleep(0.2)
        yield run_process, [int(p.name) for p in pids.iterdir()]
    finally:
        run_process.kill()
        for pid in [int(p.name) for p in pids.iterdir()]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def ended_within(seconds: float, pids: list[int]) -> bool:
    deadline = time.monotonic() + seconds
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not any(_alive(pid) for pid in pids)


def test_an_interrupted_run_ends_its_workers_at_once(tmp_path):
    # SIGTERM to the run's process alone (as `kill` or a batch scheduler sends it) stops it as
    # Ctrl-C does (SIGINT takes the same path from KeyboardInterrupt on): the pool's own shutdown
    # would wait for both workers to finish tasks that never end.
    with two_workers_sleeping_in_tasks(tmp_path) as (run_process, workers):
        run_process.send_signal(signal.SIGTERM)
        _, stderr = run_process.communicate(timeout=30)
        assert run_process.returncode == 130 and "error: interrupted" in stderr and "Traceback" not in stderr
        assert ended_within(10, workers)
    assert not (tmp_path / "r" / "results.jsonl").exists() or not read_results(tmp_path / "r" / "results.jsonl")


def test_workers_of_a_run_killed_outright_end_with_it(tmp_path):
    # SIGKILL (kill -9, the out-of-memory killer) gives the run no chance to stop its workers,
    # and the fork server outlives it: without a watch on the run's process, both workers slept
    # on in their tasks (and a real method's workers computed on, beside a resumed run).
    with two_workers_sleeping_in_tasks(tmp_path) as (run_process, workers):
        run_process.kill()
        run_process.wait(timeout=30)   # not communicate(): live workers hold its pipes open
        assert ended_within(10, workers)


def test_stopping_a_pool_mid_task_returns_after_its_manager_thread_has_closed_the_wake_up_pipe():
    # Python 3.11's exit hook writes to the manager thread's wake-up pipe without the pool's lock;
    # if the thread closes the pipe meanwhile, the interrupted run printed a traceback after its
    # one line (seen in CI). `_stop_now` must return only once that closing is over.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from tta.run.worker_processes import _stop_now
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    pool.submit(time.sleep, 0).result()   # the worker is up
    pool.submit(time.sleep, 60)
    time.sleep(0.5)                        # ... and sleeping in its task
    manager, wake_up = pool._executor_manager_thread, pool._executor_manager_thread_wakeup
    started = time.monotonic()
    _stop_now(pool)
    assert not manager.is_alive() and wake_up._closed
    assert time.monotonic() - started < 10


def test_a_one_off_cache_is_built_by_one_worker_and_read_by_the_others(tmp_path, monkeypatch):
    # LESS builds its gradient datastore in setup: with two workers it must be built once, and the
    # manifest must say this run built it.
    log = tmp_path / "setups.log"
    monkeypatch.setenv("TTA_TEST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TTA_TEST_SETUP_LOG", str(log))
    out = run(RunSpec(method="ray_helpers:CachedSetup", dataset="gen-eval", limit=4, out=tmp_path / "r"),
              progress=False, workers=2)
    setups = log.read_text().split()
    assert setups.count("built") == 1 and len(setups) == 2      # both workers set up, one built
    assert json.loads((out / "manifest.json").read_text())["one_off"]["cached"] is False
    assert len(read_results(out / "results.jsonl")) == 4


def test_a_worker_that_cannot_start_gives_the_one_line_error(tmp_path):
    # The embedded model was trained on ARC-AGI-1 training tasks: the contamination guard, which
    # runs where the model loads (in the worker), refuses them.
    result = CliRunner().invoke(main, ["run", "--method", "icl", "--dataset", "arc1-train", "--limit", "2",
                                       "--workers", "2", "--quiet", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and "Traceback" not in result.output
    assert "training data of model default" in result.output
    assert not (tmp_path / "r" / "results.jsonl").exists()


def test_experiment_passes_workers_to_every_cell(tmp_path):
    plan = tmp_path / "two.toml"
    plan.write_text('name = "two"\ndataset = "gen-eval"\nlimit = 3\nbudgets = [1e10]\nbaseline = "copy_input"\n'
                    '[methods.copy_input]\n[methods.common_output]\n')
    result = CliRunner().invoke(main, ["experiment", str(plan), "--runs", str(tmp_path / "runs"), "--reports",
                                       str(tmp_path / "reports"), "--workers", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    for cell in (tmp_path / "runs" / "two").iterdir():
        assert json.loads((cell / "manifest.json").read_text())["workers"] == 2
        assert len(read_results(cell / "results.jsonl")) == 3


def test_workers_share_the_cores_unless_threads_are_given(monkeypatch):
    from tta import threads
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "default_threads", lambda: 8)
    assert [threads.threads_per_worker(n) for n in (1, 2, 3, 16)] == [8, 4, 2, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.threads_per_worker(2) == 3
    try:
        threads.choose_threads(2)
        assert threads.threads_per_worker(4) == 2      # --threads is per worker
    finally:
        threads.choose_threads(None)


def test_workers_see_the_environment_and_import_path_of_their_run_not_of_an_earlier_one(tmp_path, monkeypatch):
    # Workers fork from a server started once per process: without handing them the run's own
    # environment and path, the second run's workers would see the first run's.
    for value in ("first", "second"):
        monkeypatch.setenv("TTA_TEST_PROBE", value)
        monkeypatch.syspath_prepend(str(tmp_path / value))
        out = run(RunSpec(method="ray_helpers:ReportEnvironment", dataset="gen-eval", limit=2, out=tmp_path / value),
                  progress=False, workers=2)
        seen = [r["extra"]["predict"] for r in read_results(out / "results.jsonl")]
        assert len(seen) == 2 and all(s["probe"] == value and str(tmp_path / value) in s["path"] for s in seen)


def test_a_pool_that_breaks_between_a_result_and_the_next_hand_out_retries_the_tasks_left(monkeypatch):
    # A worker can die after the results in hand were read and before the next task is handed
    # out: the hand-out itself then fails, and must lead to a fresh pool, not a crashed run.
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool
    from tta.run import worker_processes

    class Pool:
        def __init__(self, breaks_at_submission=None):
            self.submitted, self.breaks_at = 0, breaks_at_submission

        def submit(self, fn, task_id):
            self.submitted += 1
            if self.breaks_at is not None and self.submitted >= self.breaks_at:
                raise BrokenProcessPool("a worker died")
            future = Future()
            future.set_result(task_id)
            return future

        def shutdown(self, wait=True, cancel_futures=False):
            pass

    monkeypatch.setattr(worker_processes, "_pool", lambda spec, workers, threads: Pool())
    done = list(worker_processes._gather(Pool(breaks_at_submission=3), None, 2, 1, ["a", "b", "c", "d"], "m"))
    assert sorted(done) == ["a", "b", "c", "d"]


def test_workers_take_this_processs_choice_of_cpu_dtype(monkeypatch):
    """Fails if each worker measures bf16 for itself: under load two workers could choose
    differently and round their tasks differently."""
    import tta.model.loading as loading
    from tta.run.worker_processes import _worker_environment
    monkeypatch.delenv("TTA_CPU_BF16", raising=False)
    for choice, setting in ((True, "1"), (False, "0")):
        monkeypatch.setattr(loading, "cpu_multiplies_bf16", lambda: choice)
        assert _worker_environment()["TTA_CPU_BF16"] == setting
    monkeypatch.setenv("TTA_CPU_BF16", "1")   # a user's own setting is passed on as it is
    assert _worker_environment()["TTA_CPU_BF16"] == "1"
