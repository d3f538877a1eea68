"""`--executor ray` on a local 2-CPU Ray cluster gives the local executor's results, and a worker
killed mid-task loses only that task, which is retried."""
import os
from pathlib import Path

import pytest
import ray

from tta.run.runner import RunSpec, read_results, run
from tta.data.datasets import load_dataset

TESTS = str(Path(__file__).parent)
IDS = load_dataset("gen-eval").ids[:4]


@pytest.fixture(scope="module")
def marker(tmp_path_factory):
    # Ray's workers inherit the environment the cluster started with, so set it all first.
    marker = tmp_path_factory.mktemp("ray") / "died"
    os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])),
                      TTA_TEST_DIE_ON=IDS[1], TTA_TEST_MARKER=str(marker))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield marker
    ray.shutdown()


def outcome(out):
    return sorted((r["task_id"], r["attempts"], r["correct"], r["metrics"].get("nll"))
                  for r in read_results(out / "results.jsonl"))


def test_ray_gives_the_local_results(marker, tmp_path):
    common = dict(method="icl", dataset="gen-eval", limit=4, model="random:tiny", seed=3,
                  overrides=['transforms=["identity","rot90"]', "orders=1"])
    local = run(RunSpec(**common, out=tmp_path / "local"), progress=False)
    distributed = run(RunSpec(**common, out=tmp_path / "ray"), progress=False, executor="ray")
    assert len(outcome(local)) == 4 and outcome(distributed) == outcome(local)


def test_a_worker_killed_mid_task_loses_only_that_task(marker, tmp_path):
    out = run(RunSpec(method="ray_helpers:DieOnce", dataset="gen-eval", limit=4, out=tmp_path / "die"),
              progress=False, executor="ray")
    records = read_results(out / "results.jsonl")
    assert marker.exists()                                        # a worker really died on IDS[1]
    assert sorted(r["task_id"] for r in records) == sorted(IDS)   # every task is there, once
    assert all(r["error"] is None for r in records)               # the killed one was retried
