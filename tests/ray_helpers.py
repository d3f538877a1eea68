"""Methods for the worker tests, importable by Ray's and the local pool's worker processes
(tests/ is on their path): DieOnce kills its own worker process the first time it sees the task
named in TTA_TEST_DIE_ON; CachedSetup builds a one-off cache in its setup, as LESS builds its
datastore, and logs whether it built or found it; SleepForever writes its worker's pid into
TTA_TEST_PIDS and then never finishes a task, to test that an interrupted run does not wait for it;
ReportEnvironment records what its worker sees of TTA_TEST_PROBE and of the import path."""
import os
import sys
import time
from pathlib import Path

from tta.method import Method


class DieOnce(Method):
    needs_model = False

    def predict(self, task, meter, seed):
        marker = Path(os.environ["TTA_TEST_MARKER"])
        if task.id == os.environ["TTA_TEST_DIE_ON"] and not marker.exists():
            marker.write_text("died once")
            os._exit(1)      # the whole worker process goes, mid-task
        return [[p.input, None] for p in task.test], {}


class CachedSetup(Method):
    needs_model = False

    def setup(self, tasks):
        cache, log = Path(os.environ["TTA_TEST_CACHE"]), Path(os.environ["TTA_TEST_SETUP_LOG"])
        built = not cache.exists()
        if built:
            time.sleep(1.0)          # long enough for a second worker started alongside to miss it
            cache.write_text("built")
        with log.open("a") as f:
            f.write(("built" if built else "loaded") + "\n")
        return {"what": "a test cache", "flops": 0.0, "cached": not built}

    def predict(self, task, meter, seed):
        return [[p.input, None] for p in task.test], {}


class SleepForever(Method):
    needs_model = False

    def predict(self, task, meter, seed):
        (Path(os.environ["TTA_TEST_PIDS"]) / str(os.getpid())).write_text(task.id)
        time.sleep(3600)
        return [[p.input, None] for p in task.test], {}


class ReportEnvironment(Method):
    needs_model = False

    def predict(self, task, meter, seed):
        return [[p.input, None] for p in task.test], {"probe": os.environ.get("TTA_TEST_PROBE"), "path": sys.path}
