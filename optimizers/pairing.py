"""Shared-seed random perfect matching for NoLoCo rounds (ALGORITHMS.md §1).

NoLoCo's reference code pairs ranks with `perm = default_rng(step+1).permutation(W)` and groups
`{perm[k], perm[k + W/2]}`. We keep that shape but key the generator by explicit integers
(`seed`, `round`) through numpy's SeedSequence, so every member computes the same matching on any
machine and numpy version with a stable SeedSequence/PCG64 stream, and a new matching every round.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def pair_matching(
    round: int, members: Sequence[int], seed: int = 0
) -> tuple[list[tuple[int, int]], int | None]:
    """Pair `members` for `round`; returns `(pairs, unpaired)`.

    Every member appears in at most one pair. With an odd count exactly one member is left
    unpaired (it does a solo update). The result depends only on (`seed`, `round`, the sorted
    member set), not on the order `members` is given in.
    """
    if round < 0 or seed < 0:
        raise ValueError(f"round and seed must be >= 0, got round={round}, seed={seed}")
    ordered = sorted(set(int(m) for m in members))
    if len(ordered) != len(members):
        raise ValueError("members must be distinct")
    rng = np.random.default_rng([seed, round])
    perm = [ordered[i] for i in rng.permutation(len(ordered))]
    half = len(perm) // 2
    pairs = [(perm[k], perm[k + half]) for k in range(half)]
    unpaired = perm[-1] if len(perm) % 2 == 1 else None
    return pairs, unpaired
