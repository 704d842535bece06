"""The collectives the optimizers use: `pair_exchange` and `group_average` (DESIGN.md §4).

`Collectives(transport, peers)` routes both protocols on one `Transport` (TCP or simulated) and
takes peers from a `PeerSource` (the membership, or `StaticPeers` for a fixed list). Both calls
take a deadline and return what they got:

- `pair_exchange(round, body, buffers, timeout=)` -> `PairResult`, or None when no partner
  committed in time. Both sides get each other's payload or neither uses it (`gossip.pairing`).
- `group_average(key, tensors, codec, weight, timeout=)` -> `AverageResult`, which says exactly
  who contributed to which part; a partial result is never reported as complete
  (`gossip.matchmaking`, `gossip.averaging`).

Layout: sans-IO cores decide (`pairing`, `matchmaking`, `averaging`); thin trio pumps act
(`pair_exchange`, `group_average`); the wire is in `collective_wire` and PROTOCOL.md.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import numpy as np

from gossip.collective_config import (
    CollectivesConfig,
    CollectiveStats,
    PeerRecordLike,
    PeerSource,
    StaticPeer,
    StaticPeers,
)
from gossip.collective_types import AverageResult, PairResult
from gossip.group_average import GroupAverage
from gossip.pair_exchange import PairExchange
from gossip.pairing import PairingCore
from gossip.transport import Buffer, Transport

__all__ = [
    "Collectives", "CollectivesConfig", "CollectiveStats", "PeerRecordLike", "PeerSource",
    "StaticPeer", "StaticPeers",
]


class Collectives:
    """`pair_exchange` and `group_average` for one node; routes their messages on `transport`."""

    def __init__(
        self,
        transport: Transport,
        peers: PeerSource,
        config: CollectivesConfig = CollectivesConfig(),
        *,
        rng: random.Random | None = None,
    ) -> None:
        if not transport.addresses:
            raise ValueError("the transport must have an address peers can call back")
        for meth in ("sample", "live_peers"):
            if not callable(getattr(peers, meth, None)):
                raise ValueError(f"peers must have {meth}() (a PeerSource such as gossip.membership.Membership)")
        self.transport = transport
        self.config = config
        rng = rng or random.Random()
        self._pairs = PairExchange(transport, peers, config, rng)
        self._groups = GroupAverage(transport, peers, config, rng)
        for method, handler in self._pairs.routes() + self._groups.routes():
            transport.route(method, handler)

    @property
    def pairing(self) -> PairingCore:
        """The pairing state; `.stats` counts paired, unpaired and uncertain rounds."""
        return self._pairs.core

    @property
    def stats(self) -> CollectiveStats:
        """group_average counters."""
        return self._groups.stats

    async def pair_exchange(
        self, round: int, body: dict, buffers: Sequence[Buffer] = (), *, timeout: float
    ) -> PairResult | None:
        """Swap (body, buffers) with one random live peer for `round`; None if none in time.

        A node pairs at most once per round and runs one pair_exchange at a time.
        """
        return await self._pairs.pair_exchange(round, body, buffers, timeout=timeout)

    async def group_average(
        self,
        key: str,
        tensors: Sequence[np.ndarray],
        codec: Any,
        weight: float = 1.0,
        *,
        timeout: float,
        window: float | None = None,
    ) -> AverageResult:
        """Weighted mean of `tensors` over the peers that join `key` within the window.

        `codec` has `encode(x) -> (header, buffers)` and `decode(header, buffers,
        expected_shape)`; every contribution and every reduced shard travels through it.
        `window` (default `config.matchmaking_window`, at most half the timeout) bounds
        matchmaking; the rest of the timeout is for the all-reduce. A peer's failure never
        raises: the result says what was averaged, over whom.
        """
        return await self._groups.group_average(key, tensors, codec, weight, timeout=timeout, window=window)
