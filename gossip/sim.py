"""`SimNetwork`: an in-memory network on trio's clock, so 1,000-node swarms run in one process.

Each simulated host is a `SimTransport`, the same `Transport` interface as TCP, so node code runs
unchanged. The simulation works at the level of messages, not bytes: a call is encoded with
msgpack (so sizes and schemas are real), held on the sender->receiver link for
size / bandwidth seconds behind earlier messages on that link, delivered after the link's
latency, checked against its schema on receipt and answered the same way back.

It deliberately skips the Noise channel: the handshake and frames are tested on their own and over
loopback TCP, and skipping them keeps a simulated message at a few microseconds of real time.
Framing costs are still counted in the byte totals (FRAME_OVERHEAD per message).

Links are seeded: latency (with jitter), bandwidth and loss per directed link, plus partitions.
A host can be killed (its tasks are cancelled, it answers nothing: callers time out) and
restarted under the same address and identity.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

import msgpack
import trio

from gossip import messages
from gossip.errors import (
    AuthenticationError,
    LocalProtocolError,
    PeerTimeout,
    PeerUnreachable,
    RemoteError,
    RemoteProtocolError,
)
from gossip.transport import (
    Buffer,
    Handler,
    Reply,
    Request,
    Response,
    TrafficStats,
    Transport,
    answer_ping,
)

# Bytes a real connection spends per message beyond body and buffers: frame header, AEAD tag and
# the RPC envelope (see PROTOCOL.md). Counted so simulated byte totals match TCP closely.
FRAME_OVERHEAD = 40


@dataclass(frozen=True)
class LinkSpec:
    """One direction of a simulated link."""

    latency: float = 0.020  # seconds, one way
    jitter: float = 0.0  # seconds; each message adds uniform(0, jitter)
    bandwidth: float = 12.5e6  # bytes per second (12.5e6 = 100 Mbit/s)
    loss: float = 0.0  # probability that a message is dropped (the caller times out)

    def __post_init__(self) -> None:
        if not (self.latency >= 0 and self.jitter >= 0):
            raise ValueError("latency and jitter must be >= 0 seconds")
        if not self.bandwidth > 0:
            raise ValueError("bandwidth must be > 0 bytes/s (use math.inf for unlimited)")
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError("loss must be a probability in [0, 1]")


class _Link:
    """The state of one directed link: when it is next free to start sending."""

    __slots__ = ("spec", "busy_until")

    def __init__(self, spec: LinkSpec) -> None:
        self.spec = spec
        self.busy_until = 0.0


class SimNetwork:
    """A seeded in-memory network. Create hosts with `add_host`, run them with `host.run(fn)`."""

    def __init__(self, seed: int = 0, default_link: LinkSpec = LinkSpec()) -> None:
        self.rng = random.Random(seed)
        self.default_link = default_link
        self._link_specs: dict[tuple[str, str], LinkSpec] = {}
        self._links: dict[tuple[str, str], _Link] = {}  # directed links in use (pruned when idle)
        self._prune_at = 1024
        self._hosts: dict[str, SimTransport] = {}
        self._side: dict[str, int] = {}  # address -> partition side; empty = no partition
        self._next = 0

    # -- topology -----------------------------------------------------------------------------

    def add_host(self, peer_id: bytes, address: str | None = None) -> SimTransport:
        """A new host (not yet running). Reusing a dead host's address restarts it there."""
        if address is None:
            address = f"sim:{self._next}"
            self._next += 1
        old = self._hosts.get(address)
        if old is not None and old.alive:
            raise ValueError(f"{address} is still running; kill it before restarting it")
        host = SimTransport(self, peer_id, address)
        self._hosts[address] = host
        return host

    def set_link(self, a: str, b: str, spec: LinkSpec, both_ways: bool = True) -> None:
        self._link_specs[(a, b)] = spec
        self._links.pop((a, b), None)
        if both_ways:
            self.set_link(b, a, spec, both_ways=False)

    def partition(self, *sides: Sequence[str]) -> None:
        """Cut every link between different sides; hosts on no side are cut from all."""
        self._side = {addr: i for i, side in enumerate(sides) for addr in side}

    def heal(self) -> None:
        self._side = {}

    def kill(self, address: str) -> None:
        """Crash a host: its tasks are cancelled and it answers nothing from now on."""
        host = self._hosts.get(address)
        if host is not None:
            host._die()

    def host(self, address: str) -> SimTransport | None:
        return self._hosts.get(address)

    def alive(self) -> list[SimTransport]:
        return [h for h in self._hosts.values() if h.alive]

    # -- delivery -----------------------------------------------------------------------------

    def _connected(self, a: str, b: str) -> bool:
        if not self._side:
            return True
        return self._side.get(a, -1) == self._side.get(b, -2)

    def _link(self, a: str, b: str) -> _Link:
        link = self._links.get((a, b))
        if link is None:
            if len(self._links) >= self._prune_at:
                self._prune_idle_links()
            link = self._links[(a, b)] = _Link(self._link_specs.get((a, b), self.default_link))
        return link

    def _prune_idle_links(self) -> None:
        """Forget links with nothing in flight: their state is only `busy_until`, and a link
        created afresh behaves the same once that time has passed. Keeps memory proportional
        to the links in use, not to every pair of hosts that ever talked."""
        now = trio.current_time()
        self._links = {k: v for k, v in self._links.items() if v.busy_until > now}
        self._prune_at = max(1024, 2 * len(self._links))

    def _transit_time(self, a: str, b: str, nbytes: int) -> float | None:
        """Seconds until a message sent now from a arrives at b, or None if it is lost."""
        if not self._connected(a, b):
            return None
        link = self._link(a, b)
        spec = link.spec
        if spec.loss and self.rng.random() < spec.loss:
            return None
        now = trio.current_time()
        start = max(now, link.busy_until)
        link.busy_until = start + (nbytes / spec.bandwidth if math.isfinite(spec.bandwidth) else 0.0)
        jitter = self.rng.uniform(0.0, spec.jitter) if spec.jitter else 0.0
        return link.busy_until + spec.latency + jitter - now


def _encoded_size(method: str, body: dict, buffers: Sequence[Buffer]) -> tuple[bytes, int]:
    packed = msgpack.packb(body, use_bin_type=True)
    if len(packed) > messages.MAX_BODY_BYTES:
        raise LocalProtocolError(f"{method}: body of {len(packed)} bytes exceeds the cap")
    return packed, len(packed) + sum(len(b) for b in buffers) + FRAME_OVERHEAD + len(method)


def _decode_body(packed: bytes) -> dict:
    return msgpack.unpackb(packed, raw=False, strict_map_key=True)


class SimTransport(Transport):
    """One host on a `SimNetwork`."""

    def __init__(self, net: SimNetwork, peer_id: bytes, address: str) -> None:
        self.net = net
        self.peer_id = peer_id
        self.address = address
        self.addresses = (address,)
        self.stats = TrafficStats()
        self._handlers: dict[str, Handler] = {"wire.ping": answer_ping}
        self._nursery: trio.Nursery | None = None
        self._scope: trio.CancelScope | None = None
        self.alive = False

    def route(self, method: str, handler: Handler) -> None:
        messages.lookup(method)  # must be a defined message type
        self._handlers[method] = handler

    async def run(self, main: Callable[[SimTransport], Awaitable[object]] | None = None) -> None:
        """Serve calls (and run `main(self)` beside them) until killed or `aclose()`d."""
        if self.alive:
            raise LocalProtocolError(f"{self.address} is already running")
        self.alive = True
        try:
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as self._nursery:
                    if main is not None:
                        await main(self)
                    await trio.sleep_forever()
        finally:
            self.alive = False
            self._nursery = None

    def _die(self) -> None:
        self.alive = False
        if self._scope is not None:
            self._scope.cancel()

    async def aclose(self) -> None:
        self._die()

    async def call(
        self,
        address: str,
        method: str,
        body: dict,
        buffers: Sequence[Buffer] = (),
        *,
        timeout: float,
        peer_id: bytes | None = None,
    ) -> Reply:
        mt = messages.lookup(method)
        messages.check_outgoing(mt, body, list(buffers), response=False)
        packed, size = _encoded_size(method, body, buffers)
        with trio.move_on_after(timeout):
            try:
                return await self._call(address, mt, packed, size, buffers, peer_id)
            except (PeerUnreachable, RemoteProtocolError):
                self.stats.calls_failed += 1
                raise
        self.stats.calls_failed += 1
        raise PeerTimeout(f"{method} to {address}: no reply within {timeout:g}s")

    async def _call(
        self,
        address: str,
        mt: messages.MessageType,
        packed: bytes,
        size: int,
        buffers: Sequence[Buffer],
        peer_id: bytes | None,
    ) -> Reply:
        net = self.net
        self.stats.count_sent(mt.name, size)
        target = net.host(address)
        transit = net._transit_time(self.address, address, size)
        if transit is None:  # lost or partitioned: silence until the caller's deadline
            await trio.sleep_forever()
        await trio.sleep(transit)
        if target is None or not target.alive or target._nursery is None:
            # Nobody listens there: a real dial is refused after one round trip.
            await trio.sleep(net._link(address, self.address).spec.latency)
            raise PeerUnreachable(f"{address}: connection refused")
        if peer_id is not None and target.peer_id != peer_id:
            raise AuthenticationError(f"{address} is not the peer we expected")
        done = trio.Event()
        outcome: list = []
        target._nursery.start_soon(
            target._serve, self, mt, packed, size, list(buffers), outcome, done
        )
        await done.wait()
        kind, rbody, rbuffers, rsize = outcome[0]
        rtransit = net._transit_time(address, self.address, rsize)
        if rtransit is None:
            await trio.sleep_forever()
        await trio.sleep(rtransit)
        self.stats.count_received(rsize)
        if kind == "error":
            raise RemoteError(rbody["kind"], rbody["message"])
        body = messages.check_response(mt, _decode_body(rbody), rbuffers)
        return Reply(target.peer_id, body, rbuffers)

    async def _serve(
        self,
        caller: SimTransport,
        mt: messages.MessageType,
        packed: bytes,
        size: int,
        buffers: list,
        outcome: list,
        done: trio.Event,
    ) -> None:
        """Runs in the callee's nursery, so killing the callee cancels it mid-handler."""
        self.stats.count_received(size)
        handler = self._handlers.get(mt.name)
        try:
            if handler is None:
                raise RemoteProtocolError(f"no handler for {mt.name}")
            _, body = messages.check_request(mt.name, mt.version, _decode_body(packed), buffers)
            response = await handler(Request(caller.peer_id, caller.address, mt.name, body, buffers))
            if not isinstance(response, Response):
                raise LocalProtocolError(f"handler for {mt.name} returned {type(response).__name__}")
            rbuffers = list(response.buffers)
            messages.check_outgoing(mt, response.body, rbuffers, response=True)
            rpacked, rsize = _encoded_size(mt.name, response.body, rbuffers)
            outcome.append(("ok", rpacked, rbuffers, rsize))
        except RemoteProtocolError as exc:
            self.stats.protocol_errors += 1
            err = {"kind": type(exc).__name__, "message": str(exc)}
            outcome.append(("error", err, [], FRAME_OVERHEAD + len(str(exc))))
        except Exception as exc:  # a handler bug is the caller's RemoteError, never our crash
            err = {"kind": type(exc).__name__, "message": str(exc)[:500]}
            outcome.append(("error", err, [], FRAME_OVERHEAD + len(err["message"])))
        self.stats.count_sent(mt.name, outcome[0][3])
        done.set()
