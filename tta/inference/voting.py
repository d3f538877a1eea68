"""Choosing the attempts from many candidate answers.

`hierarchical_vote` is the vote of Akyürek et al.'s reference code (`arclib/voting.py` in
ekinakyurek/marc): agreement *across transforms* counts, not the raw number of votes.
`majority_vote` is plain self-consistency (Wang et al. 2022): the most frequent answers.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from tta.data.tasks import grid_key


def hierarchical_vote(predictions: list[tuple[str, np.ndarray | None]], top_per_group: int = 3,
                      n_attempts: int = 2, identity: str = "identity") -> list[np.ndarray | None]:
    """The `n_attempts` best answers by a two-level vote, padded with None.

    `predictions` are (group name, grid already mapped back to the task's frame); a None grid (a
    view that gave no answer) is left out everywhere.  Every group -- one per transform -- is a
    category, and so is the set of all predictions together.  Within each category the answers
    are ranked by how often it produced them and the first `top_per_group` are kept.  An answer
    scores one point for every category that kept it, however often that category produced it, and
    the answers with the most points are the attempts.  So an answer that several transforms agree
    on beats one that a single transform repeats: with 6 transforms x 2 demonstration orders, an
    answer given once by each of four transforms (4 + 1 points) wins over one given twice by each
    of three (3 + 1), which a plain count ranks first (6 votes to 4).
    Ties, both at a category's cut and among the final scores, go to the answer the `identity`
    group produced more often, then to the answer seen first.

    Where this differs from the reference code, which returns its two best answers from the
    categories `all` plus its six inference transforms (inverse names, a fixed list):
    - it fills each category's three slots with the top three answers and, when the category has
      fewer than three distinct answers, with grids it builds from the row-wise or column-wise
      majority of the category's answers, or with repeats of its most common answer.  So there a
      category whose views all agree gives its answer up to three points, and a split one can
      give a point to a grid no view produced.  Here a category gives an answer at most one point
      and no grid is built;
    - ties: the reference breaks only a tie between its second and third answers, by how often
      the identity view produced each (equal counts: the third wins), and leaves every other tie,
      including the cut inside a category, to Python's set order (arbitrary).  Here every tie is
      broken the same deterministic way (identity count, then first seen), which agrees with the
      reference wherever its choice is determined.
    """
    grids: dict[tuple, np.ndarray] = {}
    first_seen: dict[tuple, int] = {}
    categories: dict[str, Counter] = {}
    everything: Counter = Counter()
    for i, (group, grid) in enumerate(predictions):
        if grid is None:
            continue
        key = grid_key(grid)
        grids.setdefault(key, grid)
        first_seen.setdefault(key, i)
        categories.setdefault(group, Counter())[key] += 1
        everything[key] += 1

    from_identity = categories.get(identity, Counter())
    tie_break = lambda k: (-from_identity[k], first_seen[k])

    points: Counter = Counter()
    # `everything` is a category of its own, whatever the groups are called (a group may be named "all").
    for counts in [*categories.values(), everything]:
        for key in sorted(counts, key=lambda k: (-counts[k], *tie_break(k)))[:top_per_group]:
            points[key] += 1
    ranked = sorted(points, key=lambda k: (-points[k], *tie_break(k)))
    attempts = [grids[k] for k in ranked[:n_attempts]]
    return attempts + [None] * (n_attempts - len(attempts))


def majority_vote(grids: list[np.ndarray | None], n_attempts: int = 2) -> list[np.ndarray | None]:
    """Plain self-consistency: the `n_attempts` most frequent answers (None grids ignored), ties
    to the answer seen first, padded with None."""
    counts: Counter = Counter()
    first: dict[tuple, np.ndarray] = {}
    for grid in grids:
        if grid is None:
            continue
        key = grid_key(grid)
        first.setdefault(key, grid)
        counts[key] += 1
    ranked = [first[k] for k, _ in counts.most_common(n_attempts)]   # most_common keeps first-seen order on ties
    return ranked + [None] * (n_attempts - len(ranked))
