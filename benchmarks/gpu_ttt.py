"""GPU throughput of per-task test-time training and augmented inference on a randomly
initialised ~1B-parameter Llama-architecture model (no download), with MFU against the bf16
matmul peak measured on the same device.

    python benchmarks/gpu_ttt.py                 # on a GPU: the 1B size
    python benchmarks/gpu_ttt.py --size tiny     # CPU smoke test (what CI runs)

MFU = FLOPs counted by tta.budget (the harness's own formula) / seconds / measured peak.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from methods.ttt_lora import TTTConfig
from tta.budget import Meter
from tta.training.examples import leave_one_out_examples
from tta.model.loading import LoadedModel, build_model, pick_device
from tta.model.encoding import CompactFormat
from tta.inference.predict import predict_augmented
from tta.data.datasets import load_dataset
from tta.training.finetune import attach_lora, detach_lora, train


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, n: int, dtype=None) -> float:
    """FLOP/s of an n x n matmul on `device` (bf16 on CUDA and fp32 on the CPU unless `dtype` is given)."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="1b")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dataset", default="gen-eval")
    args = parser.parse_args()
    device = pick_device()
    model, tokenizer = build_model(args.size)
    model.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cuda":
        model.config._attn_implementation = "sdpa"
    lm = LoadedModel(model.eval(), tokenizer, CompactFormat(tokenizer), f"random:{args.size}", device)
    n_params = sum(p.numel() for p in model.parameters())
    peak = matmul_peak(device, 8192 if device.type == "cuda" else 512)
    print(f"device {device}, model {args.size}: {n_params / 1e6:.1f}M parameters; "
          f"measured matmul peak {peak / 1e12:.2f} TFLOP/s")

    c = TTTConfig()
    task = load_dataset(args.dataset).tasks[0]
    examples = [e.encoded for e in leave_one_out_examples(task, lm.format, np.random.default_rng(0),
                                                          args.steps * c.batch_size)]
    adapter = attach_lora(lm, c.rank, c.alpha, c.targets)
    train(lm, examples[: 2 * c.batch_size], Meter().handle(lm.model), lr=c.lr, epochs=1, batch_size=c.batch_size)  # warm-up
    meter = Meter()
    meter.attach(lm.model)
    sync(device)
    start = time.perf_counter()
    report = train(lm, examples, meter.handle(lm.model), lr=c.lr, epochs=1, batch_size=c.batch_size)
    sync(device)
    seconds = time.perf_counter() - start
    meter.detach()
    print(f"TTT: {report.steps} steps in {seconds:.2f} s ({1000 * seconds / report.steps:.0f} ms/step), "
          f"{meter.flops / seconds / 1e12:.2f} TFLOP/s counted, MFU {meter.flops / seconds / peak:.1%}")

    meter = Meter()
    meter.attach(lm.model)
    sync(device)
    start = time.perf_counter()
    _, info = predict_augmented(lm, task, meter.handle(lm.model), batch_size=32, fill=False)
    sync(device)
    seconds = time.perf_counter() - start
    meter.detach()
    detach_lora(lm, adapter)
    print(f"augmented inference: {info['views']} views in {seconds:.2f} s, "
          f"{meter.flops / seconds / 1e12:.3f} TFLOP/s counted, MFU {meter.flops / seconds / peak:.2%}")


if __name__ == "__main__":
    main()
