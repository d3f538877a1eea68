"""The device path end to end, in one prepared run (about 5 minutes on one GPU):

1. start-up stages, timestamped: import torch, the device context, the first bf16 matmul,
   import tta, the model load;
2. every built-in method through `tta run --device D` on a few gen-eval tasks: seconds per task
   and whether it finished (a run past its limit has its stacks dumped to its log);
3. host syncs per decode step (reads of device values between two forwards; aim: 1);
4. batched augmented decoding against one `generate()` per view, tokens/s;
5. the TTT training step of a randomly initialised ~1B Llama (`--ttt-size 1b`) with MFU against
   the measured matmul rate in the dtype the model computes in (bf16; aim: 40% on a GPU).

On a GPU:   python benchmarks/gpu_check.py --device cuda --out benchmarks/results/gpu_check
On the CPU, CI-sized (tests/test_benchmarks.py runs this, so the script cannot rot):
            python benchmarks/gpu_check.py --device cpu --model random:tiny --tasks 1 --ttt-size tiny \
                --budget 1e9 --method-limit 120
Prints a summary and writes summary.json plus one log per method under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))


def stamp(stages: dict, name: str) -> None:
    stages[name] = round(time.perf_counter() - STARTED, 3)
    print(f"[{stages[name]:8.2f} s] {name}", flush=True)


def sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def start_up(device_name: str, model: str, stages: dict):
    import torch
    stamp(stages, "import torch")
    device = torch.device(device_name)
    torch.empty(1, device=device)
    sync(device)
    stamp(stages, f"{device.type} context")
    # On a CPU without native bf16 matmuls (AVX2 only) a 1024^3 one takes ~3 s: a smaller one
    # shows the same start-up there.
    n = 1024 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    (a @ a).sum().item()
    stamp(stages, "first bf16 matmul")
    from tta.model.loading import load_model  # noqa: F401
    stamp(stages, "import tta")
    lm = load_model(model, device=device_name)
    sync(device)
    stamp(stages, "model load")
    return lm


METHOD_RUNNER = ("import faulthandler, signal, sys; faulthandler.register(signal.SIGTERM, all_threads=True, chain=True); "
                 "sys.argv[0] = 'tta'; from tta.cli import entry; entry()")


def run_methods(args, out: Path) -> dict:
    """Each built-in method through the command line, as a user runs it."""
    from tta.method import REGISTRY, discover
    discover()
    results = {}
    runs = Path(tempfile.mkdtemp(prefix="gpu_check_runs_"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    names = sorted(REGISTRY) if args.methods is None else args.methods.split(",")
    unknown = [name for name in names if name not in REGISTRY]
    if unknown:
        sys.exit(f"gpu_check.py: --methods: no method {', '.join(unknown)} (built in: {', '.join(sorted(REGISTRY))})")
    for name in names:
        log = out / f"{name}.log"
        command = [sys.executable, "-X", "faulthandler", "-c", METHOD_RUNNER, "run", "--method", name,
                   "--dataset", "gen-eval", "--sample", str(args.tasks), "--budget-flops", str(args.budget),
                   "--device", args.device, "--model", args.model, "--out", str(runs / name), "--quiet"]
        started = time.perf_counter()
        with open(log, "w") as f:
            try:
                code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                      timeout=args.method_limit).returncode
            except subprocess.TimeoutExpired:
                code = "timeout (stacks in the log)"
        wall = time.perf_counter() - started
        records = [json.loads(line) for line in (runs / name / "results.jsonl").read_text().splitlines()] \
            if (runs / name / "results.jsonl").exists() else []
        per_task = [r["seconds"] for r in records]
        results[name] = {"exit": code, "wall_s": round(wall, 1), "tasks": len(records),
                         "errors": sum(r["error"] is not None for r in records),
                         "s_per_task": round(sum(per_task) / len(per_task), 2) if per_task else None}
        print(f"  {name:14s} exit {code}  {len(records)} tasks  {results[name]['s_per_task']} s/task  "
              f"({wall:.0f} s with start-up)", flush=True)
    return results


VALUE_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")


def syncs_per_decode_step(lm) -> list[int]:
    """Reads of tensor values back to the host between consecutive decode forwards (the prompts'
    read, then each step, through the model's forward or the fast decoder), meter attached."""
    import torch
    from tta.budget import Budget, Meter
    from tta.inference import decoding
    reads, saved, marks = [], {}, []
    for name in VALUE_READS:
        original = saved[(torch.Tensor, name)] = getattr(torch.Tensor, name)
        setattr(torch.Tensor, name, lambda self, *a, _o=original, **k: (reads.append(1), _o(self, *a, **k))[1])
    for steps in (decoding.ForwardSteps, decoding.FastSteps):
        for name in ("read_prompts", "step"):
            original = saved[(steps, name)] = getattr(steps, name)
            setattr(steps, name, lambda self, *a, _o=original: (marks.append(len(reads)), _o(self, *a))[1])
    meter = Meter(Budget(flops=1e18))
    meter.attach(lm.model)
    try:
        decoding.generate(lm, [[1] + [5] * 40, [1] + [6] * 25, [1] + [7] * 12], budget=meter.handle(lm.model),
                          max_new_tokens=10)
    finally:
        meter.detach()
        for (owner, name), original in saved.items():
            setattr(owner, name, original)
    return [b - a for a, b in zip(marks[1:], marks[2:])]


def decode_speed(lm, n_tasks: int) -> dict:
    """Batched augmented decoding against one transformers generate() per view, same work
    (benchmarks/decoding.py)."""
    from decoding import measure
    from tta.data.datasets import load_dataset
    from tta.inference.predict import ViewSettings
    m = measure(lm, load_dataset("gen-eval").tasks[:n_tasks], ViewSettings().decode_batch_size, sync=lambda: sync(lm.device))
    return {"batched_tokens_per_s": round(m["batched_tokens"] / m["batched_s"]),
            "generate_same_work_s": round(m["same_work_s"], 3), "batched_s": round(m["batched_s"], 3),
            "speed_up": round(m["speed_up"], 2), "tokens_per_s_speed_up": round(m["tokens_per_s_speed_up"], 2)}


def ttt_mfu(device_name: str, size: str, steps: int) -> dict:
    """One TTT run of `steps` steps on a random model of `size`: counted FLOP/s over the measured
    matmul rate of the same device in the dtype the model computes in."""
    import numpy as np
    import torch
    from gpu_ttt import matmul_peak
    from methods.ttt_lora import TTTConfig
    from tta.budget import Meter
    from tta.data.datasets import load_dataset
    from tta.model.encoding import CompactFormat
    from tta.model.loading import LoadedModel, autocasts, build_model
    from tta.training.examples import leave_one_out_examples
    from tta.training.finetune import attach_lora, detach_lora, train
    device = torch.device(device_name)
    model, tokenizer = build_model(size)
    model.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    lm = LoadedModel(model.eval(), tokenizer, CompactFormat(tokenizer), f"random:{size}", device)
    # The rate MFU is against: bf16 where the model computes in bf16, fp32 on a CPU without native
    # bf16 matmuls (its scalar bf16 rate would make MFU read 7x there).
    compute = torch.bfloat16 if autocasts(device) else torch.float32
    peak = matmul_peak(device, 8192 if device.type == "cuda" else 1024, compute)
    c = TTTConfig()
    task = load_dataset("gen-eval").tasks[0]
    examples = [e.encoded for e in leave_one_out_examples(task, lm.format, np.random.default_rng(0), steps * c.batch_size)]
    adapter = attach_lora(lm, c.rank, c.alpha, c.targets)
    try:
        train(lm, examples[: 2 * c.batch_size], Meter().handle(lm.model), lr=c.lr, epochs=1, batch_size=c.batch_size)
        meter = Meter()
        meter.attach(lm.model)
        sync(device)
        start = time.perf_counter()
        report = train(lm, examples, meter.handle(lm.model), lr=c.lr, epochs=1, batch_size=c.batch_size)
        sync(device)
        seconds = time.perf_counter() - start
        meter.detach()
    finally:
        detach_lora(lm, adapter)
    n_params = sum(p.numel() for p in model.parameters())
    return {"size": size, "parameters_m": round(n_params / 1e6, 1), "steps": report.steps,
            "ms_per_step": round(1000 * seconds / max(report.steps, 1), 1),
            "tflops_counted": round(meter.flops / seconds / 1e12, 3), "peak_tflops": round(peak / 1e12, 2), "peak_dtype": str(compute).removeprefix("torch."),
            "mfu": round(meter.flops / seconds / peak, 4)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="default")
    parser.add_argument("--tasks", type=int, default=8, help="gen-eval tasks per method")
    parser.add_argument("--budget", default="2e12", help="FLOPs per task")
    parser.add_argument("--methods", help="comma-separated methods to run through `tta run` (default: every built-in one)")
    parser.add_argument("--method-limit", type=int, default=90, help="seconds per method run before its stacks are dumped")
    parser.add_argument("--ttt-size", default="1b")
    parser.add_argument("--ttt-steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu_check"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stages = {}
    summary = {"argv": sys.argv[1:], "stages_s": stages}
    lm = start_up(args.device, args.model, stages)
    print("methods through `tta run`:", flush=True)
    summary["methods"] = run_methods(args, args.out)
    stamp(stages, "methods done")
    summary["syncs_per_decode_step"] = syncs_per_decode_step(lm)
    print(f"host syncs per decode step: {summary['syncs_per_decode_step']}  (aim: at most 1)", flush=True)
    summary["decoding"] = decode_speed(lm, min(args.tasks, 3))
    print(f"decoding: {summary['decoding']}", flush=True)
    stamp(stages, "decoding done")
    summary["ttt"] = ttt_mfu(args.device, args.ttt_size, args.ttt_steps)
    print(f"TTT step: {summary['ttt']}", flush=True)
    stamp(stages, "all done")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    failed = [m for m, r in summary["methods"].items() if r["exit"] != 0 or r["errors"]]
    if failed:
        print(f"methods that did not finish cleanly: {', '.join(failed)} (logs in {args.out})")
        sys.exit(1)


if __name__ == "__main__":
    main()
