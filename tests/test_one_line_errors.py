"""The first-hour errors of issue 15: each is one line on stderr with a non-zero exit (or, where
the input is fine after all, accepted), never a traceback or a raw Python warning."""
import copy
import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from tta.cli import main
from tta.method import MethodError, get_method, make_config
from tta.run.runner import read_results
from tta.data.tasks import TaskError
from tta.data.datasets import load_dataset
from conftest import GOOD, write_task


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line(result, *needles):
    lines = result.stderr.strip().splitlines()
    assert result.exit_code not in (0, None) and len(lines) == 1, result.output
    assert lines[0].startswith("error") and "Traceback" not in result.output, result.output
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


@pytest.fixture
def tasks_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "tasks"
    d.mkdir()
    write_task(d / "t.json", GOOD)
    return d


# ---------------------------------------------------------------- devices

@pytest.mark.parametrize("device, needles", [("cuda", ["--device cuda", "CUDA"]), ("cuda:0", ["--device cuda:0"]),
                                             ("mps", ["--device mps", "MPS"]), ("tpu", ["--device tpu", "unknown device"])])
def test_a_device_this_machine_lacks_is_one_line(tasks_dir, monkeypatch, device, needles):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)    # as on a CPU-only machine
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert_one_line(invoke("run", "--method", "icl", "--model", "random:tiny", "--dataset", tasks_dir,
                           "--device", device), *needles)
    assert not (tasks_dir.parent / "runs").exists()
    # a method without a model is refused too: the flag is wrong whatever the method
    assert_one_line(invoke("run", "--method", "copy_input", "--dataset", tasks_dir, "--device", device), *needles)
    assert_one_line(invoke("pretrain", "--steps", "1", "--device", device, "--out", tasks_dir.parent / "m"), *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_this_cpu_machine_in_a_fresh_process(tasks_dir):
    proc = subprocess.run([sys.executable, "-m", "tta.cli", "run", "--method", "copy_input", "--dataset", str(tasks_dir),
                           "--device", "cuda"], capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--device cuda" in lines[0], proc.stderr


# ---------------------------------------------------------------- settings

def test_a_list_setting_takes_a_comma_list(tasks_dir):
    icl = get_method("icl")
    assert make_config(icl, ["transforms=identity,rot90"]).transforms == ["identity", "rot90"]
    assert make_config(icl, ["transforms=identity, rot90"]).transforms == ["identity", "rot90"]
    assert make_config(icl, ["transforms=rot90"]).transforms == ["rot90"]
    assert make_config(icl, ['transforms=["identity","rot90"]']).transforms == ["identity", "rot90"]   # JSON still
    with pytest.raises(MethodError, match="unknown transform rot91"):
        make_config(icl, ["transforms=identity,rot91"])
    # and through the command line, into the run's manifest
    result = invoke("run", "--method", "icl", "--model", "random:tiny", "--dataset", tasks_dir, "--out", "r",
                    "--set", "transforms=identity,rot90", "--set", "orders=1", "--set", "fill_views=false", "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads((tasks_dir.parent / "r" / "manifest.json").read_text())["config"]["transforms"] == ["identity", "rot90"]


DICT_METHOD = '''
from dataclasses import dataclass
from tta.method import Method, register, setting

@dataclass
class Config:
    weights: dict = setting({}, "a JSON object")
    sizes: list[int] = setting([1], "numbers")

@register("dict_setting_probe")
class Probe(Method):
    Config = Config
    needs_model = False
    def predict(self, task, budget, seed):
        return [[p.input, None] for p in task.test], {}
'''


def test_a_dict_setting_takes_json_and_bad_json_is_one_line_naming_the_key(tasks_dir):
    (tasks_dir.parent / "probe.py").write_text(DICT_METHOD)
    common = ["run", "--plugin", "probe.py", "--method", "dict_setting_probe", "--dataset", tasks_dir, "--quiet"]
    line = assert_one_line(invoke(*common, "--set", "weights={a: 1}"), "weights", "JSON object")
    assert "Expecting value: line 1 column 1" not in line
    assert_one_line(invoke(*common, "--set", "weights=[1, 2]"), "weights", "JSON object")
    cls = get_method("dict_setting_probe")
    assert make_config(cls, ['weights={"a": 1}']).weights == {"a": 1}
    assert make_config(cls, ["sizes=1,2,3"]).sizes == [1, 2, 3]      # list[int]: items typed
    assert make_config(cls, ["sizes=[4]"]).sizes == [4]


# ---------------------------------------------------------------- Kaggle files

def kaggle_pair(folder, with_solutions=True, prefix="arc-agi_evaluation"):
    folder.mkdir(exist_ok=True)
    challenges, solutions = {}, {}
    for task_id in ("k1", "k2"):
        task = copy.deepcopy(GOOD)
        if task_id == "k1":                       # copy_input solves this one
            task["test"][0]["output"] = task["test"][0]["input"]
        solutions[task_id] = [p.pop("output") for p in task["test"]]
        challenges[task_id] = task
    (folder / f"{prefix}_challenges.json").write_text(json.dumps(challenges))
    if with_solutions:
        (folder / f"{prefix}_solutions.json").write_text(json.dumps(solutions))
    return folder / f"{prefix}_challenges.json"


def test_a_challenges_file_without_solutions_runs_ungraded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    challenges = kaggle_pair(tmp_path / "kaggle", with_solutions=False)
    result = invoke("run", "--method", "copy_input", "--dataset", challenges, "--out", "u", "--quiet")
    assert result.exit_code == 0, result.output
    assert "2 tasks ungraded" in result.stdout and "0.0%" not in result.stdout
    assert "submission.json" in result.stdout
    assert [line.split()[1] for line in result.stdout.splitlines()[1:3]] == ["ungraded", "ungraded"]   # the table
    records = read_results(tmp_path / "u" / "results.jsonl")
    assert [r["graded"] for r in records] == [False, False] and all(r["error"] is None for r in records)
    submission = json.loads((tmp_path / "u" / "submission.json").read_text())
    assert submission["k1"][0]["attempt_1"] == GOOD["test"][0]["input"]

    report = invoke("report", "u")
    assert report.exit_code == 0 and report.stderr == ""
    accuracy = report.stdout.split("## Accuracy")[1].split("## Cost")[0]
    assert "Ungraded: the dataset gives no solutions" in accuracy and "%" not in accuracy
    assert "| k1 | 1 |  | ungraded |" in report.stdout
    assert_one_line(invoke("compare", "u", "--out", "c.md"), "ungraded")

    # with the solutions file beside it, the same run is graded
    kaggle_pair(tmp_path / "kaggle", with_solutions=True)
    result = invoke("run", "--method", "copy_input", "--dataset", challenges, "--out", "g", "--quiet")
    assert "2 tasks: exact (kaggle) 50.0%" in result.stdout and "ungraded" not in result.stdout


def test_a_folder_holding_a_kaggle_pair_is_read_as_that_pair(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "kaggle"
    kaggle_pair(folder)
    dataset = load_dataset(str(folder))
    assert dataset.ids == ["k1", "k2"] and not dataset.failures
    assert all(t.has_solutions for t in dataset.tasks)
    result = invoke("run", "--method", "copy_input", "--dataset", folder, "--out", "r", "--quiet")
    assert result.exit_code == 0 and "2 tasks: exact (kaggle) 50.0%" in result.stdout and "failed" not in result.stdout
    # the Kaggle download holds several pairs: which one is meant must be said
    kaggle_pair(folder, prefix="arc-agi_training")
    with pytest.raises(TaskError, match="holds 2 Kaggle challenges files"):
        load_dataset(str(folder))
    assert_one_line(invoke("run", "--method", "copy_input", "--dataset", folder, "--out", "r2"),
                    "arc-agi_evaluation_challenges.json", "arc-agi_training_challenges.json")


# ---------------------------------------------------------------- an unfinished run

def test_report_on_an_unfinished_run_lists_tasks_not_run_and_prints_no_warning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "tasks"
    d.mkdir()
    for name in ("a", "b", "c"):
        write_task(d / f"{name}.json", GOOD)
    write_task(d / "broken.json", {"train": []})
    assert invoke("run", "--method", "copy_input", "--dataset", d, "--out", "r", "--quiet").exit_code == 0
    lines = (tmp_path / "r" / "results.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["task_id"] not in ("b", "c")]   # as if stopped after a
    (tmp_path / "r" / "results.jsonl").write_text("\n".join(kept) + "\n")

    proc = subprocess.run([sys.executable, "-W", "default", "-m", "tta.cli", "report", "r"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr     # no raw UserWarning
    out = proc.stdout
    assert "- Failed tasks: 1; not run: 2" in out
    assert "| b | 1 |  | not run |" in out and "| c | 1 |  | not run |" in out
    failed_section = out.split("## Failed tasks")[1]
    assert "| r | broken |" in failed_section and "| r | b |" not in failed_section
    assert "2 task(s) not run" in failed_section and "b, c" in failed_section


def test_resuming_over_a_damaged_results_line_is_one_line_naming_it(tasks_dir):
    """A torn last line is an interrupted write and is repaired; a damaged earlier line is not
    ours to guess at.  Fails if `tta run` shows a traceback for it (it did: RecordError)."""
    write_task(tasks_dir / "u.json", GOOD)
    write_task(tasks_dir / "v.json", GOOD)
    args = ("run", "--method", "copy_input", "--dataset", tasks_dir, "--out", "r", "--quiet")
    assert invoke(*args).exit_code == 0
    results = tasks_dir.parent / "r" / "results.jsonl"
    lines = results.read_text().splitlines()
    results.write_text("\n".join([lines[0], lines[1][:40], lines[2]]) + "\n")
    assert_one_line(invoke(*args), "r/results.jsonl:2: invalid JSON")


def test_an_out_that_is_a_file_is_one_line_and_the_file_stays(tasks_dir):
    (tasks_dir.parent / "notes.txt").write_text("mine")
    assert_one_line(invoke("run", "--method", "copy_input", "--dataset", tasks_dir, "--out", "notes.txt", "--quiet"),
                    "notes.txt: is a file; --out names the run's directory")
    assert (tasks_dir.parent / "notes.txt").read_text() == "mine"


def test_select_on_demo_without_checks_is_one_line(tasks_dir):
    """Fails if checks=0 reaches training, where spreading no scorings over the steps divides by
    zero in the middle of a run (every task would fail with a Python error instead)."""
    result = invoke("run", "--method", "ttt_full", "--set", "select_on_demo=true", "--set", "checks=0",
                    "--dataset", tasks_dir, "--quiet")
    assert_one_line(result, "checks=0", "at least 1")


def test_poe_selection_with_several_members_is_one_line(tasks_dir):
    """Fails if select=poe with members=2 runs: the members' answers meet in one vote after their
    adapters are gone, so the scoring would be silently skipped."""
    result = invoke("run", "--method", "ttt_full", "--set", "members=2", "--set", "select=poe",
                    "--dataset", tasks_dir, "--quiet")
    assert_one_line(result, "select=poe", "members")


@pytest.mark.parametrize("method, bad", [("icl", "max_views=0"), ("ttt_lora", "warmup_ratio=1.5"),
                                         ("sampling", "top_p=2"), ("sampling", "max_forwards=0"),
                                         ("ttt_full", "epochs=0"), ("less", "proj_dim=0")])
def test_a_setting_outside_its_range_is_one_line_before_any_work(method, bad):
    """Fails if a value a setting cannot take (no views, a share above 1, no steps) reaches the
    run, where it used to run silently or fail inside every task."""
    with pytest.raises(MethodError) as error:
        make_config(get_method(method), [bad])
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"--set {bad.split('=')[0]}=") and "expected" in message


def test_a_plugin_setting_declares_its_own_range():
    """Fails if the range check only knows the built-in methods' settings."""
    from dataclasses import dataclass
    from tta.method import Method, register, setting

    @dataclass
    class RangedConfig:
        tries: int = setting(3, "attempts", at_least=1, at_most=5)

    @register("test_ranged")
    class Ranged(Method):
        Config = RangedConfig
        needs_model = False

    assert make_config(Ranged, ["tries=5"]).tries == 5
    with pytest.raises(MethodError, match=r"tries=6: expected between 1 and 5"):
        make_config(Ranged, {"tries": 6})   # an experiment file's table
