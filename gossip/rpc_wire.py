"""The bytes of RPC messages: kinds, caps, envelopes, and the buffers that chunks fill.

Plain functions and small classes shared by the sans-IO protocol (`gossip.rpc`) and its tests:
every message is `length:u32be kind:u8 payload`; control messages (REQUEST, RESPONSE, ERROR,
CANCEL) carry a msgpack envelope checked against the schemas here; chunks carry `id:u64be` and
raw buffer bytes. PROTOCOL.md ("Messages and RPC") is the prose version of this module.
"""

from __future__ import annotations

import struct
from typing import Any, Sequence

import msgpack
import numpy as np

from gossip import messages
from gossip.errors import LocalProtocolError, RemoteProtocolError
from gossip.messages import Int, List, Map, Str
from gossip.transport import Buffer

# Message kinds (the byte after the length prefix).
REQUEST = 1
RESPONSE = 2
ERROR = 3
CANCEL = 4
REQUEST_CHUNK = 5
RESPONSE_CHUNK = 6
GOAWAY = 7
KIND_NAMES = {1: "request", 2: "response", 3: "error", 4: "cancel", 5: "request chunk",
              6: "response chunk", 7: "goaway"}

CHUNK_BYTES = 256 * 1024  # the most raw buffer bytes in one chunk message
# A control message holds a body (<= MAX_BODY_BYTES) plus the envelope: keys, ids and one
# size per buffer (<= 4096 x 9 bytes). 64 KiB of headroom covers the envelope.
MAX_CONTROL_BYTES = messages.MAX_BODY_BYTES + 64 * 1024
MAX_ERROR_KIND = 64  # chars in an error's class name
MAX_ERROR_MESSAGE = 1000  # chars in an error's text
MAX_ID = (1 << 64) - 1

HEAD = struct.Struct("!IB")  # length, kind
CHUNK_HEAD = struct.Struct("!IBQ")  # length, kind, id
CHUNK_OVERHEAD = CHUNK_HEAD.size - 4  # bytes of a chunk's length that are not data (kind + id)


# -- envelope schemas ----------------------------------------------------------------------------


class _AnyMap(messages.Schema):
    """The body slot of an envelope: a map, checked later against its message type."""

    def check(self, value: Any, where: str) -> dict:
        if type(value) is not dict:
            raise RemoteProtocolError(f"{where}: expected map, got {type(value).__name__}")
        return value


_ID = Int(1, MAX_ID)
_SIZES = List(Int(0, messages.MAX_BUFFER_BYTES), max_len=messages.MAX_BUFFERS)
ENVELOPES: dict[int, Map] = {
    REQUEST: Map({"id": _ID, "type": Str(max_len=128), "v": Int(0, (1 << 32) - 1),
                  "body": _AnyMap(), "bufs": _SIZES}),
    RESPONSE: Map({"id": _ID, "body": _AnyMap(), "bufs": _SIZES}),
    ERROR: Map({"id": _ID, "kind": Str(max_len=MAX_ERROR_KIND), "message": Str(max_len=MAX_ERROR_MESSAGE)}),
    CANCEL: Map({"id": _ID}),
}


def _refuse_ext(code: int, data: bytes) -> Any:
    raise RemoteProtocolError(f"msgpack ext type {code} is not allowed")


def decode_control(kind: int, payload: bytes) -> dict:
    """Decode and check one control message's msgpack payload (no body schema yet)."""
    n = len(payload)
    try:
        value = msgpack.unpackb(
            payload, raw=False, strict_map_key=True, use_list=True, timestamp=0,
            max_str_len=n, max_bin_len=n, max_array_len=n, max_map_len=n, max_ext_len=0,
            ext_hook=_refuse_ext,
        )
    except RemoteProtocolError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise RemoteProtocolError(f"{KIND_NAMES[kind]}: invalid msgpack ({type(exc).__name__}: {exc})") from None
    return ENVELOPES[kind].check(value, KIND_NAMES[kind])


class Declared:
    """Stands in for a buffer that has not arrived, so `messages.check_*` can bound its size."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def _pack(obj: dict, what: str) -> bytes:
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"{what}: cannot encode ({exc})") from None


def encode_control(kind: int, envelope: dict) -> bytes:
    """One framed control message. Our own envelope over the cap is a LocalProtocolError."""
    payload = _pack(envelope, KIND_NAMES[kind])
    if len(payload) > MAX_CONTROL_BYTES:
        raise LocalProtocolError(
            f"{KIND_NAMES[kind]} of {len(payload)} bytes exceeds {MAX_CONTROL_BYTES}; "
            "send large data as buffers, not in the body"
        )
    return HEAD.pack(len(payload) + 1, kind) + payload


GOAWAY_MESSAGE = HEAD.pack(1, GOAWAY)


def new_buffer(n: int) -> memoryview:
    """A writable byte buffer of `n` bytes, contents undefined until written.

    numpy's allocator neither zero-fills (bytearray does) nor returns big blocks to the OS at
    once, so a receiver filling fresh buffers costs about half as much CPU per byte. Every byte
    is overwritten by chunks before a buffer is handed out.
    """
    return memoryview(np.empty(n, dtype=np.uint8))


class Assembly:
    """Buffers of one message arriving chunk by chunk; each buffer is allocated at its first chunk."""

    __slots__ = ("sizes", "buffers", "index", "offset")

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes
        self.buffers: list[memoryview | None] = [new_buffer(0) if n == 0 else None for n in sizes]
        self.index = 0
        self.offset = 0
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self.index < len(self.sizes) and self.offset == self.sizes[self.index]:
            self.index += 1
            self.offset = 0

    @property
    def done(self) -> bool:
        return self.index == len(self.sizes)

    def target(self, n: int, where: str) -> memoryview:
        """Where the next `n` chunk bytes go; a chunk never crosses a buffer boundary."""
        if self.done:
            raise RemoteProtocolError(f"{where}: chunk after all declared buffers arrived")
        left = self.sizes[self.index] - self.offset
        if n > left:
            raise RemoteProtocolError(f"{where}: chunk of {n} bytes, only {left} left in buffer {self.index}")
        buf = self.buffers[self.index]
        if buf is None:
            buf = self.buffers[self.index] = new_buffer(self.sizes[self.index])
        view = buf[self.offset : self.offset + n]
        self.offset += n
        self._skip_empty()
        return view

    def result(self) -> list[memoryview]:
        return [b if b is not None else new_buffer(0) for b in self.buffers]


def check_length(length: int, kind: int) -> None:
    """The length prefix against its kind's cap, before any of the payload is buffered."""
    if kind == REQUEST_CHUNK or kind == RESPONSE_CHUNK:
        lo, hi = CHUNK_OVERHEAD + 1, CHUNK_OVERHEAD + CHUNK_BYTES
    elif kind == GOAWAY:
        lo = hi = 1
    elif kind in ENVELOPES:
        lo, hi = 2, 1 + MAX_CONTROL_BYTES
    else:
        raise RemoteProtocolError(f"unknown message kind {kind}")
    if not lo <= length <= hi:
        raise RemoteProtocolError(f"{KIND_NAMES[kind]} of length {length} outside [{lo}, {hi}]")


def buffer_views(buffers: Sequence[Buffer]) -> list[memoryview]:
    try:
        return [memoryview(b).cast("B") for b in buffers]
    except TypeError as exc:
        raise LocalProtocolError(f"buffers must be contiguous bytes-like objects ({exc})") from None


def pack_cancel(call_id: int) -> bytes:
    return encode_control(CANCEL, {"id": call_id})


def pack_error(request_id: int, kind: str, message: str) -> bytes:
    return encode_control(ERROR, {"id": request_id, "kind": kind[:MAX_ERROR_KIND],
                                  "message": message[:MAX_ERROR_MESSAGE]})
