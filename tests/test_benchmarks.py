"""The prepared device check runs green on the CPU at CI size, so it works the day a GPU is lent."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_green_on_the_cpu(tmp_path):
    """Fails if any built-in method fails through `tta run --device cpu`, if the start-up stages
    or the decode-sync count are missing, or if the TTT MFU figure cannot be computed."""
    out = tmp_path / "check"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu",
                           "--model", "random:tiny", "--tasks", "1", "--budget", "1e9", "--ttt-size", "tiny",
                           "--ttt-steps", "2", "--method-limit", "240", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert {"import torch", "cpu context", "first bf16 matmul", "model load"} <= set(summary["stages_s"])
    assert {"icl", "ttt_lora", "ttt_full", "less", "sampling", "copy_input"} <= set(summary["methods"])
    assert all(r["tasks"] == 1 and r["errors"] == 0 for r in summary["methods"].values())
    assert summary["syncs_per_decode_step"] and max(summary["syncs_per_decode_step"]) <= 1
    assert 0 < summary["ttt"]["mfu"] < 1.5 and summary["decoding"]["batched_tokens_per_s"] > 0
