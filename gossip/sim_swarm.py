"""A swarm of `Membership` nodes on a `SimNetwork`, and the measures we judge overlays by.

Used by the membership tests and `scripts/bench/membership.py`: thousands of nodes in one
process on trio's virtual clock. Each node is a real `Membership` over a `SimTransport` (the
simulated network skips the Noise channel, nothing else), with a deterministic identity and a
wall clock tied to virtual time so record seqs and expiry follow the simulation.

The measures are pure functions of a view graph `{peer_id: [peer_id, ...]}`: strong
connectivity, in-degrees, and Pearson's chi-square statistic with its critical value.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import trio

from gossip.identity import Identity
from gossip.membership import MembershipConfig
from gossip.membership_driver import Membership
from gossip.sim import SimNetwork, SimTransport

WALL_EPOCH = 1_700_000_000.0  # simulated unix time at virtual time 0


@dataclass
class SimNode:
    identity: Identity
    host: SimTransport
    membership: Membership
    alive: bool = True

    @property
    def address(self) -> str:
        return self.host.address

    @property
    def peer_id(self) -> bytes:
        return self.identity.peer_id


class SimSwarm:
    """Start, kill, restart and inspect Membership nodes on one SimNetwork."""

    def __init__(self, net: SimNetwork, config: MembershipConfig, seed: int = 0) -> None:
        self.net = net
        self.config = config
        self.rng = random.Random(seed)
        self.nodes: dict[str, SimNode] = {}  # address -> the node last started there
        self._nursery: trio.Nursery | None = None

    def bind(self, nursery: trio.Nursery) -> None:
        """Nodes run as tasks of `nursery` (cancel it to stop the swarm)."""
        self._nursery = nursery

    def start(
        self,
        bootstrap: Sequence[str] = (),
        identity: Identity | None = None,
        address: str | None = None,
        delay: float = 0.0,
    ) -> SimNode:
        """A new node (or a restart at `address` under `identity`), running after `delay` s."""
        if self._nursery is None:
            raise RuntimeError("call bind(nursery) before starting nodes")
        if identity is None:
            identity = Identity.from_seed(self.rng.randbytes(32))
        host = self.net.add_host(identity.peer_id, address)
        membership = Membership(
            host,
            identity,
            self.config,
            bootstrap,
            wall_clock=lambda: WALL_EPOCH + trio.current_time(),
            rng=random.Random(self.rng.getrandbits(64)),
        )
        node = SimNode(identity, host, membership)
        self.nodes[host.address] = node

        async def main(_: SimTransport) -> None:
            await membership.run()

        async def launch() -> None:
            if delay > 0:
                await trio.sleep(delay)
            await host.run(main)

        self._nursery.start_soon(launch)
        return node

    def kill(self, address: str) -> None:
        """Crash a node: no leave announcement, it just stops answering."""
        self.nodes[address].alive = False
        self.net.kill(address)

    async def leave(self, address: str) -> None:
        """A graceful exit: announce the leave, then stop."""
        node = self.nodes[address]
        await node.membership.leave()
        node.alive = False
        self.net.kill(address)

    def live(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.alive]

    def views(self, nodes: Iterable[SimNode] | None = None) -> dict[bytes, list[bytes]]:
        """Who each live node's view points at (suspects included: they are still in the view)."""
        nodes = self.live() if nodes is None else nodes
        return {n.peer_id: list(n.membership.core.view) for n in nodes}

    def live_views(self) -> dict[bytes, list[bytes]]:
        """Views restricted to live peers, as `live_peers()` reports them (no suspects)."""
        return {n.peer_id: [r.peer_id for r in n.membership.live_peers()] for n in self.live()}


def strongly_connected(graph: Mapping[bytes, Sequence[bytes]]) -> bool:
    """Every node reaches every other along view pointers (edges to unknown nodes ignored)."""
    if not graph:
        return True
    reverse: dict[bytes, list[bytes]] = {n: [] for n in graph}
    for node, out in graph.items():
        for peer in out:
            if peer in reverse:
                reverse[peer].append(node)
    start = next(iter(graph))
    return _reach(graph, start) == len(graph) and _reach(reverse, start) == len(graph)


def _reach(graph: Mapping[bytes, Sequence[bytes]], start: bytes) -> int:
    seen = {start}
    stack = [start]
    while stack:
        for peer in graph[stack.pop()]:
            if peer in graph and peer not in seen:
                seen.add(peer)
                stack.append(peer)
    return len(seen)


def in_degrees(graph: Mapping[bytes, Sequence[bytes]]) -> dict[bytes, int]:
    """How many views point at each node of the graph."""
    degrees = {n: 0 for n in graph}
    for out in graph.values():
        for peer in out:
            if peer in degrees:
                degrees[peer] += 1
    return degrees


def chi_square(observed: Sequence[float], expected: Sequence[float]) -> float:
    """Pearson's statistic: sum((o - e)^2 / e)."""
    if len(observed) != len(expected) or any(e <= 0 for e in expected):
        raise ValueError("observed and expected need the same length and positive expectations")
    return sum((o - e) ** 2 / e for o, e in zip(observed, expected))


def chi_square_critical(df: int, p: float) -> float:
    """The value a chi-square(df) variable exceeds with probability p (Wilson-Hilferty).

    (X/df)^(1/3) is close to normal with mean 1 - 2/(9 df) and variance 2/(9 df); for df in the
    hundreds the approximation is within 0.1% of the exact quantile.
    """
    if df < 1 or not 0 < p < 1:
        raise ValueError("need df >= 1 and 0 < p < 1")
    z = NormalDist().inv_cdf(1 - p)
    v = 2 / (9 * df)
    return df * (1 - v + z * math.sqrt(v)) ** 3
