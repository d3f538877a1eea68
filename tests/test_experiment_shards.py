import json
import re
import shutil

import pytest

from tta.experiment import run_experiment
from tta.run.runner import RunError, RunSpec, merge, read_results, run


def test_experiment_runs_every_cell_resumes_and_reports(tmp_path):
    plan = tmp_path / "tiny.toml"
    plan.write_text('name = "tiny"\ndataset = "gen-eval"\nlimit = 4\nbudgets = ["none", 1e9]\nseeds = [0, 1]\n'
                    'baseline = "copy_input"\n[methods.copy_input]\n[methods.common_output]\n')
    report = run_experiment(plan, tmp_path / "runs", tmp_path / "reports", progress=False, log=lambda _: None)
    cells = sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir())
    assert cells == sorted(f"{m}-{b}-seed{s}" for m in ("copy_input", "common_output")
                           for b in ("uncapped", "f1e09") for s in (0, 1))
    text = report.read_text()
    assert "common_output-f1e09-seed1" in text
    # a sweep's budgets are its design, not a mismatch: named once each, with how many runs have each
    assert "## Budgets" in text and "not strictly comparable" not in text
    assert "runs differ in budget: 1e+09 FLOPs (4 runs), no cap (4 runs)" in text
    first = (tmp_path / "runs" / "tiny" / "copy_input-uncapped-seed0" / "results.jsonl").read_text()
    run_experiment(plan, tmp_path / "runs", tmp_path / "reports", progress=False, log=lambda _: None)
    assert (tmp_path / "runs" / "tiny" / "copy_input-uncapped-seed0" / "results.jsonl").read_text() == first


def test_experiment_over_cells_of_another_plan_names_the_runs_option(tmp_path):
    plan = tmp_path / "tiny.toml"
    plan.write_text('name = "tiny"\ndataset = "gen-eval"\nlimit = 3\n[methods.copy_input]\n')
    run_experiment(plan, tmp_path / "runs", tmp_path / "reports", progress=False, log=lambda _: None)
    plan.write_text('name = "tiny"\ndataset = "gen-eval"\nlimit = 4\n[methods.copy_input]\n')
    with pytest.raises(RunError, match=r"copy_input-f5e11-seed0: holds a run with a different task_ids; "
                                       r"run the experiment with another --runs"):
        run_experiment(plan, tmp_path / "runs", tmp_path / "reports", progress=False, log=lambda _: None)


def test_bad_experiment_files(tmp_path):
    (tmp_path / "a.toml").write_text("name = [")
    with pytest.raises(RunError, match="not valid TOML"):
        run_experiment(tmp_path / "a.toml", tmp_path, tmp_path)
    (tmp_path / "b.toml").write_text('dataset = "gen-eval"')
    with pytest.raises(RunError, match="no \\[methods.NAME\\]"):
        run_experiment(tmp_path / "b.toml", tmp_path, tmp_path)
    (tmp_path / "c.toml").write_text('dataset = "gen-eval"\nsampel = 4\n[methods.icl]\n')
    with pytest.raises(RunError, match="c.toml: unknown key 'sampel'"):
        run_experiment(tmp_path / "c.toml", tmp_path, tmp_path)
    (tmp_path / "d.toml").write_text('dataset = "gen-eval"\ntask_timeout = "soon"\n[methods.icl]\n')
    with pytest.raises(RunError, match="d.toml: task_timeout must be a positive number of seconds, not 'soon'"):
        run_experiment(tmp_path / "d.toml", tmp_path, tmp_path)


@pytest.mark.parametrize("line, says", [
    ("budget_seconds = [-1]", 'budget_seconds must be positive numbers of seconds or "none", not -1'),
    ('budget_seconds = ["soon"]', "budget_seconds must be positive numbers of seconds or \"none\", not 'soon'"),
    ("budgets = [0]", 'budgets must be positive numbers of FLOPs or "none", not 0'),
    ("budgets = 1e12", "budgets must be a list, e.g. budgets = [1e12], not 1000000000000.0"),
    ("budgets = [1e12]\nbudget_seconds = [30]", "budgets (FLOPs) and budget_seconds are two kinds of cap"),
    ('seeds = "0"', "seeds must be a list of whole numbers, e.g. seeds = [0, 1], not '0'"),
    ('limit = "5"', "limit must be a whole number of tasks, at least 1, not '5'"),
    ('tasks = "00576224"', "tasks must be a list of task ids"),
    ("model = 3", "model must be a string, not 3"),
    ('baseline = "icll"', "baseline 'icll' is none of the plan's methods (copy_input)"),
])
def test_a_plan_value_of_the_wrong_kind_is_one_line_before_any_cell_runs(tmp_path, line, says):
    """Fails if a bad value reaches the cells: `budget_seconds = [-1]` ran every cell with each
    task refused at once, and a plan giving both kinds of cap silently dropped its FLOPs."""
    plan = tmp_path / "p.toml"
    plan.write_text(f'dataset = "gen-eval"\n{line}\n[methods.copy_input]\n')
    with pytest.raises(RunError, match=re.escape(f"{plan}: {says}")):
        run_experiment(plan, tmp_path / "runs", tmp_path)
    assert not (tmp_path / "runs").exists()


def test_an_experiments_task_timeout_reaches_every_cell(tmp_path):
    plan = tmp_path / "t.toml"
    plan.write_text('name = "t"\ndataset = "gen-eval"\nlimit = 2\ntask_timeout = 30\n[methods.copy_input]\n')
    run_experiment(plan, tmp_path / "runs", tmp_path / "reports", progress=False, log=lambda _: None)
    manifest = json.loads((tmp_path / "runs" / "t" / "copy_input-f5e11-seed0" / "manifest.json").read_text())
    assert manifest["task_timeout"] == 30


def stable(record):
    """A record without what varies between two identical runs (wall time, memory)."""
    if isinstance(record, dict):
        return {k: stable(v) for k, v in record.items() if "seconds" not in k and k != "peak_memory_mb"}
    if isinstance(record, list):
        return [stable(v) for v in record]
    return record


def copy_run(src, dst, results=None, **manifest):
    """A copy of a run directory, with other results lines and/or manifest fields."""
    shutil.copytree(src, dst)
    if results is not None:
        (dst / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    if manifest:
        data = json.loads((dst / "manifest.json").read_text())
        (dst / "manifest.json").write_text(json.dumps({**data, **manifest}))
    return dst


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    common = dict(method="icl", dataset="gen-eval", limit=5, model="random:tiny",
                  overrides=['transforms=["identity"]', "orders=1"])
    whole = run(RunSpec(**common, out=tmp / "whole"), progress=False)
    shards = [run(RunSpec(**common, shard=(i, 2), out=tmp / f"s{i}"), progress=False) for i in range(2)]
    return tmp, whole, shards


def test_sharded_runs_merged_equal_the_unsharded_run(sharded):
    tmp, whole, shards = sharded
    manifest = lambda d: json.loads((d / "manifest.json").read_text())
    ids = manifest(whole)["task_ids"]
    assert len(ids) == 5
    # Shard i runs every 2nd task from the i-th: disjoint, and together the whole run's tasks.
    assert [manifest(s)["task_ids"] for s in shards] == [ids[0::2], ids[1::2]]
    assert [[r["task_id"] for r in read_results(s / "results.jsonl")] for s in shards] == [ids[0::2], ids[1::2]]
    merged = merge(shards, tmp / "merged")
    assert manifest(merged)["task_ids"] == ids and "shard" not in manifest(merged)
    assert manifest(merged)["config_hash"] == manifest(whole)["config_hash"]
    assert manifest(merged)["merged_from"] == [str(s) for s in shards]
    # Record for record, per task id, the merged run is the unsharded one (timings aside), in id order.
    merged_records = read_results(merged / "results.jsonl")
    assert [r["task_id"] for r in merged_records] == ids
    assert {r["task_id"]: stable(r) for r in merged_records} == \
        {r["task_id"]: stable(r) for r in read_results(whole / "results.jsonl")}
    assert json.loads((merged / "submission.json").read_text()) == json.loads((whole / "submission.json").read_text())
    with pytest.raises(RunError, match="already holds results"):
        merge(shards, merged)


def test_merge_refuses_overlapping_incomplete_mismatched_or_missing_shards(sharded):
    tmp, whole, shards = sharded
    first, second = (read_results(s / "results.jsonl") for s in shards)
    with pytest.raises(RunError, match="shards overlap"):
        merge([shards[0], shards[0]], tmp / "twice")
    # A task that both shards hold (here: shard 1 also holds shard 0's first task).
    overlapping = copy_run(shards[1], tmp / "overlap", results=second + first[:1])
    with pytest.raises(RunError, match=f"task {first[0]['task_id']} is also in .*shards overlap"):
        merge([shards[0], overlapping], tmp / "m1")
    # A shard that has not finished: its manifest lists a task with no result yet.
    unfinished = copy_run(shards[1], tmp / "unfinished", results=second[:-1])
    with pytest.raises(RunError, match=f"1 tasks have no result yet \\({second[-1]['task_id']}\\)"):
        merge([shards[0], unfinished], tmp / "m2")
    with pytest.raises(RunError, match="differs from .* in seed"):
        merge([shards[0], copy_run(shards[1], tmp / "seed1", seed=1)], tmp / "m3")
    with pytest.raises(RunError, match="not shards 0..n-1"):
        merge([shards[1]], tmp / "half")
    with pytest.raises(RunError, match="not shards 0..n-1"):
        merge([shards[0], copy_run(shards[1], tmp / "of3", shard=[1, 3])], tmp / "m4")
    for refused in ("m1", "m2", "m3", "m4", "half", "twice"):
        assert not (tmp / refused / "results.jsonl").exists()


def test_gpu_benchmark_smoke_runs_on_the_cpu_at_tiny_size():
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).parent.parent / "benchmarks" / "gpu_ttt.py"
    out = subprocess.run([sys.executable, str(script), "--size", "tiny", "--steps", "3"], capture_output=True,
                         text=True, timeout=300, env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "MFU" in out.stdout and "TTT: 3 steps" in out.stdout


def test_an_experiment_passes_over_a_cell_another_process_writes_and_takes_it_up_last(tmp_path):
    """Fails if an experiment stops at (or writes into) a cell another process holds, if it does
    not come back to that cell once the other process lets go, or if it then redoes the tasks the
    other process wrote."""
    import threading

    from tta.budget import Budget
    from tta.run.runner import DirectoryClaim

    plan = tmp_path / "shared.toml"
    plan.write_text('name = "shared"\ndataset = "gen-eval"\nlimit = 2\nbudgets = [1e9]\n'
                    'baseline = "copy_input"\n[methods.copy_input]\n[methods.common_output]\n')
    held = tmp_path / "runs" / "shared" / "copy_input-f1e09-seed0"
    run(RunSpec(method="copy_input", dataset="gen-eval", limit=2, budget=Budget(flops=1e9), out=held, command="tta run OTHER"),
        progress=False)   # the other process's work, finished
    written = (held / "results.jsonl").read_text()
    other = DirectoryClaim(held)
    other.take()   # ... and it still holds the directory

    lines = []

    def log(line):
        lines.append(line)
        if "waiting for the other process" in line:
            threading.Timer(0.3, other.release).start()

    report = run_experiment(plan, tmp_path / "runs", tmp_path / "reports", progress=False, log=log)
    headers = [line for line in lines if line.startswith("==")]
    assert [h.split("/")[-1].split(" ")[0] for h in headers] == [
        "copy_input-f1e09-seed0", "common_output-f1e09-seed0", "copy_input-f1e09-seed0"]
    assert any("busy, coming back to it last" in line for line in lines)
    assert (held / "results.jsonl").read_text() == written   # nothing redone or duplicated
    manifest = json.loads((held / "manifest.json").read_text())
    assert manifest["command"] == "tta run OTHER" and "resumed" not in manifest
    assert "copy_input-f1e09-seed0" in report.read_text() and "common_output-f1e09-seed0" in report.read_text()


VARIANT_METHOD = '''
from dataclasses import dataclass
import numpy as np
from tta.method import Method

@dataclass
class Settings:
    answer: str = "copy"

class Answer(Method):
    Config = Settings
    def predict(self, task, budget, seed):
        grid = lambda p: p.input if self.config.answer == "copy" else np.zeros_like(p.input)
        return [[grid(p), None] for p in task.test], {}
'''


def test_an_experiment_runs_variants_of_one_method_under_their_own_labels(tmp_path):
    from conftest import write_task
    (tmp_path / "answer.py").write_text(VARIANT_METHOD)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, out in (("same", [[1, 2]]), ("zero", [[0, 0]])):   # copying the input solves "same" only
        write_task(tasks / f"{name}.json", {"train": [{"input": [[1, 2]], "output": out}],
                                            "test": [{"input": [[1, 2]], "output": out}]})
    plan = tmp_path / "variants.toml"
    method = f"{tmp_path / 'answer.py'}:Answer"
    plan.write_text(f'name = "v"\ndataset = "{tasks}"\nbudgets = [1e9]\nbaseline = "copying"\n'
                    f'[methods.copying]\nmethod = "{method}"\n'
                    f'[methods.zeros]\nmethod = "{method}"\nanswer = "zeros"\n[methods.copy_input]\n')
    report = run_experiment(plan, tmp_path / "runs", tmp_path / "reports", progress=False, log=lambda _: None)
    root = tmp_path / "runs" / "v"
    assert sorted(p.name for p in root.iterdir()) == ["copy_input-f1e09-seed0", "copying-f1e09-seed0", "zeros-f1e09-seed0"]
    solved = {p.name: [r["task_id"] for r in read_results(p / "results.jsonl") if r["score"] == 1] for p in root.iterdir()}
    assert solved == {"copying-f1e09-seed0": ["same"], "zeros-f1e09-seed0": ["zero"], "copy_input-f1e09-seed0": ["same"]}
    manifests = {p.name: json.loads((p / "manifest.json").read_text()) for p in root.iterdir()}
    assert manifests["zeros-f1e09-seed0"]["label"] == "zeros" and manifests["zeros-f1e09-seed0"]["method"] == "Answer"
    assert "label" not in manifests["copy_input-f1e09-seed0"]   # a plain method table: as before
    text = report.read_text()
    assert "baseline: method `copying`" in text and "| zeros-f1e09-seed0 | zeros |" in text
    assert "Answer (as zeros)" in text
    from tta.reporting.report import write_run_report
    assert "- Method: Answer (as zeros)" in write_run_report(root / "zeros-f1e09-seed0", tmp_path / "one.md")

    plan.write_text(f'dataset = "{tasks}"\n[methods."bad/label"]\nmethod = "copy_input"\n')
    with pytest.raises(RunError, match=r"\[methods.bad/label\]: label 'bad/label': use letters"):
        run_experiment(plan, tmp_path / "runs", tmp_path / "reports", progress=False, log=lambda _: None)
    plan.write_text(f'dataset = "{tasks}"\n[methods.x]\nmethod = 3\n')
    with pytest.raises(RunError, match=r"\[methods.x\]: method must be a method's name, not 3"):
        run_experiment(plan, tmp_path / "runs", tmp_path / "reports", progress=False, log=lambda _: None)


def test_a_run_label_is_kept_on_resume_and_another_label_is_refused(tmp_path):
    spec = dict(method="copy_input", dataset="gen-eval", limit=2, out=tmp_path / "r")
    run(RunSpec(**spec, label="floor"), progress=False, log=lambda _: None)
    run(RunSpec(**spec), progress=False, log=lambda _: None)   # a resume without --label keeps it
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["label"] == "floor"
    with pytest.raises(RunError, match="holds a run with a different label"):
        run(RunSpec(**spec, label="other"), progress=False, log=lambda _: None)


def test_a_cell_whose_method_cannot_run_stops_alone_and_the_grid_goes_on(tmp_path):
    """One method's setup failing is that method's problem.  Fails if the experiment stops there
    (the plan's later cells never ran), if it then ends without an error, or if its report
    leaves the stopped cell out without saying so."""
    (tmp_path / "broken.py").write_text(
        "from tta.method import Method\n\nclass Broken(Method):\n    needs_model = False\n\n"
        "    def setup(self, tasks):\n        raise RuntimeError('no data store here')\n")
    plan = tmp_path / "grid.toml"
    plan.write_text(f'name = "g"\ndataset = "gen-eval"\nlimit = 2\nbudgets = [1e9]\n'
                    f'[methods.broken]\nmethod = "{tmp_path / "broken.py"}:Broken"\n[methods.copy_input]\n')
    with pytest.raises(RunError, match=r"1 of 2 cells stopped, first \S+broken-f1e09-seed0: method Broken: setup "
                                       r"failed: RuntimeError: no data store here; the report \S+g.md covers"):
        run_experiment(plan, tmp_path / "runs", tmp_path / "reports", progress=False, log=lambda _: None)
    assert len(read_results(tmp_path / "runs" / "g" / "copy_input-f1e09-seed0" / "results.jsonl")) == 2
    text = (tmp_path / "reports" / "g.md").read_text()
    assert re.search(r"## Runs missing from this report\n\n.*\n\n- `\S+broken-f1e09-seed0`: method Broken: setup failed", text)
