"""One RPC connection: the trio pump around `gossip.rpc.RpcProtocol` on any byte stream.

Three tasks per connection: one receives (bytes -> events -> waiters and handler tasks), one
sends (whatever `pieces_to_send()` hands out: control messages first, then one bulk chunk at a
time), one watches that no write stays blocked longer than `stall_timeout`. Many calls share the
connection; each waits on its own id. All decisions about bytes live in the sans-IO core; this
module only moves bytes, runs handlers and keeps deadlines. On a `SecureStream` chunk payloads
are decrypted straight into the buffers being assembled (`RpcProtocol.chunk_target`), and bytes
that are already here are taken without a pass through the scheduler (one per 4 MiB at least).

How a connection ends, and what callers see:
- the peer sends invalid bytes or messages -> it is dropped (one warning line, counted in
  `stats.protocol_errors`); a call whose answer broke the schema raises `RemoteProtocolError`,
  the other calls in flight `PeerUnreachable`;
- the stream breaks or the peer closes it -> calls in flight raise `PeerUnreachable`;
- either side sends GOAWAY (`start_drain`) -> no new calls; calls in flight finish; then the
  stream is half-closed and closed. This is how duplicate connections and `aclose` end politely.
Every wait is bounded: flushing before a close by `flush_timeout`, the peer's end of stream
after ours by `close_timeout`, each call by the deadline its caller puts around it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import trio

from gossip.errors import LocalProtocolError, PeerUnreachable, RemoteError, RemoteProtocolError
from gossip.messages import MessageType
from gossip.rpc import (
    NEED_DATA,
    CallProtocolError,
    CancelReceived,
    ConnectionEnded,
    ErrorReceived,
    GoAwayReceived,
    RequestReceived,
    ResponseReceived,
    RpcLimits,
    RpcProtocol,
)
from gossip.transport import Buffer, Handler, Request, Response, TrafficStats

log = logging.getLogger("murmur.gossip.connection")

MAX_HANDLER_ERROR = 500  # chars of a handler's exception text sent back (as the sim does)
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
# Most bytes the receive loop takes from a stream without yielding to other tasks (at about
# 1 GB/s, a few milliseconds).
_NOWAIT_BYTES = 4 << 20


@dataclass(frozen=True)
class ConnectionConfig:
    """Bounds and deadlines of one connection."""

    limits: RpcLimits = field(default_factory=RpcLimits)  # in-flight calls and chunk size
    receive_bytes: int | None = None  # max bytes per receive_some; None = whatever the stream has (a whole frame)
    flush_timeout: float = 2.0  # seconds to get queued bytes out before closing (error reply, GOAWAY)
    close_timeout: float = 5.0  # seconds to wait for the peer's end of stream after ours
    drain_timeout: float = 60.0  # seconds calls in flight get after GOAWAY before a hard close
    stall_timeout: float = 60.0  # seconds one write may block (the peer not reading) before we drop it

    def __post_init__(self) -> None:
        if self.receive_bytes is not None and self.receive_bytes < 1:
            raise ValueError("receive_bytes must be >= 1, or None for whole frames")
        if not min(self.flush_timeout, self.close_timeout, self.drain_timeout, self.stall_timeout) > 0:
            raise ValueError("flush_timeout, close_timeout, drain_timeout and stall_timeout must be > 0 seconds")


class ConnectionClosing(PeerUnreachable):
    """The connection is winding down (GOAWAY or closed): open or pick another one."""


class _Waiter:
    __slots__ = ("event", "body", "buffers", "error")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.body: dict | None = None
        self.buffers: list = []
        self.error: Exception | None = None

    def resolve(self, body: dict | None = None, buffers: list | None = None, error: Exception | None = None) -> None:
        if not self.event.is_set():
            self.body, self.buffers, self.error = body, buffers or [], error
            self.event.set()


class Connection:
    """Calls and answers over one stream to one authenticated peer. Run it with `run()`."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        peer_id: bytes,
        handlers: Mapping[str, Handler],
        stats: TrafficStats | None = None,
        address: str | None = None,
        initiator: bool = True,
        config: ConnectionConfig = ConnectionConfig(),
        label: str = "",
    ) -> None:
        self.peer_id = peer_id
        self.address = address  # an address the peer announced for itself, if any
        self.initiator = initiator  # True if we dialed
        self.config = config
        self.stats = stats if stats is not None else TrafficStats()
        self.label = label or peer_id.hex()[:12]
        self.last_used = trio.current_time()
        self._stream = stream
        self._handlers = handlers
        self._proto = RpcProtocol(config.limits, self.stats)
        self._slots = trio.Semaphore(config.limits.max_calls)
        self._waiters: dict[int, _Waiter] = {}
        self._handler_scopes: dict[int, trio.CancelScope] = {}
        self._wakeup = trio.Event()
        self._ending: str | None = None  # why the connection ends; set once
        self._done = trio.Event()  # set with _ending
        self._send_exited = trio.Event()
        self._closed = trio.Event()  # run() has returned and the stream is closed
        self._violation: RemoteProtocolError | None = None
        self._drain_by = float("inf")  # after GOAWAY: the time by which we close regardless
        self._write_began: float | None = None  # when the write in progress started
        self._stalled = False  # _watch_stalls gave up on the peer
        self._send_scope = trio.CancelScope()  # the send loop's, replaced when it starts
        self.on_goaway: list[Callable[[Connection], None]] = []  # called when the peer says GOAWAY

    # -- state ------------------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """New calls may start here (not ending, not draining)."""
        return self._ending is None and not self._proto.goaway_sent and not self._proto.goaway_received

    @property
    def idle(self) -> bool:
        return self._proto.idle and not self._waiters and not self._handler_scopes

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def ending_reason(self) -> str | None:
        return self._ending

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # -- calls ------------------------------------------------------------------------------------

    async def call(self, mt: MessageType, body: dict, buffers: Sequence[Buffer] = ()) -> tuple[dict, list]:
        """Send one request and wait for its answer; cancel the wait to cancel the call.

        Raises RemoteError (the handler failed), RemoteProtocolError (the answer broke its
        schema), PeerUnreachable (the connection ended first; ConnectionClosing if it was
        already winding down), LocalProtocolError (our own message is invalid).
        """
        async with self._slots:
            if not self.usable:
                raise ConnectionClosing(f"connection to {self.label} is {self._ending or 'closing'}")
            call_id = self._proto.start_call(mt, body, buffers)
            self.last_used = trio.current_time()
            waiter = self._waiters[call_id] = _Waiter()
            self._wake()
            try:
                await waiter.event.wait()
            finally:
                del self._waiters[call_id]
                if not waiter.event.is_set():  # cancelled or timed out: tell the peer
                    self._proto.cancel_call(call_id)
                    self._wake()
        if waiter.error is not None:
            raise waiter.error
        assert waiter.body is not None
        return waiter.body, waiter.buffers

    def start_drain(self) -> None:
        """Send GOAWAY: no new calls either way; close once the calls in flight are done."""
        if self._ending is None:
            self._proto.send_goaway()
            self._arm_drain_deadline()

    def _arm_drain_deadline(self) -> None:
        if self._drain_by == float("inf"):
            self._drain_by = trio.current_time() + self.config.drain_timeout
        self._wake()

    async def aclose(self) -> None:
        """Close now: queued bytes get `flush_timeout` to leave, calls in flight fail."""
        self._end("closed by us")
        await self._closed.wait()

    # -- the pump ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Pump until the connection ends. Peer misbehaviour never escapes as an exception."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._receive_loop)
                nursery.start_soon(self._send_loop)
                nursery.start_soon(self._watch_stalls)
                await self._done.wait()
                with trio.move_on_after(self.config.flush_timeout):
                    await self._send_exited.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._end("closed")
            self._fail_waiters()
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self._stream)
            self._closed.set()

    def _wake(self) -> None:
        self._wakeup.set()

    def _end(self, reason: str) -> None:
        if self._ending is None:
            self._ending = reason
            self._done.set()
            self._wake()

    def _fail_waiters(self) -> None:
        for call_id, waiter in list(self._waiters.items()):
            v = self._violation
            if isinstance(v, CallProtocolError) and v.call_id == call_id:
                waiter.resolve(error=RemoteProtocolError(str(v)))
            else:
                waiter.resolve(error=PeerUnreachable(f"connection to {self.label} {self._ending}"))

    async def _send_loop(self) -> None:
        try:
            with trio.CancelScope() as self._send_scope:
                await self._pump_out()
            if self._stalled:
                self._end(f"stalled: the peer read nothing for {self.config.stall_timeout:g}s")
        except _STREAM_ERRORS as exc:
            self._end(f"lost while sending ({type(exc).__name__}: {exc})")
        finally:
            self._send_exited.set()

    async def _pump_out(self) -> None:
        proto, stream = self._proto, self._stream
        send_parts = getattr(stream, "send_parts", None)  # SecureStream: one frame per piece
        unyielded = 0  # bytes written since the last checkpoint
        while True:
            if self._wakeup.is_set():
                self._wakeup = trio.Event()
            pieces = proto.pieces_to_send()
            if pieces is not None:
                # One write is at most a chunk or a batch of control messages; _watch_stalls
                # drops a peer that takes longer than stall_timeout to read one.
                self._write_began = trio.current_time()
                if send_parts is not None:
                    # A write the kernel takes at once need not yield to the scheduler: we do so
                    # once per _NOWAIT_BYTES (and whenever the socket makes us wait).
                    size = sum(len(p) for p in pieces)
                    unyielded += size
                    await send_parts(pieces, checkpoint=unyielded >= _NOWAIT_BYTES)
                    if unyielded >= _NOWAIT_BYTES:
                        unyielded = 0
                else:
                    for piece in pieces:
                        await stream.send_all(piece)
                self._write_began = None
                continue
            if self._ending is not None:
                return  # everything queued is out
            if proto.finished:
                await self._finish_gracefully()
                return
            with trio.move_on_at(self._drain_by):
                await self._wakeup.wait()
            if trio.current_time() >= self._drain_by:
                self._end(f"closed: calls still in flight {self.config.drain_timeout:g}s after GOAWAY")

    async def _watch_stalls(self) -> None:
        """Cancel the send loop when one write has been blocked for stall_timeout seconds.

        One sleeping task per connection instead of a deadline per write (a cancel scope per
        chunk costs more than the rest of the chunk's bookkeeping).
        """
        stall = self.config.stall_timeout
        while True:
            began = self._write_began
            if began is None:
                await trio.sleep(stall)
                continue
            await trio.sleep_until(began + stall)
            if self._write_began == began:  # the same write, still blocked
                self._stalled = True
                self._send_scope.cancel()
                return

    async def _finish_gracefully(self) -> None:
        # Both sides said GOAWAY and nothing is in flight: half-close so the peer reads every
        # byte we sent, then wait (bounded) for its end of stream before closing.
        if isinstance(self._stream, trio.abc.HalfCloseableStream):
            await self._stream.send_eof()
            with trio.move_on_after(self.config.close_timeout):
                await self._done.wait()
        self._end("closed after GOAWAY")

    async def _receive_loop(self) -> None:
        proto, stream = self._proto, self._stream
        limit = self.config.receive_bytes
        # A SecureStream gets chunk payloads decrypted straight into the buffers being assembled
        # (`receive_into`: no copy), and hands over what is already here without a trip through
        # the scheduler (`*_nowait`): we yield when we would wait, or after _NOWAIT_BYTES.
        receive_into = getattr(stream, "receive_into", None)
        into_nowait = getattr(stream, "receive_into_nowait", None)
        some_nowait = getattr(stream, "receive_some_nowait", None)
        fast = receive_into is not None and into_nowait is not None and some_nowait is not None
        unyielded = 0  # bytes taken without yielding since the last await
        try:
            while True:
                target = proto.chunk_target() if fast else None
                if target is not None and limit is not None:
                    target = target[:limit]
                got: int | bytes | bytearray | None = None
                if fast and unyielded < _NOWAIT_BYTES:
                    try:
                        got = into_nowait(target) if target is not None else some_nowait(limit)
                    except trio.WouldBlock:
                        pass
                if got is None:
                    got = await (receive_into(target) if target is not None else stream.receive_some(limit))
                    unyielded = 0
                else:
                    unyielded += got if type(got) is int else len(got)  # type: ignore[arg-type]
                if target is not None:
                    proto.chunk_received(got)  # type: ignore[arg-type]
                else:
                    proto.receive_data(got)  # type: ignore[arg-type]
                dispatched = False
                while (event := proto.next_event()) is not NEED_DATA:
                    if isinstance(event, ConnectionEnded):
                        self._end("closed after GOAWAY" if proto.finished else "closed by the peer")
                        return
                    self._dispatch(event)
                    dispatched = True
                # Most reads are bulk bytes that change nothing for the sender: waking it costs a
                # task switch per read. Wake it when something came of the bytes.
                if dispatched or proto.has_output or proto.finished:
                    self._wake()
        except RemoteProtocolError as exc:
            self._violation = exc
            self.stats.protocol_errors += 1
            log.warning("dropping connection to %s (%s): %s", self.label, self.address or "?", exc)
            self._end(f"dropped: the peer broke the protocol ({exc})")
        except _STREAM_ERRORS as exc:
            self._end(f"lost ({type(exc).__name__}: {exc})")

    def _dispatch(self, event: object) -> None:
        if isinstance(event, RequestReceived):
            self.last_used = trio.current_time()
            self._handler_scopes[event.request_id] = scope = trio.CancelScope()
            self._nursery.start_soon(self._handle, event, scope)
        elif isinstance(event, ResponseReceived):
            waiter = self._waiters.get(event.call_id)
            if waiter is not None:
                waiter.resolve(event.body, event.buffers)
        elif isinstance(event, ErrorReceived):
            waiter = self._waiters.get(event.call_id)
            if waiter is not None:
                waiter.resolve(error=RemoteError(event.kind, event.message))
        elif isinstance(event, CancelReceived):
            scope = self._handler_scopes.get(event.request_id)
            if scope is not None:
                scope.cancel()
        elif isinstance(event, GoAwayReceived):
            self._arm_drain_deadline()
            for callback in self.on_goaway:
                callback(self)

    async def _handle(self, event: RequestReceived, scope: trio.CancelScope) -> None:
        proto, rid, name = self._proto, event.request_id, event.message_type.name
        try:
            with scope:
                handler = self._handlers.get(name)
                if handler is None:
                    proto.respond_error(rid, "RemoteProtocolError", f"no handler for {name}")
                    return
                request = Request(self.peer_id, self.address, name, event.body, event.buffers)
                try:
                    response = await handler(request)
                except Exception as exc:  # a handler bug is the caller's RemoteError, never our crash
                    if isinstance(exc, RemoteProtocolError):
                        self.stats.protocol_errors += 1
                    proto.respond_error(rid, type(exc).__name__, str(exc)[:MAX_HANDLER_ERROR])
                    return
                if not isinstance(response, Response):
                    proto.respond_error(rid, "LocalProtocolError", f"handler for {name} returned {type(response).__name__}")
                    return
                try:
                    proto.respond(rid, response.body, response.buffers)
                except LocalProtocolError as exc:
                    proto.respond_error(rid, "LocalProtocolError", str(exc)[:MAX_HANDLER_ERROR])
        finally:
            del self._handler_scopes[rid]
            self._wake()
