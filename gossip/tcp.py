"""`TcpTransport`: the real `Transport` — TCP sockets, the Noise secure channel, multiplexed RPC.

    async with open_tcp_transport(identity, swarm, listen=["127.0.0.1:0"]) as transport:
        transport.route("my.method", handler)
        reply = await transport.call("[::1]:7000", "wire.ping", {"nonce": 1}, timeout=5)

One connection per peer pair, found by peer id (or by an address we dialed before) and reused
for every call both ways. When both sides dial each other at once, both keep the connection
dialed by the smaller peer id and end the other with GOAWAY, so calls already on it finish
(`keep_new_connection` decides; a plain function). The number of open connections is bounded:
at the limit the least recently used idle one is closed, and if none is idle a dial fails with
`PeerUnreachable` and an accepted socket is closed at once.

Errors (the same as `SimTransport` from the caller's point of view): no reply in time ->
`PeerTimeout` (also a dial that does not finish within `dial_timeout`); refused, reset,
unresolvable or malformed address -> `PeerUnreachable`; the handler raised -> `RemoteError`;
the answer broke its schema -> `RemoteProtocolError`; the peer is not `peer_id` ->
`AuthenticationError`. trio and OS exceptions are translated here, at the boundary.

`stats.bytes_sent` / `bytes_received` count the bytes that crossed the sockets, handshakes and
AEAD framing included.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import re
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterable, Sequence

import trio

from gossip import messages, sockio
from gossip.channel import SecureStream, open_secure_channel
from gossip.connection import Connection, ConnectionClosing, ConnectionConfig
from gossip.errors import AuthenticationError, PeerTimeout, PeerUnreachable, RemoteProtocolError
from gossip.frames import MAX_FRAME_PLAINTEXT
from gossip.handshake import MAX_ADDRESSES, check_listen_address
from gossip.identity import Identity, SwarmKey, format_peer_id
from gossip.transport import (
    Buffer,
    Handler,
    Reply,
    TrafficStats,
    Transport,
    answer_ping,
)

log = logging.getLogger("murmur.gossip.tcp")

_HOST_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?$")
_CALL_ATTEMPTS = 3  # a call retries on a fresh connection if its pick started closing under it


# -- addresses ---------------------------------------------------------------------------------


def parse_address(text: str) -> tuple[str, int]:
    """"host:port", "[v6]:port" -> (host, port). A clear ValueError says how to write it."""
    if not isinstance(text, str):
        raise ValueError(f"an address is a string like '127.0.0.1:7000', not {type(text).__name__}")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']'; write an IPv6 address as [addr]:port, e.g. [::1]:7000")
        host, rest = text[1:end], text[end + 1 :]
        if not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected ':port' after ']', e.g. [::1]:7000")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} inside [] is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r}: no port; write host:port, e.g. 127.0.0.1:7000")
        if ":" in host:
            raise ValueError(f"{text!r}: put an IPv6 address in brackets, e.g. [{host}]:{port_text}")
        if not _HOST_RE.match(host):
            raise ValueError(f"{text!r}: {host!r} is not an IPv4 address or host name")
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
        raise ValueError(f"{text!r}: the port {port_text!r} is not a number 0..65535")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"{text!r}: the port {port} is above 65535")
    return host, port


def format_address(host: str, port: int) -> str:
    """The inverse of `parse_address`: brackets around IPv6."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- decisions (plain functions) ------------------------------------------------------------------


def keep_new_connection(
    local_id: bytes, remote_id: bytes, old_initiator: bool, old_hash: bytes, new_initiator: bool, new_hash: bytes
) -> bool:
    """Of two connections to one peer, keep the new one? Both ends reach the same answer.

    Dialed from different ends (a simultaneous dial): keep the one the smaller peer id dialed.
    Dialed from the same end (two addresses of one peer raced): keep the smaller handshake hash,
    a value both ends share.
    """
    if old_initiator != new_initiator:
        old_dialer = local_id if old_initiator else remote_id
        new_dialer = local_id if new_initiator else remote_id
        return new_dialer < old_dialer
    return new_hash < old_hash


def trusted_announcements(announced: Iterable[str], peer_ip: str | None) -> list[str]:
    """The announced listen addresses we may map to the peer: IP literals of the IP it came from.

    A peer could announce anybody's address; believing it would route our calls for that
    address to the peer. An address on the very IP the connection came from is the peer's own.
    """
    if peer_ip is None:
        return []
    try:
        ip = ipaddress.ip_address(peer_ip)
    except ValueError:
        return []
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    out = []
    for address in announced:
        try:
            host, port = parse_address(address)
            if ipaddress.ip_address(host) == ip and port:
                out.append(address)
        except ValueError:
            continue  # a host name or garbage: not trusted for reuse
    return out


def pick_idle(connections: Iterable[Connection]) -> Connection | None:
    """The connection to close to make room: the least recently used with nothing in flight."""
    idle = [c for c in connections if c.idle and not c.closed]
    return min(idle, key=lambda c: c.last_used) if idle else None


# -- the transport ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TcpConfig:
    """Bounds and deadlines of a TCP transport."""

    max_connections: int = 256  # open sockets (connections + handshakes in progress), both directions
    dial_timeout: float = 10.0  # seconds for TCP connect + handshake when we dial
    handshake_timeout: float = 10.0  # seconds an accepted socket has to finish its handshake
    close_timeout: float = 5.0  # aclose(): seconds calls in flight get after GOAWAY before a hard close
    frame_size: int = MAX_FRAME_PLAINTEXT  # plaintext per AEAD frame: one RPC chunk per frame
    keepalive_idle: int = 30  # seconds of silence before TCP keepalive probes (finds dead peers)
    connection: ConnectionConfig = field(default_factory=ConnectionConfig)  # per-connection bounds

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        for name in ("dial_timeout", "handshake_timeout", "close_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds")
        if not 1 <= self.frame_size <= MAX_FRAME_PLAINTEXT:
            raise ValueError(f"frame_size must be in [1, {MAX_FRAME_PLAINTEXT}]")
        if self.keepalive_idle < 1:
            raise ValueError("keepalive_idle must be >= 1 second")


class CountingStream(trio.abc.HalfCloseableStream):
    """Counts the bytes that cross a socket stream into `stats` (below the encryption).

    It keeps the socket's fast paths open to the secure channel above it: `receive_into_nowait`
    (with `wait_readable`) reads straight into the caller's buffer, and `copies_on_send` says
    that `send_all` has handed every byte to the kernel when it returns (so the caller may reuse
    its send buffer at once). Both go to the socket directly (`gossip.sockio`) and do not yield
    when the kernel is ready: the secure channel above checkpoints once per call.
    """

    copies_on_send = True

    def __init__(self, stream: trio.SocketStream, stats: TrafficStats) -> None:
        self.stream = stream
        self._stats = stats

    async def send_all(self, data: Buffer) -> None:
        await sockio.send_all(self.stream.socket, data)
        self._stats.bytes_sent += memoryview(data).nbytes

    def receive_into_nowait(self, buffer: memoryview) -> int:
        """What has arrived, into `buffer` (0: end of file); trio.WouldBlock if nothing has."""
        n = sockio.recv_into_nowait(self.stream.socket, buffer)
        self._stats.bytes_received += n
        return n

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self.stream.socket)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.stream.receive_some(max_bytes)
        self._stats.bytes_received += len(data)
        return data

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


class _Dial:
    """One dial in progress; concurrent calls to the same address wait for it."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.conn: Connection | None = None
        self.error: Exception | None = None


class TcpTransport(Transport):
    """Create with `open_tcp_transport`; see the module docstring."""

    def __init__(self, identity: Identity, swarm: SwarmKey, config: TcpConfig, nursery: trio.Nursery) -> None:
        self.identity = identity
        self.swarm = swarm
        self.peer_id = identity.peer_id
        self.addresses: tuple[str, ...] = ()
        self.stats = TrafficStats()
        self.config = config
        self._nursery = nursery
        self._handlers: dict[str, Handler] = {}
        self._conns: set[Connection] = set()  # every connection not yet closed
        self._hash: dict[Connection, bytes] = {}  # handshake hash, for duplicate resolution
        self._by_peer: dict[bytes, Connection] = {}  # the connection calls to a peer use
        self._by_addr: dict[str, bytes] = {}  # address we dialed -> the peer found there (bounded)
        self._dials: dict[str, _Dial] = {}
        self._handshaking = 0
        self._listen_scope = trio.CancelScope()
        self._closing = False
        self._closed = trio.Event()
        self.route(messages.PING.name, answer_ping)

    # -- Transport ---------------------------------------------------------------------------------

    def route(self, method: str, handler: Handler) -> None:
        messages.lookup(method)  # must be a defined message type
        self._handlers[method] = handler

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
        with trio.move_on_after(timeout):
            try:
                return await self._call(address, mt, body, buffers, peer_id)
            except (PeerUnreachable, PeerTimeout, RemoteProtocolError):
                self.stats.calls_failed += 1
                raise
        self.stats.calls_failed += 1
        raise PeerTimeout(f"{method} to {address}: no reply within {timeout:g}s")

    async def aclose(self) -> None:
        """Stop listening, let calls in flight finish (GOAWAY, up to close_timeout), close all."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            self._listen_scope.cancel()
            for conn in list(self._conns):
                conn.start_drain()
            with trio.move_on_after(self.config.close_timeout):
                for conn in list(self._conns):
                    await conn.wait_closed()
            async with trio.open_nursery() as nursery:  # the stragglers, all at once
                for conn in list(self._conns):
                    nursery.start_soon(conn.aclose)
        finally:
            self._closed.set()

    # -- what tests and metrics look at -----------------------------------------------------------

    @property
    def connections(self) -> tuple[Connection, ...]:
        """Every open connection (including ones winding down)."""
        return tuple(self._conns)

    def connection_to(self, peer_id: bytes) -> Connection | None:
        """The connection calls to `peer_id` would use now, if any."""
        conn = self._by_peer.get(peer_id)
        return conn if conn is not None and conn.usable else None

    # -- calls ------------------------------------------------------------------------------------

    async def _call(
        self, address: str, mt: messages.MessageType, body: dict, buffers: Sequence[Buffer], peer_id: bytes | None
    ) -> Reply:
        for _ in range(_CALL_ATTEMPTS):
            conn = await self._connection_for(address, peer_id)
            try:
                rbody, rbuffers = await conn.call(mt, body, buffers)
            except ConnectionClosing:
                continue  # it began closing before our request went out: nothing was sent
            return Reply(conn.peer_id, rbody, rbuffers)
        raise PeerUnreachable(f"{address}: every connection closed before the call could be sent")

    async def _connection_for(self, address: str, peer_id: bytes | None) -> Connection:
        if self._closing:
            raise PeerUnreachable("this transport is closed")
        known = peer_id if peer_id is not None else self._by_addr.get(address)
        if known is not None and (conn := self.connection_to(known)) is not None:
            return conn
        dial = self._dials.get(address)
        if dial is None:
            # The dial runs in the transport's nursery: a caller giving up does not abort it for
            # the others waiting, and it is bounded by dial_timeout.
            dial = self._dials[address] = _Dial()
            self._nursery.start_soon(self._dial, address, dial)
        await dial.done.wait()
        if dial.error is not None:
            raise type(dial.error)(str(dial.error))  # a fresh exception per waiting task
        assert dial.conn is not None
        if peer_id is not None and dial.conn.peer_id != peer_id:
            raise AuthenticationError(
                f"{address} is peer {format_peer_id(dial.conn.peer_id)}, not {format_peer_id(peer_id)}"
            )
        return self.connection_to(dial.conn.peer_id) or dial.conn

    async def _dial(self, address: str, dial: _Dial) -> None:
        try:
            dial.conn = await self._open(address)
            self._remember(address, dial.conn.peer_id)
        except (PeerUnreachable, PeerTimeout, RemoteProtocolError) as exc:
            dial.error = exc
        except Exception as exc:  # a bug must not take the transport down with it
            log.exception("dialing %s failed unexpectedly", address)
            dial.error = PeerUnreachable(f"{address}: dial failed ({type(exc).__name__}: {exc})")
        finally:
            del self._dials[address]
            dial.done.set()

    async def _open(self, address: str) -> Connection:
        """Dial `address`, run the handshake, start the connection. Errors already translated."""
        try:
            host, port = parse_address(address)
        except ValueError as exc:
            raise PeerUnreachable(str(exc)) from None
        if port == 0:
            raise PeerUnreachable(f"{address}: port 0 cannot be dialed")
        if not await self._make_room():
            raise PeerUnreachable(f"{address}: {self.config.max_connections} connections open, none idle")
        try:
            try:
                with trio.fail_after(self.config.dial_timeout):
                    tcp = await trio.open_tcp_stream(host, port)
                    _keepalive(tcp, self.config.keepalive_idle)
                    secure = await open_secure_channel(
                        CountingStream(tcp, self.stats), identity=self.identity, swarm=self.swarm, initiator=True,
                        listen_addrs=self.addresses, timeout=self.config.dial_timeout,
                        frame_size=self.config.frame_size,
                    )
            except trio.TooSlowError:
                raise PeerTimeout(f"{address}: no connection within {self.config.dial_timeout:g}s") from None
            except OSError as exc:  # refused, unreachable, unresolvable (gaierror)
                raise PeerUnreachable(f"{address}: {_os_reason(exc)}") from None
            except AuthenticationError as exc:
                raise AuthenticationError(f"{address}: {exc}") from None
        finally:
            self._handshaking -= 1
        if secure.peer.peer_id == self.peer_id or self._closing:
            await secure.aclose()
            raise PeerUnreachable(f"{address} is this node itself" if not self._closing else "this transport is closed")
        conn = self._adopt(secure, initiator=True)
        self._nursery.start_soon(self._run, conn)
        return conn

    async def _make_room(self) -> bool:
        """Reserve a socket slot (counted in _handshaking), closing an idle connection if full."""
        if self._closing:
            return False
        if len(self._conns) + self._handshaking >= self.config.max_connections:
            victim = pick_idle(self._conns)
            if victim is None:
                return False
            self._handshaking += 1  # reserve before waiting, so nobody else takes the slot
            log.info("closing idle connection to %s to stay within %d", victim.label, self.config.max_connections)
            await victim.aclose()
            return True
        self._handshaking += 1
        return True

    # -- accepting --------------------------------------------------------------------------------

    async def _listen(self, listen: Sequence[str], announce: Sequence[str] | None) -> None:
        listeners: list[trio.SocketListener] = []
        try:
            for text in listen:
                host, port = parse_address(text)
                try:
                    listeners += await trio.open_tcp_listeners(port, host=host)
                except OSError as exc:
                    raise OSError(exc.errno, f"cannot listen on {text}: {exc.strerror or exc}") from None
        except BaseException:
            for listener in listeners:
                await listener.aclose()
            raise
        bound = tuple(format_address(*listener.socket.getsockname()[:2]) for listener in listeners)
        self.addresses = tuple(announce) if announce is not None else bound
        try:  # they go into every hello we send: refuse what the handshake would refuse, now
            if len(self.addresses) > MAX_ADDRESSES:
                raise ValueError(f"at most {MAX_ADDRESSES} addresses can be announced, not {len(self.addresses)}")
            for address in self.addresses:
                check_listen_address(address)
        except ValueError:
            for listener in listeners:
                await listener.aclose()
            raise
        if listeners:
            self._nursery.start_soon(self._serve, listeners)

    async def _serve(self, listeners: list[trio.SocketListener]) -> None:
        try:
            with self._listen_scope:
                await trio.serve_listeners(self._accept, listeners, handler_nursery=self._nursery)
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    async def _accept(self, tcp: trio.SocketStream) -> None:
        if not await self._make_room():
            await trio.aclose_forcefully(tcp)
            return
        try:
            _keepalive(tcp, self.config.keepalive_idle)
            secure = await open_secure_channel(
                CountingStream(tcp, self.stats), identity=self.identity, swarm=self.swarm, initiator=False,
                listen_addrs=self.addresses, timeout=self.config.handshake_timeout, frame_size=self.config.frame_size,
            )
        except RemoteProtocolError as exc:  # wrong swarm, bad signature, garbage
            self.stats.protocol_errors += 1
            log.warning("refused an incoming connection: %s", exc)
            return
        except (PeerTimeout, PeerUnreachable, OSError) as exc:
            log.info("incoming handshake failed: %s", exc)
            return
        finally:
            self._handshaking -= 1
        if secure.peer.peer_id == self.peer_id or self._closing:
            await secure.aclose()
            return
        for address in trusted_announcements(secure.peer.addresses, _peer_ip(tcp)):
            self._remember(address, secure.peer.peer_id)  # so calling it back reuses this one
        # serve_listeners closes the socket when this handler returns: run the connection here.
        await self._run(self._adopt(secure, initiator=False))

    # -- connection registry ------------------------------------------------------------------------

    def _adopt(self, secure: SecureStream, *, initiator: bool) -> Connection:
        peer = secure.peer
        conn = Connection(
            secure, peer_id=peer.peer_id, handlers=self._handlers, stats=self.stats,
            address=peer.addresses[0] if peer.addresses else None, initiator=initiator,
            config=self.config.connection, label=format_peer_id(peer.peer_id)[:12],
        )
        conn.on_goaway.append(self._forget)
        self._conns.add(conn)
        self._hash[conn] = secure.handshake_hash
        old = self.connection_to(peer.peer_id)
        if old is None:
            self._by_peer[peer.peer_id] = conn
        elif keep_new_connection(self.peer_id, peer.peer_id, old.initiator, self._hash[old], initiator, self._hash[conn]):
            self._by_peer[peer.peer_id] = conn
            old.start_drain()
        else:
            conn.start_drain()
        return conn

    async def _run(self, conn: Connection) -> None:
        try:
            await conn.run()
        finally:
            self._conns.discard(conn)
            self._hash.pop(conn, None)
            self._forget(conn)

    def _remember(self, address: str, peer_id: bytes) -> None:
        self._by_addr.pop(address, None)
        self._by_addr[address] = peer_id
        if len(self._by_addr) > 4 * self.config.max_connections:
            del self._by_addr[next(iter(self._by_addr))]  # the oldest entry

    def _forget(self, conn: Connection) -> None:
        if self._by_peer.get(conn.peer_id) is conn:
            del self._by_peer[conn.peer_id]


def _os_reason(exc: OSError) -> str:
    """The kernel's words for a failed connect; trio groups one error per address tried."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        reasons = sorted({e.strerror or str(e) for e in cause.exceptions if isinstance(e, OSError)})
        if reasons:
            return "; ".join(reasons)
    return exc.strerror or str(exc)


def _peer_ip(tcp: trio.SocketStream) -> str | None:
    try:
        return tcp.socket.getpeername()[0]
    except OSError:
        return None


def _keepalive(tcp: trio.SocketStream, idle: int) -> None:
    """TCP keepalive, so a peer that vanished without a FIN is noticed (where the OS allows)."""
    try:
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // 3))
            tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    except OSError:
        pass  # keepalive is a refinement; the socket works without it


@asynccontextmanager
async def open_tcp_transport(
    identity: Identity,
    swarm: SwarmKey,
    listen: Sequence[str] = ("127.0.0.1:0",),
    *,
    max_connections: int | None = None,
    dial_timeout: float | None = None,
    announce: Sequence[str] | None = None,
    config: TcpConfig | None = None,
) -> AsyncIterator[TcpTransport]:
    """A running `TcpTransport` listening on `listen` ("host:port", "[v6]:port", port 0 = any).

    `addresses` holds the bound addresses (port 0 resolved), or `announce` if given (e.g. a
    public address in front of a NAT). `max_connections` / `dial_timeout` override `config`.
    Leaving the block closes the transport gracefully (`aclose`). An exception from the block
    comes out as itself, not wrapped in an ExceptionGroup by the transport's own nursery.
    """
    config = config or TcpConfig()
    overrides = {k: v for k, v in (("max_connections", max_connections), ("dial_timeout", dial_timeout)) if v is not None}
    if overrides:
        config = dataclasses.replace(config, **overrides)
    for text in listen:
        parse_address(text)  # a typo fails here, with the ValueError that says how to fix it
    try:
        async with trio.open_nursery() as nursery:
            transport = TcpTransport(identity, swarm, config, nursery)
            try:
                await transport._listen(listen, announce)
                yield transport
            finally:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(config.close_timeout + config.connection.flush_timeout + 1):
                        await transport.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Our own tasks do not raise, so a lone exception is the block's (or the bind's): give
        # it back as it was raised. Anything more is a real group and stays one.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
