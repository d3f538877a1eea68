"""Methods of one's own: loaded from a file or module without PYTHONPATH, and the guide's examples work."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tta.cli import main
from tta.method import REGISTRY, MethodError, get_method, load_plugin
from tta.run.runner import read_results
from tta.run import time_limit
from conftest import GOOD, write_task

DOCS = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def one_task(tmp_path):
    d = tmp_path / "tasks"
    d.mkdir()
    write_task(d / "t.json", GOOD)
    return str(d)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def doc_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)


def test_the_guides_first_example_runs_from_a_file_by_path_and_by_plugin_name(tmp_path, monkeypatch):
    """Fails if loading a class from a .py file needs PYTHONPATH, if --plugin does not register
    the file's methods (for run and for `tta methods`), or if the documented example is wrong."""
    monkeypatch.chdir(tmp_path)
    first = doc_examples()[0]
    assert '@register("last_output")' in first and "def predict(self, task, budget, seed)" in first
    (tmp_path / "last_output.py").write_text(first)
    dataset = one_task(tmp_path)
    REGISTRY.pop("last_output", None)

    result = invoke("run", "--method", "last_output", "--dataset", dataset, "--out", "a", "--quiet")
    assert result.exit_code == 2 and "unknown method 'last_output'" in result.stderr   # not imported yet

    result = invoke("methods", "--plugin", "last_output.py")
    assert result.exit_code == 0
    assert re.search(r"^last_output: last_output: the last demonstration's output", result.output, re.M)
    assert "    second (str) = 'input'" in result.output

    result = invoke("run", "--plugin", "last_output.py", "--method", "last_output", "--set", "second=none",
                    "--dataset", dataset, "--out", "b", "--quiet")
    assert result.exit_code == 0, result.output
    [record] = read_results(tmp_path / "b" / "results.jsonl")
    assert record["attempts"][0] == [GOOD["train"][-1]["output"], None]

    result = invoke("run", "--method", "last_output.py:LastOutput", "--dataset", dataset, "--out", "a", "--quiet")
    assert result.exit_code == 0, result.output
    [record] = read_results(tmp_path / "a" / "results.jsonl")
    assert record["error"] is None
    assert record["attempts"][0] == [GOOD["train"][-1]["output"], GOOD["test"][0]["input"]]


def test_the_guides_model_example_decodes_under_the_budget(tmp_path, monkeypatch):
    """The second example uses the model through the harness's decoder: it must run and be charged."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "greedy.py").write_text(doc_examples()[1])
    result = invoke("run", "--plugin", "greedy.py", "--method", "greedy", "--model", "random:tiny",
                    "--dataset", one_task(tmp_path), "--out", "g", "--quiet", "--budget-flops", "1e9")
    assert result.exit_code == 0, result.output
    [record] = read_results(tmp_path / "g" / "results.jsonl")
    assert record["error"] is None and record["flops"] > 0 and record["out_of_work"]
    assert len(record["attempts"]) == 1 and record["attempts"][0][1] is None


def test_a_plugin_module_by_name_and_the_same_file_imported_once(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "my_plugin_mod.py").write_text(
        "from tta.method import Method, register\n"
        "@register('plugin_by_module')\n"
        "class ByModule(Method):\n"
        "    needs_model = False\n"
        "    def predict(self, task, budget, seed):\n"
        "        return [[p.input, None] for p in task.test], {}\n")
    load_plugin("my_plugin_mod")
    assert get_method("plugin_by_module").__name__ == "ByModule"
    # a file given twice (--plugin and --method FILE:Class) is one module: one class, not two
    path = str(tmp_path / "my_plugin_mod.py")
    assert load_plugin(path) is load_plugin(path)
    assert get_method(f"{path}:ByModule") is getattr(load_plugin(path), "ByModule")


@pytest.mark.parametrize("content, args, needles", [
    ("raise RuntimeError('boom at import')", ["--plugin", "{f}"], ["bad_plugin.py", "RuntimeError: boom at import"]),
    ("def broken(:\n", ["--plugin", "{f}"], ["bad_plugin.py", "SyntaxError"]),
    ("from tta.method import Method\nclass Here(Method): pass\n", ["--method", "{f}:Missing"],
     ["has no class 'Missing'", "Here"]),
    ("class NotAMethod: pass\n", ["--method", "{f}:NotAMethod"], ["not a subclass of tta.method.Method"]),
    (None, ["--plugin", "{f}"], ["no such plugin file"]),
    (None, ["--plugin", "no_such_module_xyz"], ["cannot import plugin no_such_module_xyz"]),
])
def test_a_broken_plugin_is_one_line(tmp_path, monkeypatch, content, args, needles):
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "bad_plugin.py"
    if content is not None:
        f.write_text(content)
    args = [a.format(f=f) for a in args]
    if "--method" not in args:
        args += ["--method", "copy_input"]
    result = invoke("run", *args, "--dataset", one_task(tmp_path), "--quiet")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error"), result.stderr
    assert all(n in lines[0] for n in needles), lines[0]
    assert "Traceback" not in result.output and not (tmp_path / "runs").exists()


def test_a_module_name_that_is_a_file_here_gets_a_hint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine_not_on_path.py").write_text("x = 1\n")
    with pytest.raises(MethodError, match=r"mine_not_on_path.py:Cls"):
        get_method("mine_not_on_path:Cls")


def test_a_file_method_runs_in_a_fresh_process_without_pythonpath(tmp_path):
    """The issue's report: `--method mymethod:LastOutput` worked only with PYTHONPATH=.; a path works."""
    (tmp_path / "mymethod.py").write_text(doc_examples()[0])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "tta.cli", "run", "--method", "./mymethod.py:LastOutput",
                           "--dataset", one_task(tmp_path), "--out", "r", "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["method"] == "last_output"


# A method that breaks the contract of docs/plugins.md, one way per task id: each such task fails
# with a one-line error naming the hook and the problem, the well-behaved ones are scored, and the
# loose-but-exact returns (numpy scalars, tensors, a single attempt) are accepted as they are.
CONTRACT_METHOD = '''
import numpy as np, torch
from tta.method import Method

class Loose(Method):
    def predict(self, task, budget, seed):
        out = task.train[0].output
        kind = task.id
        if kind == "numpy_record":
            return [[out, None]], {"score": np.float32(0.5), "counts": np.arange(3), "pair": (1, 2)}
        if kind == "tensor_attempt":
            return [[torch.tensor(out), None]], {}
        if kind == "one_attempt":
            return [[out]], None
        if kind == "bare_grid":
            return [out], {}
        if kind == "colour_99":
            return [[np.full((2, 2), 99), None]], {}
        if kind == "three_attempts":
            return [[out, out, out]], {}
        if kind == "float_cells":
            return [[out + 0.5, None]], {}
        if kind == "object_record":
            return [[out, None]], {"model": object()}
        if kind == "attempts_only":
            return [[out, None]]
        raise AssertionError(kind)
'''

FAILS_WITH = {
    "bare_grid": "is one grid, not a list of attempts",
    "colour_99": "attempt 1: cell (0,0) is 99, outside the colours 0-9",
    "three_attempts": "3 attempts for test input 0",
    "float_cells": "not integers",
    "object_record": "predict's record['model'] holds an object",
    "attempts_only": "it must return (attempts, record)",
}


def test_a_method_that_breaks_the_contract_fails_that_task_with_one_line_and_the_run_goes_on(tmp_path):
    (tmp_path / "loose.py").write_text(CONTRACT_METHOD)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    grid = [[1, 2], [3, 4]]
    for name in ["numpy_record", "tensor_attempt", "one_attempt", *FAILS_WITH]:
        write_task(tasks / f"{name}.json", {"train": [{"input": grid, "output": grid}],
                                            "test": [{"input": grid, "output": grid}]})
    result = invoke("run", "--method", f"{tmp_path / 'loose.py'}:Loose", "--dataset", tasks,
                    "--out", tmp_path / "r", "--quiet")
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    records = {r["task_id"]: r for r in read_results(tmp_path / "r" / "results.jsonl")}
    for name in ("numpy_record", "tensor_attempt", "one_attempt"):
        assert records[name]["error"] is None and records[name]["correct"] == [True], records[name]
    assert records["numpy_record"]["extra"]["predict"] == {"score": 0.5, "counts": [0, 1, 2], "pair": [1, 2]}
    assert records["one_attempt"]["attempts"] == [[grid, None]]
    for name, needle in FAILS_WITH.items():
        error = records[name]["error"]
        assert error and needle in error and "\n" not in error, (name, error)


@pytest.mark.parametrize("body, needle", [
    ("def setup(self, tasks):\n        raise RuntimeError('no data store')", "setup failed: RuntimeError: no data store"),
    ("def setup(self, tasks):\n        return {'what': object()}", "setup failed: MethodError: setup's record['what'] holds an object"),
    ("def __init__(self, *args):\n        raise KeyError('weights')", "could not be created: KeyError"),
])
def test_a_method_that_cannot_start_stops_the_run_with_one_line_and_writes_nothing(tmp_path, body, needle):
    (tmp_path / "nostart.py").write_text(
        "from tta.method import Method\n\nclass NoStart(Method):\n    " + body +
        "\n\n    def predict(self, task, budget, seed):\n        return [[None, None]], {}\n")
    result = invoke("run", "--method", f"{tmp_path / 'nostart.py'}:NoStart", "--dataset", one_task(tmp_path),
                    "--out", tmp_path / "r", "--quiet")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]   # after the run's header
    assert result.exit_code == 2 and len(errors) == 1 and needle in errors[0], result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "r").exists()


HANGS = '''
import time
from tta.method import Method

class Hangs(Method):
    needs_model = False
    resets = 0

    def predict(self, task, budget, seed):
        while task.id.startswith("hang"):
            try:
                time.sleep(0.01)
            except Exception:   # swallows what it can: the timeout is not an Exception
                pass
        return [[p.input, None] for p in task.test], {}

    def reset(self):
        type(self).resets += 1
        print(f"RESET {type(self).resets}")
'''


@pytest.mark.parametrize("workers", [1, 2])
def test_a_task_past_its_timeout_fails_with_one_line_and_the_run_goes_on(tmp_path, workers):
    (tmp_path / "hangs.py").write_text(HANGS)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name in ("hang", "ok", "ok2"):
        write_task(tasks / f"{name}.json", GOOD)
    result = invoke("run", "--method", f"{tmp_path / 'hangs.py'}:Hangs", "--dataset", tasks, "--task-timeout", 1,
                    "--workers", workers, "--out", tmp_path / "r", "--quiet")
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    records = {r["task_id"]: r for r in read_results(tmp_path / "r" / "results.jsonl")}
    assert records["hang"]["error"] == "TaskTimeout: the task ran past its --task-timeout of 1 s"
    assert 1 <= records["hang"]["seconds"] < 5
    assert records["ok"]["error"] is None and records["ok2"]["error"] is None
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["task_timeout"] == 1
    if workers == 1:   # the stopped task was reset like any other (in this process: its output is here)
        assert "RESET 3" in result.output


def test_a_timeout_with_ray_is_refused_in_one_line(tmp_path):
    result = invoke("run", "--method", "copy_input", "--dataset", one_task(tmp_path), "--task-timeout", 5,
                    "--executor", "ray", "--out", tmp_path / "r", "--quiet")
    assert result.exit_code != 0 and "--task-timeout: Ray runs tasks" in result.output
    assert "Traceback" not in result.output


def test_a_seconds_cap_stops_a_method_that_never_asks_by_default(tmp_path, monkeypatch):
    """Without --task-timeout, a seconds cap brings its own limit (twice the cap plus a minute;
    here the minute is taken out so the test is quick): a method looping past its cap fails that
    task with one line instead of holding the run for ever."""
    monkeypatch.setattr(time_limit, "GUARD_SLACK_SECONDS", 0)
    bounded = "import time as clock\nSTART = clock.monotonic()\n" + HANGS.replace(   # 15 s, not for ever, should the guard fail
        'while task.id.startswith("hang"):', 'while task.id.startswith("hang") and clock.monotonic() - START < 15:')
    assert bounded.count("clock.monotonic()") == 2
    (tmp_path / "hangs.py").write_text(bounded)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name in ("hang", "ok"):
        write_task(tasks / f"{name}.json", GOOD)
    result = invoke("run", "--method", f"{tmp_path / 'hangs.py'}:Hangs", "--dataset", tasks, "--budget-seconds", 0.5,
                    "--out", tmp_path / "r", "--quiet")
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    records = {r["task_id"]: r for r in read_results(tmp_path / "r" / "results.jsonl")}
    assert records["hang"]["error"] == ("TaskTimeout: the task ran past its time limit of 1 s (2 x its 0.5-s cap + 0 s, "
                                        "the default without --task-timeout)")
    assert 1 <= records["hang"]["seconds"] < 5 and records["ok"]["error"] is None
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["task_timeout"] == 1


def test_the_seconds_cap_guard_yields_to_a_given_timeout_and_is_absent_without_a_seconds_cap():
    assert time_limit.task_limit(7, 100) == (7, "--task-timeout of 7 s")
    assert time_limit.task_limit(None, 30)[0] == 2 * 30 + time_limit.GUARD_SLACK_SECONDS
    assert time_limit.task_limit(None, None) == (None, "")
