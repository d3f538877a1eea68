"""Why the CPU path trains under bf16 autocast: matmul throughput and training tokens/s of the
embedded model's size in fp32 and bf16, measured here.

    python benchmarks/cpu_bf16.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import timed  # noqa: E402

from tta.model.loading import autocast, build_model
from tta.threads import set_threads


def matmul_gflops(dtype, n=1024):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, 5) / 1e9


def training_tokens_per_second(bf16: bool, size="default", batch=8, length=1024):
    model, _ = build_model(size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(6, 16, (batch, length))

    def step():
        with autocast(torch.device("cpu"), bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return batch * length / timed(step, 3)


if __name__ == "__main__":
    set_threads()
    print(f"threads: {torch.get_num_threads()}")
    print(f"matmul 1024^3: fp32 {matmul_gflops(torch.float32):.0f} GFLOP/s, bf16 {matmul_gflops(torch.bfloat16):.0f} GFLOP/s")
    print(f"training the default size: fp32 {training_tokens_per_second(False):,.0f} tokens/s, "
          f"bf16 autocast {training_tokens_per_second(True):,.0f} tokens/s")
