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
class ShardReport:
    """What happened to one shard of a `group_average` (flat element range [start, stop)).

    The tensors are flattened and concatenated; each group member reduces one contiguous shard.
    `averaged` is true when this node holds the reducer's weighted mean over `contributors`
    for the shard; false when the reducer failed or its answer was refused, and the shard then
    holds our own input.
    """

    start: int  # first element of the shard in the concatenated vector
    stop: int  # one past its last element
    reducer: bytes  # the member that reduced it
    averaged: bool  # we hold the mean over `contributors` there
    contributors: tuple[bytes, ...]  # sorted; whose data is in that mean (empty if not averaged)
    weight: float  # sum of the contributors' weights (0.0 if not averaged)


@dataclass(frozen=True)
class AverageResult:
    """The outcome of one `group_average`, stated exactly (never a silently partial success).

    `tensors[i]` has the shape and dtype (float32) of the i-th input. Elements that were averaged
    hold the weighted mean over their shard's contributors; elements that could not be averaged (their
    reducer failed) hold our own input unchanged, and `fractions[i]` says how much of tensor i
    was averaged. `complete` is true only when every element of every tensor was averaged over
    every member of the matched group.

    Members can fail between shards (one that dies after sending its slices is in every shard but
    its own), so `contributors` lists the peers whose data is in *every* averaged shard, and
    `shards` says per shard who is in it. `rejected` names the peers whose data we refused
    (not decodable, wrong size, not finite): they are never contributors.
    """

    tensors: list[np.ndarray]
    group: tuple[bytes, ...]  # every peer id matched for this key, self included, sorted
    contributors: tuple[bytes, ...]  # peer ids whose data is in every averaged shard, self included, sorted
    fractions: tuple[float, ...]  # per input tensor: fraction of its elements averaged, in [0, 1]
    shards: tuple[ShardReport, ...] = ()  # one per group member, in group order
    rejected: tuple[bytes, ...] = ()  # peers whose contribution was refused as invalid, sorted

    @property
    def complete(self) -> bool:
        return self.contributors == self.group and all(f == 1.0 for f in self.fractions)

    @property
    def alone(self) -> bool:
        """Nobody else joined: the result is our own input."""
        return len(self.contributors) <= 1
