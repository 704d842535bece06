"""What the collectives return: the contract between gossip/ and the optimizers.

`gossip.collectives` produces these; `optimizers/` consume them. They live in their own module
so both sides can import them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class PairResult:
    """One successful `pair_exchange`: the partner and the payload it sent us."""

    peer_id: bytes  # the partner's peer id
    body: dict  # the partner's msgpack body, as it sent it
    buffers: Sequence[bytes | bytearray | memoryview]  # the partner's raw buffers


@dataclass(frozen=True)
class AverageResult:
    """The outcome of one `group_average`, stated exactly (never a silently partial success).

    `tensors[i]` has the shape and dtype (float32) of the i-th input. Elements that were averaged
    hold the weighted mean over `contributors`; elements that could not be averaged (their
    reducer failed) hold our own input unchanged, and `fractions[i]` says how much of tensor i
    was averaged. `complete` is true only when every element of every tensor was averaged over
    every member of the matched group.
    """

    tensors: list[np.ndarray]
    group: tuple[bytes, ...]  # every peer id matched for this key, self included, sorted
    contributors: tuple[bytes, ...]  # peer ids whose data is in the averaged parts, self included, sorted
    fractions: tuple[float, ...]  # per input tensor: fraction of its elements averaged, in [0, 1]

    @property
    def complete(self) -> bool:
        return self.contributors == self.group and all(f == 1.0 for f in self.fractions)

    @property
    def alone(self) -> bool:
        """Nobody else joined: the result is our own input."""
        return len(self.contributors) <= 1
