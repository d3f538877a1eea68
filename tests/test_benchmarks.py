"""The prepared device check runs green on the CPU at CI size, so it works the day a GPU is lent."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_green_on_the_cpu(tmp_path):
    """Fails if a method fails through the script's `tta run --device cpu`, if the start-up stages
    or the decode-sync count are missing, or if the TTT MFU figure cannot be computed.  Three
    methods, not all seven (each is a fresh process, about 8 s of start-up here): one without a
    model, one that trains, and sampling's own decoder.  The others run through the same runner in
    other tests (ttt_lora killed and resumed in tests/test_runner.py, less in tests/test_less.py, icl on
    two workers in tests/test_worker_processes.py)."""
    out = tmp_path / "check"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu",
                           "--model", "random:tiny", "--tasks", "1", "--budget", "1e9", "--ttt-size", "tiny",
                           "--ttt-steps", "2", "--method-limit", "240",
                           "--methods", "copy_input,ttt_full,sampling", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert {"import torch", "cpu context", "first bf16 matmul", "model load"} <= set(summary["stages_s"])
    assert set(summary["methods"]) == {"ttt_full", "sampling", "copy_input"}
    assert all(r["tasks"] == 1 and r["errors"] == 0 for r in summary["methods"].values())
    assert summary["syncs_per_decode_step"] and max(summary["syncs_per_decode_step"]) <= 1
    assert 0 < summary["ttt"]["mfu"] < 1.5 and summary["decoding"]["batched_tokens_per_s"] > 0
