"""Padding token sequences into rectangles for the model, with the format's position ids: one
place for decoding, training, gradients and pretraining."""
from __future__ import annotations

import torch

from tta.model.encoding import IGNORE, positions_of

def _rectangle(rows: list[list[int]], fill: int, side: str, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = -(-max(len(r) for r in rows) // multiple) * multiple
    values = torch.full((len(rows), width), fill, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        values[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return values, mask


def pad_batch(seqs: list[list[int]], fmt, device, side: str = "left", multiple: int = 1, trackers=None):
    """Token ids, attention mask and the format's position ids, padded to a rectangle (padding
    never shifts a sequence's positions).  Always pass the mask on to the model: without one,
    transformers reads jumps in the position ids as packed separate sequences.  `trackers` (one
    `fmt.position_tracker()` per sequence) number the tokens and are left fed, for a caller that
    continues the sequences.
    Training pads the width to a `multiple` (64): on the CPU every new tensor shape makes oneDNN
    build new kernels, which made variable-length training several times slower and grew memory."""
    ids, mask = _rectangle(seqs, fmt.pad_id, side, multiple)
    trackers = trackers or [fmt.position_tracker() for _ in seqs]
    positions, _ = _rectangle([positions_of(t, s) for t, s in zip(trackers, seqs)], 0, side, multiple)
    return ids.to(device), mask.to(device), positions.to(device)


def pad_labels(labels: list[list[int]], device, multiple: int = 1) -> torch.Tensor:
    """Labels right-padded with IGNORE, to line up with `pad_batch(..., side="right")`."""
    return _rectangle(labels, IGNORE, "right", multiple)[0].to(device)
