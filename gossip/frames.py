"""Encrypted frames after the handshake, without I/O.

Wire format of one frame (see PROTOCOL.md, "Frames"):

    length  u32 big-endian   = len(ciphertext) = len(plaintext) + 16, at most MAX_FRAME_PLAINTEXT + 16
    ciphertext               = AES-256-GCM(key, nonce, plaintext, associated data = the 4 length bytes)

Each direction has its own key (from Noise `split()`) and its own 64-bit frame counter; the
nonce of frame n is 4 zero bytes + n as 8 big-endian bytes (Noise's AESGCM nonce). A forged,
altered, replayed, reordered or dropped frame therefore fails authentication. A frame with an
empty plaintext is the authenticated end of stream (`send_eof`); data frames are never empty.

`FrameDecoder` follows h11: `receive_data(bytes)` buffers (b"" = the transport closed),
`next_frame()` returns a plaintext, `NEED_DATA`, `END_OF_STREAM` or `CLOSED`, or raises
`RemoteProtocolError`. The frame length is checked against the cap from the 4-byte prefix,
before any of the body is buffered, and the buffer never holds more than one maximal frame
(`room()` says how much it may be fed).
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gossip.errors import LocalProtocolError, RemoteProtocolError

HEADER_LEN = 4  # the u32 length prefix
TAG_LEN = 16  # AES-GCM tag
KEY_LEN = 32  # AES-256
# Protocol maximum: no peer sends a larger frame and every receiver refuses one. Big frames
# amortise the per-frame cost (one AEAD call, one send); 1 MiB keeps a frame within L2/L3.
MAX_FRAME_PLAINTEXT = 1 << 20
# What we send by default; see scripts/bench/transport.py for the measurement behind it.
DEFAULT_FRAME_PLAINTEXT = 1 << 18
_MAX_COUNTER = 2**64 - 1  # Noise reserves nonce 2^64-1; a connection that gets there must end
_HAS_INTO = hasattr(AESGCM, "encrypt_into")  # cryptography >= 45 writes into our buffers


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")  # feed more bytes, then call next_frame() again
END_OF_STREAM = _Sentinel("END_OF_STREAM")  # the peer's authenticated end of stream
CLOSED = _Sentinel("CLOSED")  # the transport closed between frames, without END_OF_STREAM


def frame_nonce(counter: int) -> bytes:
    """The AES-GCM nonce of frame number `counter`: 4 zero bytes + u64 big-endian."""
    return b"\x00\x00\x00\x00" + counter.to_bytes(8, "big")


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_LEN:
        raise ValueError(f"a frame key is {KEY_LEN} bytes (one half of Noise split())")
    return bytes(key)


class FrameEncoder:
    """Turns plaintext into frames for one direction of one connection."""

    def __init__(self, key: bytes, *, max_frame: int = DEFAULT_FRAME_PLAINTEXT, first_counter: int = 0) -> None:
        if not 1 <= max_frame <= MAX_FRAME_PLAINTEXT:
            raise ValueError(f"max_frame must be between 1 and {MAX_FRAME_PLAINTEXT} bytes")
        self._aead = AESGCM(_check_key(key))
        self.max_frame = max_frame  # largest plaintext we put in one frame
        self.counter = first_counter  # number of the next frame we send

    def _next_nonce(self) -> bytes:
        if self.counter >= _MAX_COUNTER:
            raise LocalProtocolError("frame counter exhausted: open a new connection")
        nonce = frame_nonce(self.counter)
        self.counter += 1
        return nonce

    def encode(self, data: bytes | bytearray | memoryview) -> bytearray:
        """One frame (header + ciphertext, in one buffer) for 1..max_frame bytes of plaintext."""
        n = len(data)
        if not 1 <= n <= self.max_frame:
            raise LocalProtocolError(f"a data frame carries 1 to {self.max_frame} bytes, not {n}")
        header = (n + TAG_LEN).to_bytes(HEADER_LEN, "big")
        nonce = self._next_nonce()
        if _HAS_INTO:
            out = bytearray(HEADER_LEN + n + TAG_LEN)
            out[:HEADER_LEN] = header
            with memoryview(out) as view:
                self._aead.encrypt_into(nonce, data, header, view[HEADER_LEN:])
            return out
        return bytearray(header + self._aead.encrypt(nonce, bytes(data), header))

    def encode_eof(self) -> bytes:
        """The end-of-stream frame: an authenticated empty plaintext."""
        header = TAG_LEN.to_bytes(HEADER_LEN, "big")
        return header + self._aead.encrypt(self._next_nonce(), b"", header)


class FrameDecoder:
    """Turns received bytes back into plaintexts for one direction of one connection."""

    def __init__(self, key: bytes, *, max_frame: int = MAX_FRAME_PLAINTEXT, first_counter: int = 0) -> None:
        if not 1 <= max_frame <= MAX_FRAME_PLAINTEXT:
            raise ValueError(f"max_frame must be between 1 and {MAX_FRAME_PLAINTEXT} bytes")
        self._aead = AESGCM(_check_key(key))
        self.max_frame = max_frame  # largest plaintext we accept in one frame
        self.capacity = HEADER_LEN + max_frame + TAG_LEN  # the most bytes we ever buffer
        self.counter = first_counter  # number of the next frame we expect
        self._buf = bytearray()
        self._start = 0  # bytes of _buf already consumed
        self._body_len: int | None = None  # the current frame's length, once its header is read
        self._transport_closed = False
        self._ended = False  # END_OF_STREAM received
        self._error: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf) - self._start

    def room(self) -> int:
        """How many bytes `receive_data` accepts now (call `next_frame` until NEED_DATA first)."""
        return self.capacity - self.buffered

    def wanted(self) -> int:
        """Bytes still missing to complete the current frame (at least 1)."""
        if self._body_len is None:
            return max(1, HEADER_LEN - self.buffered)
        return max(1, HEADER_LEN + self._body_len - self.buffered)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the transport; b"" means the transport reached end of file."""
        if self._transport_closed:
            raise LocalProtocolError("receive_data() after end of file")
        if not data:
            self._transport_closed = True
            return
        if len(data) > self.room():
            raise LocalProtocolError(
                f"receive_data() of {len(data)} bytes exceeds room() = {self.room()}: "
                "drain with next_frame() and read at most room() bytes"
            )
        if self._start:
            # Drop consumed bytes before growing, so the buffer stays within `capacity`.
            del self._buf[: self._start]
            self._start = 0
        self._buf += data

    def _fail(self, message: str) -> RemoteProtocolError:
        self._error = RemoteProtocolError(message)
        self._buf = bytearray()  # release the memory: nothing more will be decoded
        self._start = 0
        return self._error

    def next_frame(self) -> bytes | _Sentinel:
        """The next plaintext, or NEED_DATA, END_OF_STREAM or CLOSED; RemoteProtocolError if bad."""
        if self._error is not None:
            raise self._error
        if self._ended:
            if self.buffered:
                raise self._fail("data after the end-of-stream frame")
            return END_OF_STREAM
        avail = self.buffered
        if self._body_len is None:
            if avail < HEADER_LEN:
                return self._need_data(avail)
            length = int.from_bytes(self._buf[self._start : self._start + HEADER_LEN], "big")
            if length < TAG_LEN:
                raise self._fail(f"frame length {length} is shorter than the {TAG_LEN}-byte tag")
            if length > self.max_frame + TAG_LEN:
                # Checked before buffering a byte of the body: a hostile length costs nothing.
                raise self._fail(f"frame of {length - TAG_LEN} bytes exceeds the cap of {self.max_frame}")
            self._body_len = length
        end = HEADER_LEN + self._body_len
        if avail < end:
            return self._need_data(avail)
        if self.counter >= _MAX_COUNTER:
            raise self._fail("frame counter exhausted")
        start = self._start
        with memoryview(self._buf) as view:
            try:
                plaintext = self._aead.decrypt(
                    frame_nonce(self.counter),
                    view[start + HEADER_LEN : start + end],
                    view[start : start + HEADER_LEN],
                )
            except InvalidTag:
                error = self._fail(
                    f"frame {self.counter} failed authentication (tampered, replayed, reordered or "
                    "from a different key)"
                )
                raise error from None
        self.counter += 1
        self._start += end
        self._body_len = None
        if self._start == len(self._buf):
            self._buf.clear()  # the common case: nothing left over, no copying needed later
            self._start = 0
        if not plaintext:
            self._ended = True
            if self.buffered:
                raise self._fail("data after the end-of-stream frame")
            return END_OF_STREAM
        return plaintext

    def _need_data(self, avail: int) -> _Sentinel:
        if self._transport_closed:
            if avail:
                raise self._fail(f"connection closed in the middle of a frame ({avail} bytes of it)")
            return CLOSED
        return NEED_DATA
