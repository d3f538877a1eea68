import json

import pytest

from tta.experiment import run_experiment
from tta.runner import RunError, RunSpec, merge, read_results, run


def test_experiment_runs_every_cell_resumes_and_reports(tmp_path):
    plan = tmp_path / "tiny.toml"
    plan.write_text('name = "tiny"\ndataset = "gen-eval"\nlimit = 4\nbudgets = ["none", 1e9]\nseeds = [0, 1]\n'
                    'baseline = "copy_input"\n[methods.copy_input]\n[methods.common_output]\n')
    report = run_experiment(plan, tmp_path / "runs", tmp_path / "reports", progress=False, log=lambda _: None)
    cells = sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir())
    assert cells == sorted(f"{m}-{b}-seed{s}" for m in ("copy_input", "common_output")
                           for b in ("uncapped", "f1e09") for s in (0, 1))
    text = report.read_text()
    assert "common_output-f1e09-seed1" in text and "runs differ in budget" in text
    first = (tmp_path / "runs" / "tiny" / "copy_input-uncapped-seed0" / "results.jsonl").read_text()
    run_experiment(plan, tmp_path / "runs", tmp_path / "reports", progress=False, log=lambda _: None)
    assert (tmp_path / "runs" / "tiny" / "copy_input-uncapped-seed0" / "results.jsonl").read_text() == first


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


def test_sharded_runs_merged_equal_the_unsharded_run(tmp_path):
    common = dict(method="icl", dataset="gen-eval", limit=5, model="random:tiny",
                  overrides=['transforms=["identity"]', "orders=1"])
    whole = run(RunSpec(**common, out=tmp_path / "whole"), progress=False)
    shards = [run(RunSpec(**common, shard=(i, 2), out=tmp_path / f"s{i}"), progress=False) for i in range(2)]
    assert len(read_results(shards[0] / "results.jsonl")) == 3
    merged = merge(shards, tmp_path / "merged")
    strip = lambda rs: [(r["task_id"], r["attempts"], r["correct"], r["metrics"]) for r in rs]
    assert strip(read_results(merged / "results.jsonl")) == strip(read_results(whole / "results.jsonl"))
    assert json.loads((merged / "submission.json").read_text()) == json.loads((whole / "submission.json").read_text())
    assert json.loads((merged / "manifest.json").read_text())["config_hash"] == \
        json.loads((whole / "manifest.json").read_text())["config_hash"]
    with pytest.raises(RunError, match="shards overlap"):
        merge([shards[0], shards[0]], tmp_path / "twice")
    with pytest.raises(RunError, match="not shards 0..n-1"):
        merge([shards[1]], tmp_path / "half")


def test_gpu_benchmark_smoke_runs_on_the_cpu_at_tiny_size():
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).parent.parent / "benchmarks" / "gpu_ttt.py"
    out = subprocess.run([sys.executable, str(script), "--size", "tiny", "--steps", "3"], capture_output=True,
                         text=True, timeout=300, env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "MFU" in out.stdout and "TTT: 3 steps" in out.stdout
