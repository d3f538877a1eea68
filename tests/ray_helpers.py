"""A method for the Ray test, importable by Ray's worker processes (tests/ is put on PYTHONPATH):
it kills its own worker process the first time it sees the task named in TTA_TEST_DIE_ON."""
import os
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
