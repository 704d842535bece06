"""What the collectives share: their configuration, counters, peer source and a wake-up signal.

`gossip.collectives.Collectives` is the entry point; this module holds the small pieces its two
trio pumps (`gossip.pair_exchange`, `gossip.group_average`) both use, so neither imports the other.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import trio

from gossip import collective_wire as wire


class PeerRecordLike(Protocol):
    peer_id: bytes
    addresses: Sequence[str]


class PeerSource(Protocol):
    """What the collectives need from membership (`gossip.membership.Membership` fits)."""

    def sample(self, k: int) -> Sequence[PeerRecordLike]: ...

    def live_peers(self) -> Sequence[PeerRecordLike]: ...


@dataclass(frozen=True)
class StaticPeer:
    peer_id: bytes
    addresses: tuple[str, ...]


class StaticPeers:
    """A fixed peer list as a `PeerSource` (tests, benchmarks, swarms without membership)."""

    def __init__(self, peers: Sequence[PeerRecordLike], rng: random.Random | None = None) -> None:
        self._peers = list(peers)
        self._rng = rng or random.Random()

    def sample(self, k: int) -> list[PeerRecordLike]:
        return self._rng.sample(self._peers, min(k, len(self._peers)))

    def live_peers(self) -> list[PeerRecordLike]:
        return list(self._peers)


@dataclass(frozen=True)
class CollectivesConfig:
    """Timing and bounds of both collectives; every field is checked at construction."""

    matchmaking_window: float = 5.0  # s from the first member's arrival until the leader seals (capped at timeout/2)
    join_slack: float = 1.0  # s a follower waits for the seal beyond the window (network delays, redirects)
    hello_timeout: float = 2.0  # s to wait for each avg.hello answer
    max_group: int = 64  # members per group, leader included (<= collective_wire.MAX_GROUP)
    max_candidates: int = 256  # live peers we greet per key
    max_keys: int = 16  # group_average calls running at once on this node
    part_wait: float = 0.5  # share of the group's time budget a reducer waits for missing slices
    pair_hold_timeout: float = 5.0  # s an acceptor waits for its initiator's next message
    pair_call_timeout: float = 5.0  # s per pairing RPC (also capped by the deadline)
    pair_retry_delay: float = 0.1  # s; after a refusal we pause uniform(0, this) before proposing again
    pair_patience: float = 5.0  # s we keep proposing to a random peer not yet in the round
    # (capped at timeout/4) rather than pairing with whoever arrives next, which keeps nodes
    # running in step from meeting the same partner every round (see gossip.pairing)
    pair_sample: int = 4  # peers sampled per proposal attempt; membership keeps sample(k) fair
    # across the swarm only for small k (about sample_age_s / round_s), so keep this small
    offload_numel: int = 1 << 18  # codec work on more values than this runs in a worker thread

    def __post_init__(self) -> None:
        for name in ("matchmaking_window", "join_slack", "hello_timeout", "pair_hold_timeout",
                     "pair_call_timeout"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a finite number of seconds > 0")
        if not 2 <= self.max_group <= wire.MAX_GROUP:
            raise ValueError(f"max_group must be in [2, {wire.MAX_GROUP}]")
        if self.max_candidates < 1 or self.max_keys < 1 or self.pair_sample < 1:
            raise ValueError("max_candidates, max_keys and pair_sample must be >= 1")
        if not 0 < self.part_wait < 1:
            raise ValueError("part_wait must be in (0, 1): the rest of the budget carries the replies")
        if not self.pair_retry_delay >= 0:
            raise ValueError("pair_retry_delay must be >= 0 seconds")
        if not (math.isfinite(self.pair_patience) and self.pair_patience >= 0):
            raise ValueError("pair_patience must be a finite number of seconds >= 0 (0: next peer at once)")
        if self.offload_numel < 0:
            raise ValueError("offload_numel must be >= 0 (0 offloads all codec work)")


@dataclass
class CollectiveStats:
    """group_average counters for metrics; pairing counters live in `PairingCore.stats`."""

    averages: int = 0  # group_average calls that returned
    complete: int = 0  # ... with every element averaged over the whole group
    alone: int = 0  # ... where nobody else contributed
    shards_failed: int = 0  # shards we could not get averaged (reducer failed or refused us)
    rejected: int = 0  # contributions we refused (bad encoding, wrong size, non-finite)
    dropped: int = 0  # slices for keys/rounds we do not run (expired, unknown): dropped unread
    by_reason: dict[str, int] = field(default_factory=dict)  # why shards failed

    def failed(self, reason: str) -> None:
        self.shards_failed += 1
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1


class Signal:
    """Wakes every waiter when something changed (a fresh trio.Event per generation)."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self, deadline: float = math.inf) -> None:
        event = self._event
        with trio.move_on_at(deadline):
            await event.wait()




def check_timeout(timeout: float) -> None:
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")

