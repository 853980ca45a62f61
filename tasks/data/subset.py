"""``--limit-train`` / ``--limit-val``: a seeded random subset, class-balanced where each item
has one class, instead of the first N files (the first 8 of a 4-class folder set are all of
one class)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["subset_indices"]


def subset_indices(n: int, limit: int | None, seed: int = 0, labels: Sequence[int] | None = None) -> list[int]:
    """Sorted indices of ``limit`` of ``n`` items (all of them when ``limit`` is None or at least
    ``n``), drawn with ``seed``. With ``labels`` (one class per item) the classes take turns, each
    giving its next randomly drawn item, so every class gets ``limit // classes`` items or one
    more while it has them (a class that runs out leaves its turns to the others)."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 0:
        raise ValueError(f"limit={limit}: expected a number of items >= 0 (or None for all)")
    rng = np.random.default_rng(seed)
    if labels is None:
        return sorted(rng.choice(n, size=limit, replace=False).tolist())
    labels = np.asarray(labels)
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} items")
    queues = [rng.permutation(np.flatnonzero(labels == c)).tolist() for c in np.unique(labels)]
    order = rng.permutation(len(queues)).tolist()  # which class gives first when limit % classes != 0
    chosen: list[int] = []
    turn = 0
    while len(chosen) < limit:
        queue = queues[order[turn % len(order)]]
        if queue:
            chosen.append(queue.pop())
        turn += 1
    return sorted(chosen)
