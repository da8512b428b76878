"""Bucket lengths that waste the least padding.

Each example of length n = max(len(src), len(tgt)) is padded to the smallest bucket >= n, so
a set of k bucket lengths costs sum over examples of bucket(n) padded positions. The best k
lengths are found exactly by dynamic programming over the length histogram (O(k * L^2) for
lengths up to L), which beats quantile buckets when lengths are skewed (CMUdict: most words
are 6-12 letters, the longest 30).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..data import Example


def optimal_bucket_lengths(examples: Sequence[Example], num_buckets: int,
                           max_len: int | None = None) -> tuple[int, ...]:
    """At most `num_buckets` increasing lengths minimising the padded size of `examples`;
    the last is the longest example (capped at `max_len`, beyond which examples are cut)."""
    if not examples:
        raise ValueError("cannot choose bucket lengths for zero examples")
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    lengths = np.array([max(len(e.src), len(e.tgt)) for e in examples])
    if max_len is not None:
        lengths = np.minimum(lengths, max_len)
    longest = int(lengths.max())
    counts = np.bincount(lengths, minlength=longest + 1).astype(np.float64)
    below = np.concatenate([[0.0], np.cumsum(counts)])  # below[n] = #examples shorter than n
    candidates = [n for n in range(1, longest + 1) if counts[n] > 0]

    def cost(lo: int, hi: int) -> float:
        """Padded size of the examples with lo < length <= hi, all padded to hi."""
        return (below[hi + 1] - below[lo + 1]) * hi

    # best[j][b]: least cost of covering lengths <= candidates[j] with b buckets, the last at
    # candidates[j]; parent pointers recover the lengths.
    size = len(candidates)
    best = np.full((size, num_buckets + 1), np.inf)
    parent = np.full((size, num_buckets + 1), -1, dtype=np.int64)
    for j, hi in enumerate(candidates):
        best[j, 1] = cost(0, hi)
        for b in range(2, num_buckets + 1):
            for i in range(j):
                value = best[i, b - 1] + cost(candidates[i], hi)
                if value < best[j, b]:
                    best[j, b], parent[j, b] = value, i
    b = int(np.argmin(best[size - 1, 1:])) + 1
    chosen, j = [], size - 1
    while j >= 0 and b >= 1:
        chosen.append(candidates[j])
        j, b = int(parent[j, b]), b - 1
    return tuple(sorted(chosen))
