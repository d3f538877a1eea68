"""What the meter charges a method's own recurrent network for a training step, against torch's
own counter (torch.utils.flop_counter.FlopCounterMode).  Before ce20daa the backward was charged
two forwards whenever anything learned; now it is charged the gradients torch computes.

    python benchmarks/results/recurrent_backward/charges.py                        # this checkout
    PYTHONPATH=/tmp/old python benchmarks/results/recurrent_backward/charges.py    # a worktree of an older commit
"""
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).parents[2]))
from common import meter_charge as meter, torch_count  # noqa: E402

warnings.filterwarnings("ignore")
torch.manual_seed(0)


def step(network, x, packed=False):
    def work():
        inputs = nn.utils.rnn.pack_padded_sequence(x, [10, 8, 5, 2]) if packed else x
        out = network(inputs)[0]
        (out.data if packed else out).sum().backward()
    return work


data, learning_input = torch.randn(10, 4, 32), torch.randn(10, 4, 32, requires_grad=True)
frozen = nn.GRU(32, 64).requires_grad_(False)
cases = {
    "GRU 32-64, weights learn, input is data": step(nn.GRU(32, 64), data),
    "GRU 32-64, weights learn, input learns": step(nn.GRU(32, 64), learning_input),
    "GRU 32-64, weights frozen, input learns": step(frozen, learning_input),
    "RNN 32-64, 2 layers, bidirectional, data": step(nn.RNN(32, 64, num_layers=2, bidirectional=True), data),
    "GRU 32-64, bidirectional, packed, data": step(nn.GRU(32, 64, bidirectional=True), data, packed=True),
    "LSTM 32-64 projected to 16, data": step(nn.LSTM(32, 64, proj_size=16), data),
}
print(f"{'training step':44s} {'meter':>12s} {'torch':>12s} {'meter/torch':>12s}")
for name, work in cases.items():
    charged, counted = meter(work), torch_count(work)
    print(f"{name:44s} {charged:12.0f} {counted:12.0f} {charged / counted:12.3f}")
