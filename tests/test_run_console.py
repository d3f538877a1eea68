"""What `tta run` tells its user: the default budget, a header before work starts, each failure
as it happens, a per-task table at the end, and `--retry-failed`."""
import json
import re

import pytest
from click.testing import CliRunner

from tta.budget import DEFAULT_FLOPS
from tta.cli import main
from tta.experiment import run_experiment
from tta.reporting.report import load_runs
from tta.run.runner import RunError, read_results
from conftest import GOOD, write_task

# A plugin whose task "explode" raises while a file named BROKEN sits beside it, and that says on
# stderr when it predicts (so the test can see what was printed before work started).
PLUGIN = '''
import sys
from pathlib import Path
from tta.method import Method, register

@register("console_probe")
class Probe(Method):
    needs_model = False
    def predict(self, task, budget, seed):
        print(f"PREDICTING {task.id}", file=sys.stderr)
        if task.id == "explode" and (Path(__file__).parent / "BROKEN").exists():
            raise TypeError("predict() got an unexpected keyword argument 'x'")
        budget.charge(1e6)
        return [[p.input, None] for p in task.test], {}
'''


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "probe.py").write_text(PLUGIN)
    (tmp_path / "BROKEN").write_text("")
    d = tmp_path / "tasks"
    d.mkdir()
    for name in ("a", "b", "explode"):
        write_task(d / f"{name}.json", GOOD)
    return tmp_path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def run_probe(*extra):
    return invoke("run", "--plugin", "probe.py", "--method", "console_probe", "--dataset", "tasks", "--quiet", *extra)


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


@pytest.mark.parametrize("flags, budget, shown", [
    ([], {"flops": DEFAULT_FLOPS, "seconds": None}, "5e+11 FLOPs per task (the default"),   # nothing given: the default cap
    (["--budget-flops", "none"], {"flops": None, "seconds": None}, "uncapped"),           # uncapped only when asked
    (["--budget-flops", "2e9"], {"flops": 2e9, "seconds": None}, "2e+09 FLOPs per task"),
    (["--budget-seconds", "30"], {"flops": None, "seconds": 30.0}, "30 s per task"),       # replaces the default
    (["--budget-flops", "none", "--budget-seconds", "30"], {"flops": None, "seconds": 30.0}, "30 s per task"),
])
def test_the_budget_is_capped_by_default_and_stored_in_the_manifest(workdir, flags, budget, shown):
    result = run_probe("--out", "r", *flags)
    assert result.exit_code == 0, result.output
    assert manifest(workdir / "r")["budget"] == budget
    header = result.stderr.split("PREDICTING")[0]
    assert re.search(rf"^budget +{re.escape(shown)}", header, re.M), header


def test_the_default_cap_is_5e11_flops():
    assert DEFAULT_FLOPS == 5e11   # the choice; docs and experiments quote it


@pytest.mark.parametrize("value, needle", [("0", "positive"), ("lots", "neither a number"), ("inf", "positive")])
def test_a_bad_flop_budget_is_one_line(workdir, value, needle):
    result = run_probe("--budget-flops", value)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0] and "--budget-flops" in lines[0]


def test_header_comes_before_any_work_and_names_model_hash_dataset_budget_and_directory(workdir):
    from tta.model.loading import build_model, save_model, weights_sha256
    save_model(*build_model("tiny", seed=0), workdir / "model")
    # a method that needs the model, so the header names it with its weights' hash
    (workdir / "with_model.py").write_text(PLUGIN.replace("needs_model = False", "needs_model = True")
                                           .replace('"console_probe"', '"console_probe_model"'))
    result = invoke("run", "--plugin", "with_model.py", "--method", "console_probe_model", "--model", workdir / "model",
                    "--dataset", "tasks", "--tasks", "a,b", "--out", "out_dir", "--quiet", "--device", "cpu")
    assert result.exit_code == 0, result.output
    header, _, work = result.stderr.partition("PREDICTING")
    assert work, "the method never ran"
    sha = weights_sha256(str(workdir / "model"))
    assert re.search(r"^method +console_probe_model", header, re.M)
    assert re.search(rf"^model +{re.escape(str(workdir / 'model'))} \(weights sha256 {sha[:12]}\) on cpu", header, re.M)
    assert re.search(r"^dataset +tasks: 2 tasks", header, re.M)
    assert re.search(r"^budget +5e\+11 FLOPs per task \(the default", header, re.M)
    assert re.search(r"^results +out_dir$", header, re.M)


def test_a_failing_task_prints_one_line_as_it_happens_and_the_table_shows_every_task(workdir):
    result = run_probe("--out", "r")
    assert result.exit_code == 0
    failure_lines = [line for line in result.stderr.splitlines() if "failed" in line]
    assert failure_lines == ["task explode failed: TypeError: predict() got an unexpected keyword argument 'x'"]
    assert "Traceback" not in result.output
    # printed when it happened: before the tasks after it ran ("explode" sorts last, so check order)
    assert result.stderr.index("PREDICTING explode") < result.stderr.index("task explode failed")
    table = result.stdout.split("\n3 tasks:")[0].splitlines()
    assert table[0].split() == ["task", "score", "FLOPs", "of", "cap", "seconds", "error"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert set(rows) == {"a", "b", "explode"}
    assert rows["a"][1:4] == ["0", "1.00e+06", f"{1e6 / DEFAULT_FLOPS:.0%}"]
    assert rows["explode"][1] == "failed" and "TypeError: predict() got" in " ".join(rows["explode"])
    assert "1 failed" in result.stdout and "--retry-failed" in result.stdout
    assert "results in r" in result.stdout


def test_retry_failed_reruns_only_the_failed_tasks_in_place(workdir):
    assert run_probe("--out", "r").exit_code == 0
    before = {r["task_id"]: r for r in read_results(workdir / "r" / "results.jsonl")}
    assert before["explode"]["error"]
    (workdir / "BROKEN").unlink()   # the user fixes the plugin

    result = run_probe("--out", "r")   # a plain rerun resumes: finished tasks, failed or not, stay
    assert "PREDICTING" not in result.stderr and read_results(workdir / "r" / "results.jsonl") == list(before.values())

    result = run_probe("--out", "r", "--retry-failed")
    assert result.exit_code == 0, result.output
    assert re.findall(r"PREDICTING (\S+)", result.stderr) == ["explode"]          # only the failed task ran
    assert re.search(r"^dataset +tasks: 3 tasks \(2 done before, 1 to run; 1 failed before, retried\)", result.stderr, re.M)
    after = read_results(workdir / "r" / "results.jsonl")
    assert sorted(r["task_id"] for r in after) == ["a", "b", "explode"]          # one record each
    by_id = {r["task_id"]: r for r in after}
    assert by_id["a"] == before["a"] and by_id["b"] == before["b"]                # untouched
    assert by_id["explode"]["error"] is None and by_id["explode"]["correct"] == [False]
    assert by_id["explode"]["previous_error"].startswith("TypeError")
    assert not (workdir / "r" / "results.jsonl.tmp").exists()
    assert load_runs([workdir / "r"])["failed"].sum() == 0                        # the report agrees: no duplicates
    assert "failed" not in result.stdout.split("3 tasks:")[1]


def test_retry_failed_needs_an_existing_run(workdir):
    result = run_probe("--out", "nothing_here", "--retry-failed")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "no run to retry" in lines[0]
    assert not (workdir / "nothing_here").exists()


def test_an_experiment_without_budgets_runs_at_the_default_cap_and_none_is_uncapped(tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text('name = "p"\ndataset = "gen-eval"\nlimit = 1\n[methods.copy_input]\n')
    run_experiment(plan, tmp_path / "runs", tmp_path / "reports", progress=False, log=lambda _: None)
    cell = tmp_path / "runs" / "p" / "copy_input-f5e11-seed0"
    assert manifest(cell)["budget"] == {"flops": DEFAULT_FLOPS, "seconds": None}
    plan.write_text('name = "q"\ndataset = "gen-eval"\nlimit = 1\nbudgets = ["none"]\n[methods.copy_input]\n')
    run_experiment(plan, tmp_path / "runs", tmp_path / "reports", progress=False, log=lambda _: None)
    assert manifest(tmp_path / "runs" / "q" / "copy_input-uncapped-seed0")["budget"] == {"flops": None, "seconds": None}


def test_an_experiment_checks_every_methods_settings_before_running_any_cell(tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text('name = "typo"\ndataset = "gen-eval"\nlimit = 1\n[methods.copy_input]\n'
                    '[methods.icl]\nordrs = 2\n')
    with pytest.raises(RunError, match=r"plan.toml: \[methods.icl\]: ordrs: icl has no setting 'ordrs'") as e:
        run_experiment(plan, tmp_path / "runs", tmp_path / "reports", progress=False, log=lambda _: None)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "runs").exists()    # the first method's cell never ran
    result = CliRunner().invoke(main, ["experiment", str(plan), "--runs", str(tmp_path / "runs"),
                                       "--reports", str(tmp_path / "reports")])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "ordrs" in lines[0] and "Traceback" not in result.output
    plan.write_text('name = "typo"\ndataset = "gen-eval"\nlimit = 1\n[methods.copy_input]\n[methods.nope]\n')
    with pytest.raises(RunError, match=r"\[methods.nope\]: unknown method 'nope'"):
        run_experiment(plan, tmp_path / "runs", tmp_path / "reports", progress=False, log=lambda _: None)
    assert not (tmp_path / "runs").exists()


def test_an_experiment_runs_a_plugin_method_by_name(workdir):
    (workdir / "BROKEN").unlink()
    (workdir / "plan.toml").write_text('name = "plug"\ndataset = "tasks"\n[methods.console_probe]\n')
    result = invoke("experiment", "plan.toml", "--plugin", "probe.py", "--quiet")
    assert result.exit_code == 0, result.output
    cell = workdir / "runs" / "plug" / "console_probe-f5e11-seed0"
    assert manifest(cell)["plugins"] == ["probe.py"] and len(read_results(cell / "results.jsonl")) == 3
    assert re.search(r"^method +console_probe", result.stderr, re.M)   # each cell's header goes to the log
