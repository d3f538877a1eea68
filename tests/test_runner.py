import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dataclasses import dataclass

from tta.method import Method, MethodError, get_method, make_config, register
from tta.settings import setting
from tta.run.runner import RunError, RunSpec, read_results, run
from click.testing import CliRunner
from tta.cli import main
from conftest import GOOD, write_task

# A small TTT: few examples, two views, and at most 8 views per test input when the budget fills
# more (on random:tiny the default cap of 512 views made each gen-eval task take 14 s).
TTT_FAST = ["max_examples=6", "rank=4", "alpha=8", "epochs=1", 'transforms=["identity","rot90"]', "orders=1",
            "max_views=8"]


@register("test_echo")
class EchoInput(Method):
    """A user's own method, registered from outside the package: answers with the test input."""
    needs_model = False

    def predict(self, task, meter, seed):
        if task.id == "explode":
            raise FloatingPointError("loss is nan")
        return [[p.input, None] for p in task.test], {}


def task_dir(tmp_path, n=3, with_bad=False, explode=False):
    d = tmp_path / "tasks"
    d.mkdir()
    for i in range(n):
        data = json.loads(json.dumps(GOOD))
        data["test"][0]["input"][0][0] = i
        if i == 0:   # this one's answer is its own input
            data["test"][0]["output"] = data["test"][0]["input"]
        write_task(d / f"task{i}.json", data)
    if with_bad:
        (d / "bad.json").write_text('{"train": [{"input": [[1, 2], [3]], "output": [[1]]}], "test": []}')
    if explode:
        write_task(d / "explode.json", GOOD)
    return d


def test_user_method_runs_and_failures_are_recorded_not_fatal(tmp_path):
    out = run(RunSpec(method="test_echo", dataset=str(task_dir(tmp_path, with_bad=True, explode=True)),
                      out=tmp_path / "run"), progress=False)
    records = {r["task_id"]: r for r in read_results(out / "results.jsonl")}
    assert set(records) == {"bad", "explode", "task0", "task1", "task2"}
    assert "ragged" in records["bad"]["error"] and "bad.json" in records["bad"]["error"]
    assert records["explode"]["error"] == "FloatingPointError: loss is nan"
    assert records["task0"]["correct"] == [True] and records["task1"]["correct"] == [False]
    submission = json.loads((out / "submission.json").read_text())
    assert set(submission) == set(records)
    assert submission["task0"][0]["attempt_1"] == [[0, 8], [9, 0]] and submission["task0"][0]["attempt_2"] == [[0]]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "test_echo" and manifest["finished"] and manifest["task_ids"] == sorted(records)


def test_rerun_skips_finished_tasks_and_refuses_other_settings(tmp_path):
    tasks = task_dir(tmp_path, n=4)
    spec = dict(method="test_echo", dataset=str(tasks), out=tmp_path / "run")
    first = run(RunSpec(**spec), progress=False)
    lines = (first / "results.jsonl").read_text().splitlines()
    run(RunSpec(**spec), progress=False)
    assert (first / "results.jsonl").read_text().splitlines() == lines
    with pytest.raises(RunError, match="different seed"):
        run(RunSpec(**spec, seed=1), progress=False)


def test_a_rerun_after_the_weights_changed_is_refused(tmp_path):
    from tta.model.loading import build_model, save_model
    model_dir = tmp_path / "model"
    save_model(*build_model("tiny", seed=0), model_dir)
    spec = dict(method="test_echo", dataset=str(task_dir(tmp_path, n=2)), model=str(model_dir), out=tmp_path / "run")
    out = run(RunSpec(**spec), progress=False)
    recorded = json.loads((out / "manifest.json").read_text())["model_sha256"]
    assert recorded and len(recorded) == 16
    run(RunSpec(**spec), progress=False)                  # same weights: resumes
    save_model(*build_model("tiny", seed=1), model_dir)   # retrained in place
    with pytest.raises(RunError, match="different model_sha256"):
        run(RunSpec(**spec), progress=False)


def test_torn_last_line_is_cut_and_the_task_redone(tmp_path):
    tasks = task_dir(tmp_path, n=3)
    spec = dict(method="test_echo", dataset=str(tasks), out=tmp_path / "run")
    out = run(RunSpec(**spec), progress=False)
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])
    run(RunSpec(**spec), progress=False)
    ids = [r["task_id"] for r in read_results(out / "results.jsonl")]
    assert sorted(ids) == ["task0", "task1", "task2"] and len(ids) == 3


def test_same_seed_same_attempts_with_a_real_method(tmp_path):
    common = dict(method="ttt_lora", dataset="gen-eval", limit=2, model="random:tiny", overrides=TTT_FAST)
    a = run(RunSpec(**common, out=tmp_path / "a"), progress=False)
    b = run(RunSpec(**common, out=tmp_path / "b"), progress=False)
    ra, rb = read_results(a / "results.jsonl"), read_results(b / "results.jsonl")
    assert [r["attempts"] for r in ra] == [r["attempts"] for r in rb]
    assert [r["metrics"]["nll"] for r in ra] == [r["metrics"]["nll"] for r in rb]
    assert all(r["error"] is None and r["flops"] > 0 for r in ra)
    assert all(r["extra"]["adapt"]["steps"] > 0 for r in ra)


def test_settings_are_typed_and_unknown_keys_refused():
    cls = get_method("ttt_lora")
    config = make_config(cls, ["lr=0.5", "epochs=3", 'targets=["q_proj"]'])
    assert config.lr == 0.5 and config.epochs == 3 and config.targets == ["q_proj"]
    with pytest.raises(MethodError, match="no setting 'learning_rate'"):
        make_config(cls, ["learning_rate=1"])
    with pytest.raises(MethodError, match="epochs=two"):
        make_config(cls, ["epochs=two"])
    with pytest.raises(MethodError, match="unknown method"):
        get_method("nope")
    assert get_method("test_runner:EchoInput") is EchoInput


def test_kill_mid_run_then_resume_gives_each_task_once(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tta.cli", "run", "--method", "ttt_lora", "--model", "random:tiny",
           "--dataset", "gen-eval", "--limit", "4", "--out", str(out), "--quiet"] + \
          [x for s in TTT_FAST for x in ("--set", s)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / "results.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (results.exists() and results.read_text().count("\n") >= 1):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(read_results(results))
    assert 1 <= done_before < 4
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ids = [r["task_id"] for r in read_results(results)]
    assert len(ids) == 4 and len(set(ids)) == 4


def test_a_second_run_into_a_directory_in_use_stops_before_writing(tmp_path):
    """Fails if two processes may append to one run directory (each task solved twice, duplicate
    records), or if a finished run leaves its directory claimed."""
    from tta.run.runner import LOCK_NAME, DirectoryClaim

    data = tmp_path / "data"
    data.mkdir()
    for name in ("a", "b"):
        write_task(data / f"{name}.json", GOOD)
    spec = RunSpec(method="copy_input", dataset=str(data), out=tmp_path / "r")
    out = run(spec, progress=False)
    assert not (out / LOCK_NAME).exists()
    (out / "results.jsonl").write_text((out / "results.jsonl").read_text().splitlines()[0] + "\n")   # one task left
    writer = DirectoryClaim(out)   # another process writing the run
    writer.take()
    try:
        with pytest.raises(RunError, match=f"{out}: another tta run is writing to this directory \\(pid {os.getpid()}\\)"):
            run(spec, progress=False)
        assert len(read_results(out / "results.jsonl")) == 1
    finally:
        writer.release()
    run(spec, progress=False)   # free again: the resume finishes the run
    assert sorted(r["task_id"] for r in read_results(out / "results.jsonl")) == ["a", "b"]


def test_a_resume_keeps_the_provenance_of_the_results_already_there(tmp_path):
    """Fails if passing over a finished run (as an experiment does with its finished cells)
    rewrites who produced it, or if a resume that does work replaces the first session's commit
    and command instead of adding its own."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a", "b"):
        write_task(data / f"{name}.json", GOOD)
    spec = RunSpec(method="copy_input", dataset=str(data), out=tmp_path / "r", command="tta run FIRST")
    out = run(spec, progress=False)
    manifest = out / "manifest.json"
    first = manifest.read_text()
    run(RunSpec(method="copy_input", dataset=str(data), out=out, command="tta experiment SECOND"), progress=False)
    assert manifest.read_text() == first   # nothing to do: untouched

    interrupted = json.loads(first) | {"finished": None, "git_commit": "abc123"}
    manifest.write_text(json.dumps(interrupted))
    (out / "results.jsonl").write_text((out / "results.jsonl").read_text().splitlines()[0] + "\n")
    run(RunSpec(method="copy_input", dataset=str(data), out=out, command="tta run THIRD"), progress=False)
    resumed = json.loads(manifest.read_text())
    assert (resumed["git_commit"], resumed["command"]) == ("abc123", "tta run FIRST")
    assert [(r["command"], r["tasks"]) for r in resumed["resumed"]] == [("tta run THIRD", 1)]
    assert resumed["finished"] and len(read_results(out / "results.jsonl")) == 2


@dataclass
class _GrownConfig:
    tries: int = setting(1, "an old setting")
    extra: bool = setting(False, "a setting added later, off by default: the old behaviour", before=False)
    changed: bool = setting(True, "a setting added later whose default changes what the method does", before=False)


@register("test_grown")
class GrownMethod(EchoInput):
    """A method that gained settings after a run of it was recorded."""
    Config = _GrownConfig


def test_a_run_resumes_after_the_method_gains_a_setting_only_at_its_old_behaviour(tmp_path):
    """Fails if a setting added since a run was recorded blocks its resume even at the value
    that reproduces the run's behaviour, or lets it resume at a value that changes it (the
    finished tasks and the rest would then come from different methods)."""
    data = task_dir(tmp_path)
    out = run(RunSpec(method="test_grown", dataset=str(data), out=tmp_path / "r", overrides=["changed=false"]),
              progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["config"]["extra"], manifest["config"]["changed"]   # as recorded before both existed
    manifest["finished"] = None
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "results.jsonl").write_text((out / "results.jsonl").read_text().splitlines()[0] + "\n")
    with pytest.raises(RunError, match=r"different config \(changed\)"):
        run(RunSpec(method="test_grown", dataset=str(data), out=out), progress=False)   # changed=true: not the old method
    run(RunSpec(method="test_grown", dataset=str(data), out=out, overrides=["changed=false"]), progress=False)
    resumed = json.loads((out / "manifest.json").read_text())
    assert resumed["finished"] and len(read_results(out / "results.jsonl")) == 3
    assert resumed["resumed"][-1]["settings_added"] == {"extra": False, "changed": False}
    with pytest.raises(RunError, match=r"different config \(extra\)"):
        run(RunSpec(method="test_grown", dataset=str(data), out=out, overrides=["changed=false", "extra=true"]),
            progress=False)


def test_a_setting_whose_old_behaviour_depends_on_the_budget_resumes_only_where_it_reproduces_it(tmp_path):
    """`views_seconds_share` changes nothing under a FLOP cap and keeps time under a seconds cap.
    Fails if a ttt_lora run recorded before it existed resumes under a seconds cap at today's
    default (its tasks would then split their time two ways), or is refused under a FLOP cap."""
    import dataclasses
    from methods.ttt_lora import TTTConfig
    from tta.method import get_method, make_config
    from tta.run.solve import check_resumable
    cls = get_method("ttt_lora")
    old_config = {k: v for k, v in dataclasses.asdict(make_config(cls, [])).items() if k != "views_seconds_share"}
    for budget, resumes_at in (({"flops": 5e11, "seconds": None}, 0.5), ({"flops": None, "seconds": 30.0}, 0.0)):
        recorded = {"method": "ttt_lora", "config": old_config, "budget": budget, "model": "default",
                    "model_sha256": "x", "dataset": "arc1-eval", "task_ids": ["a"], "seed": 0}
        for share in (0.0, 0.5):
            today = {**recorded, "config": dataclasses.asdict(make_config(cls, [f"views_seconds_share={share}"]))}
            if share == resumes_at:
                check_resumable(recorded, today, tmp_path, TTTConfig)
            else:
                with pytest.raises(RunError, match=r"different config \(views_seconds_share\)"):
                    check_resumable(recorded, today, tmp_path, TTTConfig)


def test_floors_need_no_model_and_score_as_expected(tmp_path):
    d = tmp_path / "floors"
    d.mkdir()
    same = {"train": [{"input": [[1]], "output": [[5, 5]]}, {"input": [[2]], "output": [[5, 5]]},
                      {"input": [[3]], "output": [[6]]}],
            "test": [{"input": [[4]], "output": [[5, 5]]}]}
    write_task(d / "constant.json", same)
    out = run(RunSpec(method="common_output", dataset=str(d), out=tmp_path / "c"), progress=False)
    record = read_results(out / "results.jsonl")[0]
    assert record["attempts"][0] == [[[5, 5]], [[6]]] and record["correct"] == [True]
    out = run(RunSpec(method="copy_input", dataset=str(d), out=tmp_path / "k"), progress=False)
    record = read_results(out / "results.jsonl")[0]
    assert record["attempts"][0][0] == [[4]] and record["correct"] == [False]
    assert record["metrics"]["shape_ok"] == [False] and record["metrics"]["nll"] == [None]


def test_threads_follow_the_cores_this_process_may_use(monkeypatch):
    import torch
    from tta import threads as models
    if not hasattr(models.os, "sched_getaffinity"):
        pytest.fail("this platform has no sched_getaffinity; the test needs Linux")
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(models.os, "sched_getaffinity", lambda pid: {0})   # one usable core of many
    monkeypatch.setattr(models.os, "cpu_count", lambda: 64)
    try:
        models.set_threads()
        assert models.usable_cpus() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_threads_default_to_a_containers_cpu_quota_and_follow_the_flag(tmp_path, monkeypatch):
    """Fails if a cgroup quota (v2 or v1) is ignored, if --threads does not reach torch, or if the
    run does not record how many threads it used."""
    import torch
    from tta import threads
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)))
    (tmp_path / "cpu.max").write_text("150000 100000\n")          # v2: 1.5 cores
    assert threads.cpu_quota(tmp_path) == 1.5 and threads.default_threads(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")             # v2: no quota
    assert threads.cpu_quota(tmp_path) is None and threads.default_threads(tmp_path) == 8
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000")  # v1: 3 cores
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert threads.default_threads(tmp_path) == 3

    before = torch.get_num_threads()
    try:
        out = tmp_path / "r"
        result = CliRunner().invoke(main, ["run", "--method", "copy_input", "--dataset", "gen-eval", "--limit", "1",
                                           "--threads", "1", "--out", str(out), "--quiet"])
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1
        assert json.loads((out / "manifest.json").read_text())["threads"] == 1
    finally:
        threads.choose_threads(None)
        torch.set_num_threads(before)


@pytest.mark.parametrize("plan_runs", ["arc1_eval_4e12", "arc1_eval_4e12_seed1"])
def test_the_committed_study_runs_still_resume_under_todays_defaults(plan_runs):
    """Fails if a setting added to a method since the study ran lacks the `before` value that
    reproduces the run: `tta experiment` on the study's plan would then refuse its own finished
    cells as a different config instead of skipping them (as `members`, `adapter` and `lr_full`
    did for the 4e12 study's ttt_full run until they declared it)."""
    import dataclasses
    from tta.method import discover, get_method, make_config
    from tta.run.solve import check_resumable
    discover()
    root = Path(__file__).resolve().parent.parent / "reports" / "runs" / plan_runs
    manifests = sorted(root.glob("*/manifest.json"))
    assert manifests, f"no committed run directories under {root}"
    for path in manifests:
        recorded = json.loads(path.read_text())
        cls = get_method(recorded["method"])
        today = {**recorded, "config": dataclasses.asdict(make_config(cls, []))}   # the plans set nothing
        check_resumable(recorded, today, path.parent, cls.Config)


def test_each_session_records_when_its_last_result_landed(tmp_path):
    """Fails if a session stopped by a signal leaves no record of its end (the run's wall time is
    then unknown), or if a resume's results overwrite the first session's end."""
    from tta.run.record import wall_seconds

    data = tmp_path / "data"
    data.mkdir()
    for name in ("a", "b"):
        write_task(data / f"{name}.json", GOOD)
    out = run(RunSpec(method="copy_input", dataset=str(data), out=tmp_path / "r"), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["started"] <= manifest["last_result"] <= manifest["finished"]

    stopped = manifest | {"finished": None, "started": "2025-01-01T00:00:00", "last_result": "2025-01-01T00:07:00"}
    (out / "manifest.json").write_text(json.dumps(stopped))   # as a SIGTERM leaves it
    (out / "results.jsonl").write_text((out / "results.jsonl").read_text().splitlines()[0] + "\n")
    run(RunSpec(method="copy_input", dataset=str(data), out=out), progress=False)
    resumed = json.loads((out / "manifest.json").read_text())
    assert resumed["last_result"] == "2025-01-01T00:07:00"
    session = resumed["resumed"][0]
    assert session["started"] <= session["last_result"] <= resumed["finished"]
    assert wall_seconds(resumed) == pytest.approx(420, abs=60)   # 7 min, plus this test's second or so


@pytest.mark.parametrize("change, needle, workers", [
    ("next(self.lm.model.parameters()).add_(0.01)", "1 of", 1),                        # trained, never restored
    ("self.lm.model.leftover = torch.nn.Parameter(torch.zeros(2))", "1 weight tensors added", 1),   # an adapter left attached
    # an activation swapped (no weight moves), never swapped back
    ("self.lm.model.model.layers[0].mlp.act_fn = torch.nn.ReLU()", "layers.0.mlp.act_fn is a ReLU, not the", 1),
    # two workers, each kept busy long enough that both take a task: the second worker's is not lost
    # when the first worker's stop comes in
    ("time.sleep(1.5); next(self.lm.model.parameters()).add_(0.01)", "1 of", 2),
])
def test_a_method_whose_reset_leaves_the_model_changed_stops_the_run_after_that_task(tmp_path, change, needle, workers):
    (tmp_path / "leaky.py").write_text(
        "import time, torch\nfrom tta.method import Method\n\nclass Leaky(Method):\n"
        "    def adapt(self, task, budget, seed):\n        with torch.no_grad():\n"
        f"            {change}\n        return {{}}\n\n"
        "    def predict(self, task, budget, seed):\n        return [[p.input, None] for p in task.test], {}\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name in ("a", "b", "c"):
        write_task(tasks / f"{name}.json", GOOD)
    result = CliRunner().invoke(main, ["run", "--method", f"{tmp_path / 'leaky.py'}:Leaky", "--model", "random:tiny",
                                       "--dataset", str(tasks), "--out", str(tmp_path / "r"), "--quiet",
                                       "--workers", str(workers)])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert re.search(r"after task [ab] the model was not the base model", errors[0]) and needle in errors[0]
    # the answers of every task that finished stand: with two workers, each worker's first task
    expected = ["a"] if workers == 1 else ["a", "b"]
    assert sorted(r["task_id"] for r in read_results(tmp_path / "r" / "results.jsonl")) == expected


def what_three_tasks_saw(tmp_path, method: str) -> list[dict]:
    """Run a plugin in `tmp_path` (FILE:Class) over three tasks; each task's predict record."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name in ("a", "b", "c"):
        write_task(tasks / f"{name}.json", GOOD)
    result = CliRunner().invoke(main, ["run", "--method", str(tmp_path / method), "--model", "random:tiny",
                                       "--dataset", str(tasks), "--out", str(tmp_path / "r"), "--quiet"])
    assert result.exit_code == 0, result.output
    return [r["extra"]["predict"] for r in read_results(tmp_path / "r" / "results.jsonl")]


def test_every_task_starts_in_the_base_models_modes(tmp_path):
    """A method may leave the model in train mode or its weights learning (neither changes a
    weight, so the weights check passes).  Fails if the next task then starts that way: decoding
    with dropout, and backward passes charged for weights it never meant to train."""
    (tmp_path / "modes.py").write_text(
        "from tta.method import Method\n\nclass Modes(Method):\n"
        "    def predict(self, task, budget, seed):\n"
        "        model = self.lm.model\n"
        "        seen = {'training': model.training, 'learning': sum(p.requires_grad for p in model.parameters())}\n"
        "        model.train()\n        model.requires_grad_(not next(model.parameters()).requires_grad)\n"
        "        return [[p.input, None] for p in task.test], seen\n")
    seen = what_three_tasks_saw(tmp_path, "modes.py:Modes")
    assert seen == [seen[0]] * 3 and seen[0]["training"] is False   # each task as the first found it


def test_buffers_config_and_hooks_a_task_leaves_are_put_back(tmp_path):
    """A method that rescales the rotary frequencies (a buffer, not a weight: position
    interpolation), sets config fields or adds a steering hook in one task and never undoes it
    decoded every later task with the change, and the weights check passed.  Fails if the next
    task sees the change: a buffer changed in place or replaced, a config field changed or added,
    a module's forward hook or a weight's gradient hook left behind, a module's forward patched."""
    (tmp_path / "stretch.py").write_text(
        "import torch\nfrom tta.method import Method\n\nclass Stretch(Method):\n"
        "    def predict(self, task, budget, seed):\n"
        "        model, config = self.lm.model, self.lm.model.config\n"
        "        buffers, embeddings = dict(model.named_buffers()), model.get_input_embeddings()\n"
        "        weight = next(model.parameters())\n"
        "        seen = {'buffers': {n: b.sum().item() for n, b in buffers.items()}, 'use_cache': config.use_cache,\n"
        "                'added': hasattr(config, 'stretched'), 'hooks': len(embeddings._forward_hooks),\n"
        "                'gradient hooks': len(weight._backward_hooks or {}), 'patched': 'forward' in vars(embeddings)}\n"
        "        first, *rest = buffers\n"
        "        with torch.no_grad():\n"
        "            buffers[first].mul_(0.5)\n"
        "            for name in rest:\n"
        "                owner, _, leaf = name.rpartition('.')\n"
        "                model.get_submodule(owner).register_buffer(leaf, torch.zeros(3))\n"
        "        config.use_cache, config.stretched = not config.use_cache, True\n"
        "        embeddings.register_forward_hook(lambda module, args, out: out * 1.5)\n"
        "        weight.register_hook(lambda grad: grad * 0)\n"
        "        embeddings.forward = lambda ids, forward=embeddings.forward: forward(ids) * 2\n"
        "        return [[p.input, None] for p in task.test], seen\n")
    seen = what_three_tasks_saw(tmp_path, "stretch.py:Stretch")
    assert len(seen[0]["buffers"]) >= 2 and not seen[0]["added"], seen[0]   # the tiny model's rotary frequencies
    assert seen[0]["hooks"] == seen[0]["gradient hooks"] == 0 and not seen[0]["patched"]
    assert seen == [seen[0]] * 3


def test_module_settings_and_the_loaded_models_fields_a_task_leaves_are_put_back(tmp_path):
    """Fails if the next task sees what this one changed outside weights, buffers' values and
    config fields: an attention's `scaling` halved (each task saw half the last's), a flag
    (`gradient_checkpointing`), an attribute or a buffer added, the model's config replaced, an
    activation swapped for one of its own class with another slope, the format's
    `grid_positions`, the loaded model's `spec`, a token added to the tokenizer and its
    `padding_side` changed (put back in the same tokenizer object)."""
    (tmp_path / "settings.py").write_text(
        "import copy, torch\nfrom tta.method import Method\n\nclass Settings(Method):\n"
        "    def predict(self, task, budget, seed):\n"
        "        lm, model = self.lm, self.lm.model\n"
        "        layer = model.model.layers[0]\n"
        "        attention, mlp = layer.self_attn, layer.mlp\n"
        "        seen = {'scaling': attention.scaling, 'checkpointing': model.model.gradient_checkpointing,\n"
        "                'added': hasattr(attention, 'temperature'), 'buffers': sorted(dict(model.named_buffers())),\n"
        "                'shared config': model.config is attention.config, 'act': repr(mlp.act_fn),\n"
        "                'grid positions': lm.format.grid_positions, 'spec': lm.spec,\n"
        "                'tokens': len(lm.tokenizer), 'padding': lm.tokenizer.padding_side, 'tokenizer': id(lm.tokenizer)}\n"
        "        attention.scaling *= 0.5\n"
        "        model.model.gradient_checkpointing = not model.model.gradient_checkpointing\n"
        "        attention.temperature = 2.0\n"
        "        attention.register_buffer('mask', torch.ones(2), persistent=False)\n"
        "        model.config = copy.deepcopy(model.config)\n"
        "        if isinstance(mlp.act_fn, torch.nn.LeakyReLU):\n"
        "            mlp.act_fn = torch.nn.LeakyReLU(mlp.act_fn.negative_slope * 2)\n"
        "        else:\n"
        "            mlp.act_fn.extra = 1\n"
        "        lm.format.grid_positions = not lm.format.grid_positions\n"
        "        lm.spec += '!'\n"
        "        lm.tokenizer.add_tokens([f'<t{len(lm.tokenizer)}>'])\n"
        "        lm.tokenizer.padding_side = 'left' if lm.tokenizer.padding_side == 'right' else 'right'\n"
        "        return [[p.input, None] for p in task.test], seen\n\n"
        "    def setup(self, tasks):   # a same-class swap needs a module with a setting: a LeakyReLU, for all tasks\n"
        "        for layer in self.lm.model.model.layers:\n"
        "            layer.mlp.act_fn = torch.nn.LeakyReLU(0.1)\n")
    seen = what_three_tasks_saw(tmp_path, "settings.py:Settings")
    assert seen[0]["scaling"] > 0 and not seen[0]["checkpointing"] and not seen[0]["added"], seen[0]
    assert seen[0]["shared config"] and seen[0]["grid positions"] and seen[0]["spec"] == "random:tiny"
    assert "mask" not in " ".join(seen[0]["buffers"]) and seen[0]["act"] == "LeakyReLU(negative_slope=0.1)"
    assert seen == [seen[0]] * 3


THREADED = (
    "import pathlib, subprocess, sys, tempfile, threading, time, torch\nfrom concurrent.futures import ThreadPoolExecutor\n"
    "from dataclasses import dataclass\nfrom tta.method import Method\n\n"
    "@dataclass\nclass Leave:\n    leave: str = ''\n\n"
    "class Threaded(Method):\n"
    "    Config, pool = Leave, None\n\n"
    "    def forwards(self, seconds):\n"
    "        ids, end = torch.ones(1, 32, dtype=torch.long), time.time() + seconds\n"
    "        with torch.no_grad():\n"
    "            while time.time() < end:\n"
    "                self.lm.model(input_ids=ids)\n\n"
    "    def predict(self, task, budget, seed):\n"
    "        if self.config.leave == 'thread':   # fire and forget: still computing when the task ends\n"
    "            threading.Thread(target=self.forwards, args=(3,), daemon=True).start()\n"
    "        elif self.config.leave == 'process':   # a child, never waited for, idle while its own child computes\n"
    "            busy = 'import time\\nt = time.time()\\nwhile time.time() - t < 1.5: pass'\n"
    "            started = pathlib.Path(tempfile.mkdtemp()) / 'grandchild'\n"
    "            subprocess.Popen([sys.executable, '-c', 'import subprocess, sys, pathlib\\n'\n"
    "                              f'child = subprocess.Popen([sys.executable, \"-c\", {busy!r}])\\n'\n"
    "                              f'pathlib.Path({str(started)!r}).write_text(str(child.pid))\\nchild.wait()'])\n"
    "            while not started.exists():\n                time.sleep(0.01)\n"
    "            time.sleep(0.2)   # the child's own start-up over: only the grandchild computes\n"
    "        else:   # a pool kept for later tasks: its threads wait, idle, between tasks\n"
    "            self.pool = self.pool or ThreadPoolExecutor(2)\n"
    "            self.pool.submit(self.forwards, 0.2).result()\n"
    "        return [[p.input, None] for p in task.test], {}\n")


def test_a_thread_or_process_a_task_leaves_computing_fails_that_task_and_stops_the_run(tmp_path):
    """A method whose thread ran forwards after `predict` returned had each task charged 0 FLOPs,
    and the run's exit aborted in torch (code 134).  Fails if that task's record stands, if the
    run goes on to the next task, if the exit is not the one-line error with code 2, if a child
    process left computing goes unseen (here a grandchild, its parent idle), or if a method's idle pool threads, kept between tasks,
    are taken for work left running (their forwards, inside the task, are charged to it)."""
    (tmp_path / "threaded.py").write_text(THREADED)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name in ("a", "b", "c"):
        write_task(tasks / f"{name}.json", GOOD)
    command = [sys.executable, "-m", "tta.cli", "run", "--method", f"{tmp_path / 'threaded.py'}:Threaded",
               "--model", "random:tiny", "--dataset", str(tasks), "--quiet", "--workers", "1"]
    left = subprocess.run(command + ["--out", str(tmp_path / "thread"), "--set", "leave=thread"],
                          capture_output=True, text=True, timeout=300)
    errors = [line for line in left.stderr.splitlines() if line.startswith("error")]
    assert left.returncode == 2 and len(errors) == 1 and "terminate" not in left.stderr, left.stderr
    assert "left 1 thread(s) or process(es) computing after the task ended (Thread-" in errors[0]
    assert "stops after task a" in errors[0]
    [record] = read_results(tmp_path / "thread" / "results.jsonl")
    assert record["task_id"] == "a" and record["error"].startswith("ThreadsLeftWorking")
    process = CliRunner().invoke(main, command[3:] + ["--out", str(tmp_path / "process"), "--set", "leave=process"])
    assert process.exit_code == 2 and "computing after the task ended (process " in process.output, process.output
    assert [r["task_id"] for r in read_results(tmp_path / "process" / "results.jsonl")] == ["a"]
    pooled = CliRunner().invoke(main, command[3:] + ["--out", str(tmp_path / "pooled")])
    assert pooled.exit_code == 0, pooled.output
    records = read_results(tmp_path / "pooled" / "results.jsonl")
    assert len(records) == 3 and all(r["error"] is None and r["flops"] > 0 for r in records)


def test_torch_settings_a_task_changes_by_a_plain_call_are_put_back(tmp_path):
    """Fails if a method's `torch.set_grad_enabled(False)`, float64 default dtype, thread count or
    anomaly detection, set by a plain call in one task, reach the next task."""
    (tmp_path / "global.py").write_text(
        "import torch\nfrom tta.method import Method\n\nclass Global(Method):\n"
        "    def predict(self, task, budget, seed):\n"
        "        seen = {'grad': torch.is_grad_enabled(), 'dtype': str(torch.get_default_dtype()),\n"
        "                'threads': torch.get_num_threads(), 'anomaly': torch.is_anomaly_enabled()}\n"
        "        torch.set_grad_enabled(False)\n        torch.set_default_dtype(torch.float64)\n"
        "        torch.set_num_threads(torch.get_num_threads() + 1)\n        torch.set_anomaly_enabled(True)\n"
        "        return [[p.input, None] for p in task.test], seen\n")
    seen = what_three_tasks_saw(tmp_path, "global.py:Global")
    assert seen == [seen[0]] * 3 and seen[0]["grad"] is True and seen[0]["dtype"] == "torch.float32"
    assert torch.get_default_dtype() == torch.float32 and torch.is_grad_enabled()


def test_work_the_meter_cannot_see_still_shows_in_cpu_seconds(tmp_path):
    """Fails if the record's CPU seconds miss a method's NumPy work or its child processes (the
    check that points to compute beside the counted FLOPs), or count the harness's own grading."""
    (tmp_path / "numpy_work.py").write_text(
        "import subprocess, sys, time\nimport numpy as np\nfrom tta.method import Method\n\n"
        "class NumpyWork(Method):\n    needs_model = False\n\n"
        "    def predict(self, task, budget, seed):\n"
        "        a, started = np.random.rand(200, 200), time.process_time()\n"
        "        while time.process_time() - started < 0.3:\n            a @ a\n"
        "        subprocess.run([sys.executable, '-c', 'import time\\nt = time.process_time()\\n"
        "while time.process_time() - t < 0.3: pass'], check=True)\n"
        "        return [[p.input, None] for p in task.test], {}\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks / "a.json", GOOD)
    result = CliRunner().invoke(main, ["run", "--method", f"{tmp_path / 'numpy_work.py'}:NumpyWork",
                                       "--dataset", str(tasks), "--out", str(tmp_path / "r"), "--quiet"])
    assert result.exit_code == 0, result.output
    [record] = read_results(tmp_path / "r" / "results.jsonl")
    assert record["flops"] == 0 and record["cpu_seconds"] >= 0.6


def test_a_method_that_changes_its_tasks_grids_in_place_changes_only_its_own_copy(tmp_path):
    """Fails if the method's tasks share their grids with the harness's: zeroing the
    demonstrations in `setup` and the test inputs in `predict` (in-place augmentation) then
    changed the prompts the true-answer NLL is measured with, and what the next task saw."""
    (tmp_path / "grids.py").write_text(
        "from tta.method import Method\n\nclass Honest(Method):\n"
        "    def predict(self, task, budget, seed):\n"
        "        seen = int(sum(p.input.sum() + p.output.sum() for p in task.train))\n"
        "        answers = [[p.input.copy(), None] for p in task.test]\n"
        "        self.change(task)\n"
        "        return answers, {'demonstration_cells': seen}\n\n"
        "    def change(self, task):\n        pass\n\n"
        "class InPlace(Honest):\n"
        "    def setup(self, tasks):\n"
        "        for task in tasks:\n"
        "            for p in task.train:\n                p.input[...] = 0\n                p.output[...] = 0\n"
        "        return {}\n\n"
        "    def change(self, task):\n"
        "        for p in task.test:\n            p.input[...] = 0\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for i in range(3):
        data = json.loads(json.dumps(GOOD))
        data["test"][0]["input"][0][0] = i + 1
        write_task(tasks / f"t{i}.json", data)
    records = {}
    for cls in ("Honest", "InPlace"):
        result = CliRunner().invoke(main, ["run", "--method", f"{tmp_path / 'grids.py'}:{cls}", "--model", "random:tiny",
                                           "--dataset", str(tasks), "--out", str(tmp_path / cls), "--quiet"])
        assert result.exit_code == 0, result.output
        records[cls] = [(r["extra"]["predict"], r["metrics"]) for r in read_results(tmp_path / cls / "results.jsonl")]
    assert records["InPlace"] == records["Honest"] and records["Honest"][0][0]["demonstration_cells"] > 0


def test_the_compute_a_method_spends_in_setup_is_measured_and_recorded_as_the_runs_one_off_cost(tmp_path):
    """Fails if only the method's own word about its setup is recorded: a plugin that ran the
    model over every task's demonstrations in `setup` (transductive training does) and said
    nothing, or said less, showed no one-off cost, and its reported spend per task was too low."""
    (tmp_path / "setup_work.py").write_text(
        "import torch\nfrom tta.method import Method\n\nclass SetupWork(Method):\n"
        "    said = None\n\n"
        "    def setup(self, tasks):\n"
        "        with torch.no_grad():\n"
        "            for _ in tasks:\n"
        "                self.lm.model(input_ids=torch.ones(1, 32, dtype=torch.long))\n"
        "        torch.ones(64, 64) @ torch.ones(64, 64)\n"
        "        return None if self.said is None else {'flops': self.said}\n\n"
        "    def predict(self, task, budget, seed):\n"
        "        return [[p.input, None] for p in task.test], {}\n\n"
        "class SaysLess(SetupWork):\n    said = 1.0\n\n"
        "class SaysMore(SetupWork):\n    said = 1e15\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name in ("a", "b", "c"):
        write_task(tasks / f"{name}.json", GOOD)
    one_offs = {}
    for cls in ("SetupWork", "SaysLess", "SaysMore"):
        result = CliRunner().invoke(main, ["run", "--method", f"{tmp_path / 'setup_work.py'}:{cls}", "--model", "random:tiny",
                                           "--dataset", str(tasks), "--out", str(tmp_path / cls), "--quiet"])
        assert result.exit_code == 0, result.output
        one_offs[cls] = json.loads((tmp_path / cls / "manifest.json").read_text())["one_off"]
    measured = one_offs["SetupWork"]["flops"]
    from tta.budget import forward_flops, attention_context, model_shape
    from tta.model.loading import load_model
    forward = forward_flops(model_shape(load_model("random:tiny", device="cpu").model), 32, attention_context(0, 32))
    assert measured == pytest.approx(3 * forward + 2 * 64 ** 3) and one_offs["SetupWork"]["flops_measured"] == measured
    assert one_offs["SaysLess"]["flops"] == measured   # never less than was measured
    assert one_offs["SaysMore"]["flops"] == 1e15 and one_offs["SaysMore"]["flops_measured"] == measured
    assert one_offs["SetupWork"]["cpu_seconds"] > 0


def test_the_work_a_method_does_in_reset_is_charged_to_its_task(tmp_path):
    """Fails if the spend is read before `reset` runs: model forwards there (work for a later
    task, say) were free."""
    (tmp_path / "reset_work.py").write_text(
        "import torch\nfrom tta.method import Method\n\nclass ResetWork(Method):\n"
        "    def predict(self, task, budget, seed):\n"
        "        return [[p.input, None] for p in task.test], {}\n\n"
        "    def reset(self):\n"
        "        with torch.no_grad():\n"
        "            for _ in range(2):\n"
        "                self.lm.model(input_ids=torch.ones(1, 16, dtype=torch.long))\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks / "a.json", GOOD)
    result = CliRunner().invoke(main, ["run", "--method", f"{tmp_path / 'reset_work.py'}:ResetWork", "--model", "random:tiny",
                                       "--dataset", str(tasks), "--out", str(tmp_path / "r"), "--budget-flops", "1e9", "--quiet"])
    assert result.exit_code == 0, result.output
    from tta.budget import forward_flops, attention_context, model_shape
    from tta.model.loading import load_model
    forward = forward_flops(model_shape(load_model("random:tiny", device="cpu").model), 16, attention_context(0, 16))
    (record,) = read_results(tmp_path / "r" / "results.jsonl")
    assert record["flops"] == pytest.approx(2 * forward) and record["budget_share"] == pytest.approx(2 * forward / 1e9, abs=1e-4)


def test_results_are_strict_json_when_a_method_records_a_nan(tmp_path):
    """Fails if a non-finite number is written as Python's NaN/Infinity: jq and other strict
    readers then refuse the whole results.jsonl."""
    (tmp_path / "nan.py").write_text(
        "from tta.method import Method\n\nclass NaN(Method):\n    needs_model = False\n\n"
        "    def predict(self, task, budget, seed):\n"
        "        return [[p.input, None] for p in task.test], {'loss': float('nan'), 'curve': [0.5, float('inf')]}\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks / "a.json", GOOD)
    result = CliRunner().invoke(main, ["run", "--method", f"{tmp_path / 'nan.py'}:NaN", "--dataset", str(tasks),
                                       "--out", str(tmp_path / "r"), "--quiet"])
    assert result.exit_code == 0, result.output

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    (line,) = (tmp_path / "r" / "results.jsonl").read_text().splitlines()
    record = json.loads(line, parse_constant=refuse)
    assert record["extra"]["predict"] == {"loss": None, "curve": [0.5, None]}
