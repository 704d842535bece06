"""The one interface every layer above the wire talks to: call a peer, answer calls.

Two implementations: `gossip.tcp.TcpTransport` (real sockets, Noise, frames) and
`gossip.sim.SimTransport` (an in-memory network on trio's clock). Membership, the collectives
and the node are written against `Transport` only, so the same code runs a 1,000-node simulated
swarm in one process and a real swarm over the internet.

The contract:
- `call` sends one request and waits for its response, never longer than `timeout`
  (`PeerTimeout`); a peer that cannot be reached raises `PeerUnreachable`; a handler error on the
  other side raises `RemoteError`; a response that breaks its schema raises `RemoteProtocolError`.
- Bodies are msgpack maps checked against the method's `MessageType` (gossip.messages) on
  receipt, on both transports. Buffers are raw bytes that follow the body.
- Handlers receive a `Request` whose body is already validated and return a `Response`.
  An exception in a handler is returned to the caller as a `RemoteError` (name and text only).
- Addresses are opaque strings to the layers above: "host:port" or "[v6]:port" for TCP,
  "sim:<n>" for the simulated network.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Request:
    """A validated incoming call."""

    peer_id: bytes  # the authenticated caller
    address: str | None  # an address the caller announced for itself, if any
    method: str
    body: dict
    buffers: Sequence[Buffer] = ()


@dataclass(frozen=True)
class Response:
    """What a handler returns."""

    body: dict
    buffers: Sequence[Buffer] = ()


@dataclass(frozen=True)
class Reply:
    """What `Transport.call` returns: the validated response and who sent it."""

    peer_id: bytes
    body: dict
    buffers: Sequence[Buffer] = ()


Handler = Callable[[Request], Awaitable[Response]]


async def answer_ping(request: Request) -> Response:
    """Every transport answers `wire.ping` (gossip.messages.PING) with the nonce it was sent."""
    return Response({"nonce": request.body["nonce"]})


@dataclass
class TrafficStats:
    """Counters a node reports; bytes are what crossed the link, framing included."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    calls_failed: int = 0  # our calls that timed out or found the peer unreachable
    protocol_errors: int = 0  # peers dropped for sending invalid bytes or messages
    by_method: dict[str, int] = field(default_factory=dict)  # bytes sent per method

    def count_sent(self, method: str, nbytes: int) -> None:
        self.bytes_sent += nbytes
        self.messages_sent += 1
        self.by_method[method] = self.by_method.get(method, 0) + nbytes

    def count_received(self, nbytes: int) -> None:
        self.bytes_received += nbytes
        self.messages_received += 1


class Transport(abc.ABC):
    """Call peers and answer their calls. Created running; closed with `aclose()`."""

    peer_id: bytes  # our own peer id
    addresses: tuple[str, ...]  # where peers can reach us
    stats: TrafficStats

    @abc.abstractmethod
    def route(self, method: str, handler: Handler) -> None:
        """Answer calls of `method` (a name defined in gossip.messages) with `handler`."""

    @abc.abstractmethod
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
        """Call `method` on the peer at `address` and return its reply within `timeout` seconds.

        With `peer_id`, the peer must prove that identity (else `AuthenticationError`), and an
        open connection to that peer is reused whatever address it came from.
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop answering, close every connection. Idempotent."""
