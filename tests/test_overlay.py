"""`tta merge --overlay`: a partial rerun laid over a whole run, recorded so a report can say so."""
import json
import sys

import pytest
from click.testing import CliRunner

from tta.cli import main
from tta.method import REGISTRY
from tta.run.record import wall_seconds
from tta.run.runner import RunError, overlay, read_results

# A method with one setting that changes its answers: attempt 2 is the test input, or nothing.
SECOND_ATTEMPT = '''
from dataclasses import dataclass
from tta.method import Method, register, setting

@dataclass
class Config:
    second: str = setting("none", "attempt 2: input | none")
    newer: int = setting(0, "a setting added after some runs were recorded", before=0)

@register("second_attempt")
class SecondAttempt(Method):
    Config = Config
    needs_model = False
    spends = "nothing"

    def predict(self, task, budget, seed):
        budget.out_of_work("no model")
        last = task.train[-1].output
        return [[last, p.input if self.config.second == "input" else None] for p in task.test], {}
'''


def invoke(*args):
    """The CLI in-process, with sys.argv as a shell would set it (the manifests record it)."""
    args = [str(a) for a in args]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sys, "argv", ["tta", *args])
        return CliRunner().invoke(main, args)


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """A base run over 4 generated tasks and a rerun of 2 of them with another setting."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "second_attempt.py").write_text(SECOND_ATTEMPT)
    common = ["--plugin", "second_attempt.py", "--method", "second_attempt", "--dataset", "gen-eval", "--budget-flops", "1e9", "--quiet"]
    assert invoke("run", *common, "--limit", "4", "--out", "base").exit_code == 0
    ids = json.loads((tmp_path / "base" / "manifest.json").read_text())["task_ids"]
    rerun_ids = [ids[2], ids[0]]
    result = invoke("run", *common, "--tasks", ",".join(rerun_ids), "--set", "second=input", "--out", "rerun")
    assert result.exit_code == 0, result.output
    yield tmp_path, ids, rerun_ids
    REGISTRY.pop("second_attempt", None)   # other tests list the registered methods


def test_overlay_keeps_the_base_results_except_the_reruns_and_says_which(runs):
    """Fails if a rerun's result does not replace the base's, if a base result is lost or
    duplicated, if the task order changes, or if the manifest or report hides the overlay."""
    tmp, ids, rerun_ids = runs
    result = invoke("merge", "base", "rerun", "--overlay", "--out", "both")
    assert result.exit_code == 0, result.output
    records = read_results(tmp / "both" / "results.jsonl")
    assert [r["task_id"] for r in records] == ids
    base = {r["task_id"]: r for r in read_results(tmp / "base" / "results.jsonl")}
    rerun = {r["task_id"]: r for r in read_results(tmp / "rerun" / "results.jsonl")}
    for r in records:
        source = rerun if r["task_id"] in rerun_ids else base
        assert r == source[r["task_id"]]
        # The setting shows in the answers: the rerun's second attempt is the test input.
        assert (r["attempts"][0][1] is not None) == (r["task_id"] in rerun_ids)
    submission = json.loads((tmp / "both" / "submission.json").read_text())
    assert list(submission) == ids and submission[rerun_ids[0]][0]["attempt_2"] != [[0]]

    manifest = json.loads((tmp / "both" / "manifest.json").read_text())
    base_manifest = json.loads((tmp / "base" / "manifest.json").read_text())
    assert manifest["task_ids"] == ids and manifest["config"] == base_manifest["config"]
    [overlaid] = manifest["overlaid"]
    assert overlaid["run"] == "rerun" and sorted(overlaid["tasks"]) == sorted(rerun_ids)
    assert overlaid["settings"] == {"second": ["none", "input"]}
    assert "--set second=input" in overlaid["command"] and manifest["base_command"] == base_manifest["command"]
    assert manifest["command"].startswith("tta merge base rerun --overlay")
    assert manifest["config_hash"] != base_manifest["config_hash"]
    assert wall_seconds(manifest) is None   # the two runs ran at different times

    # Nothing runs into it: a resume or --retry-failed would mix in the base's settings unrecorded.
    result = invoke("run", "--plugin", "second_attempt.py", "--method", "second_attempt", "--dataset", "gen-eval",
                    "--budget-flops", "1e9", "--limit", "4", "--retry-failed", "--out", "both", "--quiet")
    assert result.exit_code != 0 and "both: made by `tta merge` from base, rerun; run into one of those" in result.output

    result = invoke("compare", "base", "both", "--baseline", "base", "--out", "cmp.md")
    assert result.exit_code == 0, result.output
    text = (tmp / "cmp.md").read_text()
    assert 'overlaid: 2 of its 4 tasks from rerun with second="input" (not "none")' in text
    assert "rerun: `tta run" in text
    result = invoke("report", "both")
    assert result.exit_code == 0 and 'overlaid: 2 of its 4 tasks from rerun with second="input"' in result.output
    assert "- Command: `tta merge base rerun --overlay" in result.output


def test_a_later_rerun_wins_over_an_earlier_one(runs):
    tmp, ids, rerun_ids = runs
    result = invoke("run", "--plugin", "second_attempt.py", "--method", "second_attempt", "--dataset", "gen-eval", "--budget-flops", "1e9",
                    "--tasks", rerun_ids[0], "--out", "again", "--quiet")
    assert result.exit_code == 0, result.output
    out = overlay(tmp / "base", [tmp / "rerun", tmp / "again"], tmp / "both")
    by_id = {r["task_id"]: r for r in read_results(out / "results.jsonl")}
    assert by_id[rerun_ids[0]]["attempts"][0][1] is None        # from "again" (second=none)
    assert by_id[rerun_ids[1]]["attempts"][0][1] is not None    # from "rerun" (second=input)
    assert [o["settings"] for o in json.loads((out / "manifest.json").read_text())["overlaid"]] == \
        [{"second": ["none", "input"]}, {}]


def test_overlay_refuses_what_is_not_a_partial_rerun(runs):
    """Fails if an overlay could mix budgets, add tasks the base never ran, take an unfinished
    rerun, or write over a run directory; the CLI says so in one line."""
    tmp, ids, rerun_ids = runs
    common = ["--plugin", "second_attempt.py", "--method", "second_attempt", "--dataset", "gen-eval", "--quiet"]
    assert invoke("run", *common, "--budget-flops", "2e9", "--tasks", ids[1], "--out", "other-budget").exit_code == 0
    with pytest.raises(RunError, match="other-budget: differs from .*base in budget"):
        overlay(tmp / "base", [tmp / "other-budget"], tmp / "x1")
    assert invoke("run", *common, "--budget-flops", "1e9", "--limit", "5", "--out", "more").exit_code == 0
    with pytest.raises(RunError, match="more: 1 tasks are not tasks of .*base"):
        overlay(tmp / "base", [tmp / "more"], tmp / "x2")
    before = (tmp / "base" / "results.jsonl").read_text()
    with pytest.raises(RunError, match="already holds results"):
        overlay(tmp / "base", [tmp / "rerun"], tmp / "base")
    assert (tmp / "base" / "results.jsonl").read_text() == before
    unfinished = tmp / "rerun" / "results.jsonl"
    unfinished.write_text(unfinished.read_text().splitlines(keepends=True)[0])
    with pytest.raises(RunError, match="rerun: 1 tasks have no result yet"):
        overlay(tmp / "base", [tmp / "rerun"], tmp / "x3")
    assert not any((tmp / x).exists() for x in ("x1", "x2", "x3"))   # a refused overlay writes nothing

    result = invoke("merge", "base", "other-budget", "--overlay", "--out", "x4")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "differs from base in budget" in result.output and len(result.output.strip().splitlines()) == 1
    result = invoke("merge", "base", "--overlay", "--out", "x5")
    assert result.exit_code == 2 and "--overlay needs a run and at least one rerun" in result.output


def test_a_setting_added_since_the_base_run_is_no_difference_at_its_old_value(runs):
    """Fails if a base run recorded before a setting existed shows that setting as overlaid,
    although the value it was added with (`before`) is what the base run did."""
    tmp, ids, rerun_ids = runs
    path = tmp / "base" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["config"]["newer"]
    path.write_text(json.dumps(manifest))
    out = overlay(tmp / "base", [tmp / "rerun"], tmp / "both")
    [overlaid] = json.loads((out / "manifest.json").read_text())["overlaid"]
    assert overlaid["settings"] == {"second": ["none", "input"]}
