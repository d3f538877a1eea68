"""Choosing two attempts from many candidate answers.

The paper's hierarchical vote: within each augmentation's group of
predictions keep its 3 most frequent answers; a global vote over those
survivors (counting their votes) picks the 2 attempts; ties go to the answer
the identity view produced, then to the answer seen first.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from tta.tasks import grid_key


def hierarchical_vote(predictions: list[tuple[str, np.ndarray | None]], top_per_group: int = 3,
                      n_attempts: int = 2, identity: str = "identity") -> list[np.ndarray | None]:
    """`predictions` are (group name, grid already mapped back to the original frame)."""
    grids: dict[tuple, np.ndarray] = {}
    first_seen: dict[tuple, int] = {}
    groups: dict[str, Counter] = {}
    for i, (group, grid) in enumerate(predictions):
        if grid is None:
            continue
        key = grid_key(grid)
        grids.setdefault(key, grid)
        first_seen.setdefault(key, i)
        groups.setdefault(group, Counter())[key] += 1

    total: Counter = Counter()
    for counts in groups.values():
        for key, n in counts.most_common(top_per_group):
            total[key] += n
    from_identity = set(groups.get(identity, {}))
    ranked = sorted(total, key=lambda k: (-total[k], k not in from_identity, first_seen[k]))
    attempts = [grids[k] for k in ranked[:n_attempts]]
    return attempts + [None] * (n_attempts - len(attempts))


def majority_vote(grids: list[np.ndarray | None], n_attempts: int = 2) -> list[np.ndarray | None]:
    """Plain self-consistency: the most frequent answers, ties to the first seen."""
    return hierarchical_vote([("all", g) for g in grids], top_per_group=len(grids) or 1,
                             n_attempts=n_attempts, identity="all")
