"""`--executor ray`: tasks spread over a Ray cluster, results gathered by the driver.

Each worker is a Ray actor that loads the model and the method once (adapters are reset per
task, the model is never reloaded) and asks for one GPU where the cluster has GPUs, else one
CPU.  The driver keeps every worker busy with one task at a time and hands each finished
record back to the runner, which appends it to the one `results.jsonl` -- so resuming, reports
and the Kaggle submission work exactly as with the local executor.  A worker that dies loses
only its task in flight: the worker is replaced and the task retried once, then recorded as
failed.  Ray is an optional extra: `pip install 'arc-tta[ray]'`.
"""
from __future__ import annotations

import os

from tta.method import get_method
from tta.run.record import TaskRecord
from tta.run.solve import RunError, RunSpec, TaskRunner, prepare

MAX_RETRIES = 1


def _ray():
    try:
        import ray
    except ImportError:
        raise RunError("--executor ray needs Ray: pip install 'arc-tta[ray]'") from None
    return ray


def _worker_class(ray, use_gpu: bool):
    @ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1)
    class Worker:
        def __init__(self, spec: RunSpec):
            import torch
            if not use_gpu:
                torch.set_num_threads(1)       # one CPU slot, one thread: no oversubscription
                os.environ["OMP_NUM_THREADS"] = "1"
            cls, config, dataset, _, _ = prepare(spec)
            self.runner = TaskRunner(spec, cls, config, dataset)
            self.one_off = self.runner.setup()

        def info(self):
            return self.one_off, self.runner.device

        def solve(self, task_id: str) -> TaskRecord:
            return self.runner.solve(task_id)

    return Worker


def solve_on_ray(spec: RunSpec, todo: list[str], address: str | None = None, n_workers: int | None = None):
    """(records as they finish, the one-off cost of the first worker's setup, device)."""
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    slots = gpus or int(ray.cluster_resources().get("CPU", 1))
    n_workers = max(1, min(n_workers or slots, len(todo) or 1))
    Worker = _worker_class(ray, use_gpu=gpus > 0)
    if not todo:
        return iter(()), None, "ray"
    workers = [Worker.remote(spec) for _ in range(n_workers)]
    method_name = get_method(spec.method).name   # a record names the method, not the --method text
    one_off, device = ray.get(workers[0].info.remote())
    return _gather(ray, Worker, spec, workers, todo, method_name), one_off, f"ray ({n_workers} workers, {device})"


def _gather(ray, Worker, spec, workers, todo, method_name):
    queue = list(todo)
    attempts = {task_id: 0 for task_id in todo}
    running = {}   # future -> (worker index, task id)

    def submit(index):
        if queue:
            task_id = queue.pop(0)
            attempts[task_id] += 1
            running[workers[index].solve.remote(task_id)] = (index, task_id)

    for index in range(len(workers)):
        submit(index)
    while running:
        [future], _ = ray.wait(list(running), num_returns=1)
        index, task_id = running.pop(future)
        try:
            yield ray.get(future)
        except ray.exceptions.RayActorError as e:
            workers[index] = Worker.remote(spec)          # replace the dead worker
            if attempts[task_id] <= MAX_RETRIES:
                queue.insert(0, task_id)
            else:
                yield TaskRecord.failed_task(task_id, method_name, f"worker died twice: {str(e).splitlines()[0][:200]}")
        submit(index)
    for worker in workers:
        ray.kill(worker)
