"""Why the CPU path trains under bf16 autocast where the CPU multiplies bf16 natively, and in
fp32 where it does not: matmul throughput and training tokens/s of the embedded model's size in
fp32 and bf16, measured here, and the choice `tta` makes on this host.

    python benchmarks/cpu_bf16.py [--batch 8 --length 1024]

(On a CPU without native bf16 a bf16 training step of the default shape takes minutes: pass a
smaller --batch.)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import timed  # noqa: E402

from tta.model.loading import build_model, cpu_multiplies_bf16
from tta.threads import set_threads


def matmul_gflops(dtype, n=1024):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, 5) / 1e9


def training_tokens_per_second(bf16: bool, size="default", batch=8, length=1024):
    model, _ = build_model(size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(6, 16, (batch, length))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):   # forced, whatever this CPU is
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return batch * length / timed(step, 3)


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    args = parser.parse_args()
    set_threads()
    print(f"threads: {torch.get_num_threads()}, CPU capability: {torch.backends.cpu.get_cpu_capability()}")
    print(f"matmul 1024^3: fp32 {matmul_gflops(torch.float32):.1f} GFLOP/s, bf16 {matmul_gflops(torch.bfloat16):.1f} GFLOP/s")
    print(f"training the default size ({args.batch} x {args.length} tokens): "
          f"fp32 {training_tokens_per_second(False, batch=args.batch, length=args.length):,.0f} tokens/s, "
          f"bf16 autocast {training_tokens_per_second(True, batch=args.batch, length=args.length):,.0f} tokens/s")
    print(f"tta computes on this CPU in: {'bf16 (autocast)' if cpu_multiplies_bf16() else 'fp32'}")
