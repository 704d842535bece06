"""Multiplexed RPC on one byte stream, sans-IO: envelopes, message framing, chunks, request ids.

`RpcProtocol` never touches a socket or imports trio (h11 style): `start_call` / `respond` /
`cancel_call` queue messages, `pieces_to_send()` hands out the next write (control
messages first, then at most one bulk chunk), `receive_data(bytes)` buffers what arrived and
`next_event()` returns the next event or `NEED_DATA`. `gossip.connection` pumps it over a stream.

On the (already decrypted) stream every message is `length:u32be kind:u8 payload`
(`gossip.rpc_wire` holds the encodings). Requests, responses, errors and cancels are msgpack
maps; the raw buffers of a request or response follow their header as CHUNK messages of at most
`CHUNK_BYTES`, interleaved round-robin with other transfers, so a control message never waits
behind more than one chunk. PROTOCOL.md ("Messages and RPC") documents every byte.

Everything from the peer is checked before it is used: the length prefix against the cap of
its kind before a byte of the payload is buffered, msgpack with hard limits and no ext types,
the envelope against a schema, the body against its `MessageType`, and the declared buffer sizes
against that type's bounds before any chunk is accepted. Violations raise `RemoteProtocolError`
and the protocol object is dead from then on (the connection is dropped).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Sequence

from gossip import messages
from gossip.errors import LocalProtocolError, RemoteProtocolError
from gossip.messages import MessageType
from gossip.rpc_wire import (
    CANCEL,
    CHUNK_BYTES,
    CHUNK_HEAD,
    CHUNK_OVERHEAD,
    ERROR,
    GOAWAY,
    GOAWAY_MESSAGE,
    HEAD,
    KIND_NAMES,
    MAX_CONTROL_BYTES,
    REQUEST,
    REQUEST_CHUNK,
    RESPONSE,
    RESPONSE_CHUNK,
    Assembly,
    Declared,
    buffer_views,
    check_length,
    decode_control,
    encode_control,
    pack_cancel,
    pack_error,
)
from gossip.transport import Buffer, TrafficStats


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()  # next_event(): nothing complete yet, feed more bytes


class CallProtocolError(RemoteProtocolError):
    """The peer broke the protocol in its answer to one of our calls (`call_id`)."""

    def __init__(self, message: str, call_id: int) -> None:
        super().__init__(message)
        self.call_id = call_id


# -- events ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestReceived:
    request_id: int
    message_type: MessageType
    body: dict  # validated against message_type.request
    buffers: list[memoryview]  # writable, format "B"


@dataclass(frozen=True)
class ResponseReceived:
    call_id: int
    body: dict  # validated against the call's message type
    buffers: list[memoryview]  # writable, format "B"


@dataclass(frozen=True)
class ErrorReceived:
    call_id: int
    kind: str
    message: str


@dataclass(frozen=True)
class CancelReceived:
    request_id: int  # a request delivered as RequestReceived whose handler should stop


@dataclass(frozen=True)
class GoAwayReceived:
    """The peer will send no new requests on this connection."""


@dataclass(frozen=True)
class ConnectionEnded:
    """The peer closed the stream at a message boundary."""


Event = RequestReceived | ResponseReceived | ErrorReceived | CancelReceived | GoAwayReceived | ConnectionEnded


# -- bookkeeping -------------------------------------------------------------------------------


class _Out:
    """A queued control message."""

    __slots__ = ("data", "method", "request_id", "sent")

    def __init__(self, data: bytes, method: str | None, request_id: int = 0) -> None:
        self.data = data
        self.method = method  # counted in stats as a message of this method; None: not counted
        self.request_id = request_id  # an answer to this request: done once sent (if no buffers)
        self.sent = False


class _Transfer:
    """The buffers of one outgoing message, handed out chunk by chunk."""

    __slots__ = ("kind", "id", "views", "index", "offset", "method")

    def __init__(self, kind: int, id_: int, buffers: Sequence[Buffer], method: str) -> None:
        self.kind = kind
        self.id = id_
        self.views = [v for v in (memoryview(b).cast("B") for b in buffers) if len(v)]
        self.index = 0
        self.offset = 0
        self.method = method

    @property
    def done(self) -> bool:
        return self.index == len(self.views)


class _Call:
    __slots__ = ("mt", "header", "transfer", "assembly", "body")

    def __init__(self, mt: MessageType, header: _Out, transfer: _Transfer | None) -> None:
        self.mt = mt
        self.header = header
        self.transfer = transfer  # None once all request chunks are out
        self.assembly: Assembly | None = None  # the response's buffers while they arrive
        self.body: dict | None = None


class _Inbound:
    __slots__ = ("mt", "state", "body", "assembly", "transfer")

    def __init__(self, mt: MessageType, body: dict, assembly: Assembly) -> None:
        self.mt = mt
        self.state = "assembling"  # -> "handling" -> "responding"
        self.body = body
        self.assembly = assembly
        self.transfer: _Transfer | None = None


@dataclass(frozen=True)
class RpcLimits:
    """Bounds on one connection's RPC state; each one caps a queue or a table."""

    # Our calls in flight on the connection (start_call refuses more; the pump queues callers).
    # Equal to max_inbound by default, so two default peers never refuse each other's calls:
    # the callee frees a slot (last answer byte sent) before the caller does (last byte read).
    max_calls: int = 64
    max_inbound: int = 64  # peer requests being received, handled or answered; more get "Overloaded"
    chunk_bytes: int = CHUNK_BYTES  # raw bytes per chunk we send (<= CHUNK_BYTES)

    def __post_init__(self) -> None:
        if self.max_calls < 1 or self.max_inbound < 1:
            raise ValueError("max_calls and max_inbound must be >= 1 (they bound in-flight calls)")
        if not 1 <= self.chunk_bytes <= CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in [1, {CHUNK_BYTES}] (peers refuse larger chunks)")

    @property
    def max_control_queue(self) -> int:
        # Headers, answers, refusals and cancels all derive from these two bounds.
        return 2 * (self.max_calls + self.max_inbound) + 16


class RpcProtocol:
    """Both directions of RPC on one connection, as a state machine fed bytes (no I/O).

    Each side numbers its own calls 1, 2, 3, ... so a request id and a response id live in
    different spaces: a REQUEST/CANCEL/REQUEST_CHUNK carries the caller's id, a
    RESPONSE/ERROR/RESPONSE_CHUNK echoes it back.
    """

    def __init__(self, limits: RpcLimits = RpcLimits(), stats: TrafficStats | None = None) -> None:
        self.limits = limits
        self.stats = stats if stats is not None else TrafficStats()
        # Our calls.
        self._next_call_id = 1
        self._calls: dict[int, _Call] = {}
        # The peer's calls.
        self._last_request_id = 0
        self._inbound: dict[int, _Inbound] = {}
        self._discard_requests: dict[int, None] = {}  # refused requests whose chunks we skip (ordered)
        # Outgoing bytes: control messages strictly before chunks, transfers round-robin.
        self._control: deque[_Out] = deque()
        self._transfers: deque[_Transfer] = deque()
        # Incoming bytes: `_rbuf` holds the start of a message split across reads (copied),
        # `_view` the latest data given to receive_data (not copied), unread from `_vpos` on.
        self._rbuf = bytearray()
        self._view = memoryview(b"")
        self._vpos = 0
        self._in_chunk = False
        self._chunk_kind = 0
        self._chunk_id = 0
        self._chunk_left = 0
        self._chunk_view: memoryview | None = None  # None: the chunk's bytes are skipped
        self._chunk_off = 0
        self._eof = False
        self._error: RemoteProtocolError | None = None
        self.goaway_sent = False
        self.goaway_received = False

    # -- state the pump looks at -----------------------------------------------------------------

    @property
    def broken(self) -> bool:
        return self._error is not None

    @property
    def can_start_call(self) -> bool:
        return (self._error is None and not self.goaway_sent and not self.goaway_received
                and len(self._calls) < self.limits.max_calls)

    @property
    def idle(self) -> bool:
        """No call in flight either way and nothing left to send."""
        return not (self._calls or self._inbound or self._control or self._transfers)

    @property
    def has_output(self) -> bool:
        """Something is queued to send (control messages or chunks)."""
        return bool(self._control or self._transfers)

    @property
    def finished(self) -> bool:
        """Both sides said GOAWAY and all their calls are answered: the stream may be closed."""
        return self.goaway_sent and self.goaway_received and self.idle

    @property
    def buffered_bytes(self) -> int:
        """Received bytes held for a message that is not complete yet (bounded by the caps)."""
        return len(self._rbuf) + len(self._view) - self._vpos

    # -- sending -----------------------------------------------------------------------------------

    def start_call(self, mt: MessageType, body: dict, buffers: Sequence[Buffer] = ()) -> int:
        """Queue a request; returns its call id. Its answer comes back as an event with that id."""
        if self._error is not None:
            raise LocalProtocolError("the connection is broken; open a new one")
        if self.goaway_sent or self.goaway_received:
            raise LocalProtocolError("the connection is closing (GOAWAY); open a new one")
        if len(self._calls) >= self.limits.max_calls:
            raise LocalProtocolError(f"already {self.limits.max_calls} calls in flight; wait for one")
        views = buffer_views(buffers)
        messages.check_outgoing(mt, body, views, response=False)
        call_id = self._next_call_id
        sizes = [len(v) for v in views]
        data = encode_control(REQUEST, {"id": call_id, "type": mt.name, "v": mt.version,
                                        "body": body, "bufs": sizes})
        self._next_call_id += 1
        header = self._queue(_Out(data, mt.name))
        transfer = None
        if sum(sizes):
            transfer = _Transfer(REQUEST_CHUNK, call_id, views, mt.name)
            self._transfers.append(transfer)
        self._calls[call_id] = _Call(mt, header, transfer)
        return call_id

    def cancel_call(self, call_id: int) -> None:
        """Give up on a call: unsent parts are dropped, a sent request gets a CANCEL."""
        call = self._calls.pop(call_id, None)
        if call is None:
            return
        if call.transfer is not None:
            self._transfers.remove(call.transfer)
        if not call.header.sent:
            self._control.remove(call.header)
        elif self._error is None:
            self._queue(_Out(pack_cancel(call_id), None))

    def respond(self, request_id: int, body: dict, buffers: Sequence[Buffer] = ()) -> bool:
        """Answer a delivered request. False if it was cancelled meanwhile (nothing is sent).

        A response that breaks our own schema raises LocalProtocolError and sends nothing, so
        the caller can answer with `respond_error` instead.
        """
        inb = self._inbound.get(request_id)
        if inb is None or inb.state != "handling" or self._error is not None:
            return False
        views = buffer_views(buffers)
        messages.check_outgoing(inb.mt, body, views, response=True)
        sizes = [len(v) for v in views]
        data = encode_control(RESPONSE, {"id": request_id, "body": body, "bufs": sizes})
        inb.state = "responding"
        self._queue(_Out(data, inb.mt.name, request_id))
        if sum(sizes):
            inb.transfer = _Transfer(RESPONSE_CHUNK, request_id, views, inb.mt.name)
            self._transfers.append(inb.transfer)
        return True

    def respond_error(self, request_id: int, kind: str, message: str) -> bool:
        """Answer a delivered request with an error (`RemoteError(kind, message)` over there)."""
        inb = self._inbound.get(request_id)
        if inb is None or inb.state != "handling" or self._error is not None:
            return False
        inb.state = "responding"
        self._queue(_Out(pack_error(request_id, kind, message), inb.mt.name, request_id))
        return True

    def send_goaway(self) -> None:
        """Promise to send no new requests; the connection ends once both sides are idle."""
        if not self.goaway_sent and self._error is None:
            self.goaway_sent = True
            self._queue(_Out(GOAWAY_MESSAGE, None))

    def data_to_send(self) -> bytes | None:
        """The next write as one bytes object, or None (see `pieces_to_send`)."""
        pieces = self.pieces_to_send()
        return None if pieces is None else b"".join(pieces)

    def pieces_to_send(self) -> tuple[Buffer, ...] | None:
        """The next write, or None: queued control messages, else one chunk.

        A chunk comes as (header, view of the caller's buffer): the bulk bytes are never copied
        here, so the caller's buffers must stay unchanged until its call returns.
        """
        if self._control:
            parts = []
            size = 0
            while self._control and size < MAX_CONTROL_BYTES:
                out = self._control.popleft()
                out.sent = True
                parts.append(out.data)
                size += len(out.data)
                if out.method is not None:
                    self.stats.messages_sent += 1
                    self.stats.by_method[out.method] = self.stats.by_method.get(out.method, 0) + len(out.data)
                if out.request_id:
                    inb = self._inbound.get(out.request_id)
                    if inb is not None and inb.transfer is None:
                        del self._inbound[out.request_id]  # answered without buffers: done
            return (parts[0] if len(parts) == 1 else b"".join(parts),)
        if self._error is not None or not self._transfers:
            return None
        t = self._transfers[0]
        view = t.views[t.index]
        n = min(self.limits.chunk_bytes, len(view) - t.offset)
        header = CHUNK_HEAD.pack(n + CHUNK_OVERHEAD, t.kind, t.id)
        data = view[t.offset : t.offset + n]
        t.offset += n
        if t.offset == len(view):
            t.index += 1
            t.offset = 0
        self.stats.by_method[t.method] = self.stats.by_method.get(t.method, 0) + CHUNK_HEAD.size + n
        if t.done:
            self._transfers.popleft()
            self._transfer_done(t)
        else:
            self._transfers.rotate(-1)
        return header, data

    def _queue(self, out: _Out, peer_caused: bool = False) -> _Out:
        if len(self._control) >= self.limits.max_control_queue:
            if peer_caused:
                raise RemoteProtocolError("the peer sends requests faster than it reads our answers")
            raise LocalProtocolError("control queue full (a bound on calls is not being enforced)")
        self._control.append(out)
        return out

    def _transfer_done(self, t: _Transfer) -> None:
        if t.kind == REQUEST_CHUNK:
            call = self._calls.get(t.id)
            if call is not None:
                call.transfer = None
        else:
            self._inbound.pop(t.id, None)

    # -- receiving ---------------------------------------------------------------------------------

    def receive_data(self, data: Buffer) -> None:
        """Feed bytes from the stream; b"" means the peer closed it.

        `data` is kept (not copied) until it is parsed, so chunk bytes are copied once, straight
        into their buffer; anything but `bytes` is copied first, since the caller may reuse it.
        """
        if self._eof:
            raise LocalProtocolError("receive_data after end of stream")
        if not data:
            self._eof = True
            return
        if self._vpos < len(self._view):
            self._rbuf += self._view[self._vpos :]  # an unparsed tail: part of one message
        self._view = memoryview(data if type(data) is bytes else bytes(data)).cast("B")
        self._vpos = 0

    def chunk_target(self) -> memoryview | None:
        """Where the next bytes of the stream belong, if they are all chunk payload; else None.

        While a chunk is arriving and nothing of it is buffered here, its remaining bytes go
        straight into the buffer being assembled: the pump may receive into this view (at most
        its length, less is fine) and report with `chunk_received`, saving a copy. None: feed
        `receive_data` as usual.
        """
        if (self._in_chunk and self._chunk_view is not None and not self._rbuf
                and self._vpos == len(self._view) and self._error is None and not self._eof):
            return self._chunk_view[self._chunk_off :]
        return None

    def chunk_received(self, nbytes: int) -> None:
        """`nbytes` were written at the start of the view `chunk_target()` returned (0: end of stream)."""
        if nbytes == 0:
            self.receive_data(b"")
            return
        if self.chunk_target() is None or not 0 < nbytes <= self._chunk_left:
            raise LocalProtocolError(f"chunk_received({nbytes}) without a chunk_target() that long")
        self._chunk_off += nbytes
        self._chunk_left -= nbytes

    def next_event(self) -> Event | _NeedData:
        """The next complete event, or NEED_DATA. A RemoteProtocolError here is final."""
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._error = exc
            self._transfers.clear()  # keep queued control messages: an error reply may explain
            self._rbuf = bytearray()
            self._view, self._vpos = memoryview(b""), 0
            raise

    def _need_data(self) -> Event | _NeedData:
        if self._vpos == len(self._view):
            self._view, self._vpos = memoryview(b""), 0  # let the caller's buffer go
        if self._eof:
            if self.buffered_bytes or self._in_chunk:
                raise RemoteProtocolError("the stream ended in the middle of a message")
            return ConnectionEnded()
        return NEED_DATA

    def _peek(self, n: int) -> bytes | bytearray | memoryview | None:
        """The next n bytes (at least; not consumed) from one contiguous buffer, or None."""
        r = len(self._rbuf)
        if r == 0:
            return self._view[self._vpos : self._vpos + n] if len(self._view) - self._vpos >= n else None
        if r < n:
            need = n - r
            if len(self._view) - self._vpos < need:
                return None
            self._rbuf += self._view[self._vpos : self._vpos + need]
            self._vpos += need
        return self._rbuf

    def _skip(self, n: int) -> None:
        r = len(self._rbuf)
        if r:
            take = min(r, n)
            del self._rbuf[:take]
            n -= take
        self._vpos += n

    def _copy_chunk(self, data: memoryview) -> None:
        n = len(data)
        if self._chunk_view is not None:
            self._chunk_view[self._chunk_off : self._chunk_off + n] = data
        self._chunk_off += n
        self._chunk_left -= n

    def _fill_chunk(self) -> bool:
        """Copy what has arrived of the current chunk into its buffer; True once it is complete."""
        if self._rbuf and self._chunk_left:
            n = min(len(self._rbuf), self._chunk_left)
            with memoryview(self._rbuf) as view:
                self._copy_chunk(view[:n])
            del self._rbuf[:n]
        n = min(len(self._view) - self._vpos, self._chunk_left)
        if n:
            self._copy_chunk(self._view[self._vpos : self._vpos + n])
            self._vpos += n
        return not self._chunk_left

    def _next_event(self) -> Event | _NeedData:
        while True:
            if self._in_chunk:
                if not self._fill_chunk():
                    return self._need_data()
                self._in_chunk = False
                self._chunk_view = None
                event = self._chunk_finished()
                if event is not None:
                    return event
                continue
            head = self._peek(HEAD.size)
            if head is None:
                return self._need_data()
            length, kind = HEAD.unpack_from(head)
            check_length(length, kind)
            if kind == REQUEST_CHUNK or kind == RESPONSE_CHUNK:
                head = self._peek(CHUNK_HEAD.size)
                if head is None:
                    return self._need_data()
                _, _, id_ = CHUNK_HEAD.unpack_from(head)
                self._skip(CHUNK_HEAD.size)
                self._start_chunk(kind, id_, length - CHUNK_OVERHEAD)
                continue
            message = self._peek(4 + length)
            if message is None:
                return self._need_data()
            payload = bytes(message[HEAD.size : 4 + length])
            self._skip(4 + length)
            event = self._on_control(kind, payload)
            if event is not None:
                return event

    def _start_chunk(self, kind: int, id_: int, n: int) -> None:
        where = f"{KIND_NAMES[kind]} for call {id_}"
        target = None
        if kind == REQUEST_CHUNK:
            inb = self._inbound.get(id_)
            if inb is not None and inb.state == "assembling":
                target = inb.assembly.target(n, where)
            elif id_ not in self._discard_requests:
                raise RemoteProtocolError(f"{where}: that request is not receiving buffers")
        else:
            call = self._calls.get(id_)
            if call is not None:
                if call.assembly is None:
                    raise CallProtocolError(f"{where}: chunk before the response header", id_)
                try:
                    target = call.assembly.target(n, where)
                except RemoteProtocolError as exc:
                    raise CallProtocolError(str(exc), id_) from None
            elif not 0 < id_ < self._next_call_id:
                raise RemoteProtocolError(f"{where}: we never made that call")
            # else: a late answer to a call we gave up on; its bytes are skipped.
        self._in_chunk = True
        self._chunk_kind = kind
        self._chunk_id = id_
        self._chunk_left = n
        self._chunk_view = target
        self._chunk_off = 0

    def _chunk_finished(self) -> Event | None:
        id_ = self._chunk_id
        if self._chunk_kind == REQUEST_CHUNK:
            inb = self._inbound.get(id_)
            if inb is not None and inb.state == "assembling" and inb.assembly.done:
                return self._deliver_request(id_, inb)
            return None
        call = self._calls.get(id_)
        if call is not None and call.assembly is not None and call.assembly.done:
            del self._calls[id_]
            self.stats.messages_received += 1
            return ResponseReceived(id_, call.body, call.assembly.result())
        return None

    def _deliver_request(self, id_: int, inb: _Inbound) -> RequestReceived:
        inb.state = "handling"
        buffers = inb.assembly.result()
        inb.assembly = None
        self.stats.messages_received += 1
        return RequestReceived(id_, inb.mt, inb.body, buffers)

    def _on_control(self, kind: int, payload: bytes) -> Event | None:
        if kind == GOAWAY:
            if self.goaway_received:
                raise RemoteProtocolError("a second GOAWAY")
            self.goaway_received = True
            self.send_goaway()  # both sides agree the connection is winding down
            return GoAwayReceived()
        env = decode_control(kind, payload)
        if kind == REQUEST:
            return self._on_request(env)
        if kind == CANCEL:
            return self._on_cancel(env["id"])
        return self._on_answer(kind, env)

    def _on_request(self, env: dict) -> Event | None:
        rid = env["id"]
        if rid <= self._last_request_id:
            raise RemoteProtocolError(f"request id {rid} does not increase (last was {self._last_request_id})")
        self._last_request_id = rid
        if self.goaway_received:
            raise RemoteProtocolError(f"request {rid} after the peer's GOAWAY")
        sizes = env["bufs"]
        try:
            mt, body = messages.check_request(env["type"], env["v"], env["body"], [Declared(n) for n in sizes])
        except RemoteProtocolError as exc:
            # Tell the caller why before the connection drops: its call sees RemoteError.
            self._queue(_Out(pack_error(rid, "RemoteProtocolError", str(exc)), None), peer_caused=True)
            raise
        if len(self._inbound) >= self.limits.max_inbound:
            msg = f"more than {self.limits.max_inbound} requests in flight on this connection"
            self._queue(_Out(pack_error(rid, "Overloaded", msg), mt.name), peer_caused=True)
            if sum(sizes):
                self._discard_requests[rid] = None
                if len(self._discard_requests) > 4 * self.limits.max_inbound:
                    del self._discard_requests[next(iter(self._discard_requests))]
            return None
        inb = _Inbound(mt, body, Assembly(sizes))
        self._inbound[rid] = inb
        if inb.assembly.done:
            return self._deliver_request(rid, inb)
        return None

    def _on_cancel(self, rid: int) -> Event | None:
        if rid > self._last_request_id:
            raise RemoteProtocolError(f"cancel for request {rid}, which was never sent")
        self._discard_requests.pop(rid, None)
        inb = self._inbound.pop(rid, None)
        if inb is None:
            return None  # already answered: the cancel crossed our response
        if inb.transfer is not None:
            self._transfers.remove(inb.transfer)
        return CancelReceived(rid) if inb.state == "handling" else None

    def _on_answer(self, kind: int, env: dict) -> Event | None:
        cid = env["id"]
        call = self._calls.get(cid)
        if call is None:
            if cid < self._next_call_id:
                return None  # a late answer to a call we gave up on
            raise RemoteProtocolError(f"{KIND_NAMES[kind]} for call {cid}, which we never made")
        if not call.header.sent or call.assembly is not None:
            raise CallProtocolError(f"{KIND_NAMES[kind]} for call {cid} out of order", cid)
        if kind == ERROR:
            del self._calls[cid]
            if call.transfer is not None:  # refused before our buffers were all out: stop sending
                self._transfers.remove(call.transfer)
            self.stats.messages_received += 1
            return ErrorReceived(cid, env["kind"], env["message"])
        if call.transfer is not None:
            raise CallProtocolError(f"response to call {cid} before its request buffers were sent", cid)
        sizes = env["bufs"]
        try:
            body = messages.check_response(call.mt, env["body"], [Declared(n) for n in sizes])
        except RemoteProtocolError as exc:
            raise CallProtocolError(str(exc), cid) from None
        assembly = Assembly(sizes)
        if assembly.done:
            del self._calls[cid]
            self.stats.messages_received += 1
            return ResponseReceived(cid, body, assembly.result())
        call.assembly = assembly
        call.body = body
        return None

