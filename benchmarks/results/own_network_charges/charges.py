"""What the meter charges a method's own network, against torch's own counter
(torch.utils.flop_counter.FlopCounterMode), for the cases the 2026-12-03 (fourth) session fixed:
a layer's backward when its input needs no gradient, layers called with inputs by keyword, and
subclasses of counted layers with a forward of their own.

    python benchmarks/results/own_network_charges/charges.py                                 # this checkout
    PYTHONPATH=/tmp/old python benchmarks/results/own_network_charges/charges.py             # a worktree of an older commit
"""
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[2]))
from common import meter_charge as meter, torch_count  # noqa: E402

warnings.filterwarnings("ignore")
torch.manual_seed(0)


class LoRALinear(nn.Linear):   # as loralib writes one
    def __init__(self, width, rank=8):
        super().__init__(width, width)
        self.A, self.B = nn.Parameter(torch.randn(rank, width)), nn.Parameter(torch.randn(width, rank))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + x @ self.A.t() @ self.B.t()


class TenTimes(nn.Linear):
    def forward(self, x):
        for _ in range(10):
            x = F.linear(x, self.weight)
        return x


x = torch.randn(64, 32)
mlp = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
conv = nn.Sequential(nn.Unflatten(1, (2, 4, 4)), nn.Conv2d(2, 8, 3, padding=1), nn.Flatten(), nn.Linear(128, 4))
linear, q = nn.Linear(32, 64), torch.randn(2, 5, 32)
attention = nn.MultiheadAttention(32, 4, batch_first=True)
x64 = torch.randn(16, 64)
lora, ten = LoRALinear(64), TenTimes(64, 64)
cases = {
    "MLP 32-64-16, training step": lambda: mlp(x).sum().backward(),
    "conv + linear, training step": lambda: conv(x).sum().backward(),
    "linear(x), forward": lambda: linear(q),
    "linear(input=x), forward": lambda: linear(input=q),
    "attention(q, k, v), forward": lambda: attention(q, q, q),
    "attention(query=, key=, value=), forward": lambda: attention(query=q, key=q, value=q),
    "loralib-style LoRA layer, forward": lambda: lora(x64),
    "loralib-style LoRA layer, training step": lambda: lora(x64).sum().backward(),
    "nn.Linear subclass making 10 products, forward": lambda: ten(x64),
}
print(f"{'case':48s} {'meter':>12s} {'torch':>12s}")
for name, work in cases.items():
    print(f"{name:48s} {meter(work):12.0f} {torch_count(work):12.0f}")
