"""Every bad input ends in one line on stderr, a non-zero exit code and no traceback."""
import json

import pytest
from click.testing import CliRunner

from tta.cli import main
from conftest import GOOD, write_task


def invoke(*args):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output.strip()


def assert_one_line_error(code, output, *needles):
    assert code != 0
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.startswith("error")]
    assert len(lines) == 1, output
    for needle in needles:
        assert needle in lines[0], output


@pytest.fixture
def bad_files(tmp_path):
    def make(name, content):
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return str(path)
    return make


def test_malformed_json(bad_files):
    path = bad_files("broken.json", '{"train": [')
    assert_one_line_error(*invoke("run", "--method", "copy_input", "--dataset", path), "broken.json", "not valid JSON")


def test_wrong_colour(bad_files):
    data = json.loads(json.dumps(GOOD))
    data["train"][0]["input"][0][0] = 11
    path = bad_files("colour.json", data)
    assert_one_line_error(*invoke("run", "--method", "copy_input", "--dataset", path), "colour.json", "outside the colours")


def test_ragged_and_oversized(bad_files):
    data = json.loads(json.dumps(GOOD))
    data["test"][0]["input"] = [[1, 2], [3]]
    assert_one_line_error(*invoke("run", "--method", "copy_input", "--dataset", bad_files("ragged.json", data)), "ragged")
    data["test"][0]["input"] = [[1] * 31]
    assert_one_line_error(*invoke("run", "--method", "copy_input", "--dataset", bad_files("big.json", data)), "more than 30")


def test_unknown_method_bad_flag_bad_setting_missing_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # runs/ would land here
    assert_one_line_error(*invoke("run", "--method", "nope"), "unknown method")
    assert_one_line_error(*invoke("run", "--method", "icl", "--no-such-flag"), "--no-such-flag")
    assert_one_line_error(*invoke("run", "--method", "icl", "--set", "bogus=1"), "bogus")
    assert_one_line_error(*invoke("run", "--method", "icl", "--limit", "1", "--model", str(tmp_path / "none")), "none")
    assert not (tmp_path / "runs").exists()   # a run that could not start leaves no directory behind
    assert_one_line_error(*invoke("run", "--method", "icl", "--budget-flops", "1", "--budget-seconds", "1"), "not both")
    assert_one_line_error(*invoke("compare", str(tmp_path)), str(tmp_path))


def test_a_directory_with_a_bad_task_runs_the_rest(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks / "good.json", GOOD)
    (tasks / "bad.json").write_text("[1, 2")
    code, output = invoke("run", "--method", "copy_input", "--dataset", str(tasks), "--out", str(tmp_path / "r"), "--quiet")
    assert code == 0 and "2 tasks" in output and "1 failed" in output
    code, output = invoke("report", str(tmp_path / "r"))
    assert code == 0 and "bad" in output


def test_methods_and_datasets_list_everything():
    code, output = invoke("methods")
    assert code == 0
    for name in ("icl", "ttt_lora", "copy_input", "common_output"):
        assert f"{name}:" in output
    assert "lr (float) = 0.0001" in output   # ttt_lora's, the paper's 8B value
    code, output = invoke("datasets")
    assert code == 0 and "arc1-eval" in output and "400 tasks" in output and "gen-eval" in output
