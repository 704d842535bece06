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
# What we send by default: the protocol maximum, so one send_all of up to 1 MiB (an RPC chunk of
# 256 KiB plus its header, say) is one frame, one AEAD call and one write. Throughput is flat from
# 256 KiB up (scripts/bench/transport.py); smaller frames cost per-frame overhead.
DEFAULT_FRAME_PLAINTEXT = MAX_FRAME_PLAINTEXT
_INITIAL_BUFFER = (64 << 10) + HEADER_LEN + TAG_LEN  # a decoder's buffer before big frames arrive
_MAX_COUNTER = 2**64 - 1  # Noise reserves nonce 2^64-1; a connection that gets there must end
_HAS_INTO = hasattr(AESGCM, "encrypt_into")  # cryptography >= 45 writes into our buffers
_HAS_DECRYPT_INTO = hasattr(AESGCM, "decrypt_into")


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

    def encode(self, data: bytes | bytearray | memoryview, out: bytearray | None = None) -> bytearray | memoryview:
        """One frame (header + ciphertext, in one buffer) for 1..max_frame bytes of plaintext.

        With `out` (at least HEADER_LEN + len(data) + TAG_LEN bytes) the frame is written there
        and a view of it returned, so a sender can reuse one buffer for every frame.
        """
        n = len(data)
        if not 1 <= n <= self.max_frame:
            raise LocalProtocolError(f"a data frame carries 1 to {self.max_frame} bytes, not {n}")
        size = HEADER_LEN + n + TAG_LEN
        header = (n + TAG_LEN).to_bytes(HEADER_LEN, "big")
        nonce = self._next_nonce()
        if not _HAS_INTO:
            return bytearray(header + self._aead.encrypt(nonce, bytes(data), header))
        if out is None:
            out = bytearray(size)
        elif len(out) < size:
            raise LocalProtocolError(f"output buffer of {len(out)} bytes is too small for a {size}-byte frame")
        out[:HEADER_LEN] = header
        with memoryview(out) as view:
            self._aead.encrypt_into(nonce, data, header, view[HEADER_LEN:size])
        return out if len(out) == size else memoryview(out)[:size]

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
        # One buffer for the whole connection: bytes [_start, _end) are received but not yet
        # decoded. It starts small (an idle connection costs little) and grows, at most to
        # `capacity`, when the peer's frames need it; it is never shrunk or reallocated per
        # frame, so large frames cost no allocator or page-fault churn.
        self._buf = bytearray(min(self.capacity, _INITIAL_BUFFER))
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._body_len: int | None = None  # the current frame's length, once its header is read
        self._transport_closed = False
        self._ended = False  # END_OF_STREAM received
        self._error: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return self._end - self._start

    def room(self) -> int:
        """How many bytes `receive_data` accepts now (call `next_frame` until NEED_DATA first)."""
        return 0 if self._error is not None else self.capacity - self.buffered

    def wanted(self) -> int:
        """Bytes still missing to complete the current frame (at least 1)."""
        if self._body_len is None:
            return max(1, HEADER_LEN - self.buffered)
        return max(1, HEADER_LEN + self._body_len - self.buffered)

    def get_buffer(self, size: int) -> memoryview:
        """A writable view to receive into directly: at least min(size, room()) bytes.

        The view may be longer (all the free space at the end of the buffer, never more than
        room()). Call `buffer_updated(n)` after writing n bytes at its start. This is the
        zero-copy twin of `receive_data` for transports that can `recv_into`.
        """
        if self._transport_closed:
            raise LocalProtocolError("get_buffer() after end of file")
        size = min(size, self.room())
        if self._end + size > len(self._buf):
            tail = self._end - self._start
            if tail + size > len(self._buf):
                # Grow (by at least 2x, at most to capacity) and copy the undecoded tail over.
                new = bytearray(min(self.capacity, max(tail + size, 2 * len(self._buf))))
                new[:tail] = self._view[self._start : self._end]
                self._buf, self._view = new, memoryview(new)
            else:
                # Slide the undecoded tail (less than one frame) to the front to make room.
                self._buf[:tail] = self._view[self._start : self._end]
            self._start, self._end = 0, tail
        return self._view[self._end :]

    @property
    def allocated(self) -> int:
        """Size of the receive buffer now (at most `capacity`)."""
        return len(self._buf)

    def buffer_updated(self, nbytes: int) -> None:
        if not 0 <= nbytes <= len(self._buf) - self._end:
            raise LocalProtocolError(f"buffer_updated({nbytes}) beyond the buffer handed out")
        self._end += nbytes

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the transport; b"" means the transport reached end of file."""
        if self._transport_closed:
            raise LocalProtocolError("receive_data() after end of file")
        if not data:
            self._transport_closed = True
            return
        n = len(data)
        if n > self.room():
            raise LocalProtocolError(
                f"receive_data() of {n} bytes exceeds room() = {self.room()}: "
                "drain with next_frame() and read at most room() bytes"
            )
        self.get_buffer(n)[:n] = data
        self._end += n

    def _fail(self, message: str) -> RemoteProtocolError:
        self._error = RemoteProtocolError(message)
        self._start = self._end = 0  # drop what is buffered: nothing more will be decoded
        return self._error

    def next_frame(self) -> bytes | _Sentinel:
        """The next plaintext, or NEED_DATA, END_OF_STREAM or CLOSED; RemoteProtocolError if bad."""
        item = self._ready()
        if item is not None:
            return item
        return self._decrypt(None)  # type: ignore[return-value]

    def next_frame_into(self, out: memoryview) -> int | bytes | _Sentinel:
        """Like `next_frame`, but a plaintext that fits in `out` is decrypted straight into it.

        Returns its length (>= 1) then; a longer plaintext comes back as bytes (out untouched).
        This saves the receiver a copy when it knows where the bytes belong (an RPC chunk's
        buffer). If the frame fails authentication, `out` may hold garbage: the decoder is dead
        then and the caller must drop whatever `out` was part of.
        """
        item = self._ready()
        if item is not None:
            return item
        if not 0 < self._body_len - TAG_LEN <= len(out):  # type: ignore[operator]
            return self._decrypt(None)
        return self._decrypt(out)

    def _ready(self) -> _Sentinel | None:
        """None once a whole frame is buffered (its length in _body_len), else what to return."""
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
            start = self._start
            length = int.from_bytes(self._view[start : start + HEADER_LEN], "big")
            if length < TAG_LEN:
                raise self._fail(f"frame length {length} is shorter than the {TAG_LEN}-byte tag")
            if length > self.max_frame + TAG_LEN:
                # Checked before buffering a byte of the body: a hostile length costs nothing.
                raise self._fail(f"frame of {length - TAG_LEN} bytes exceeds the cap of {self.max_frame}")
            self._body_len = length
        if avail < HEADER_LEN + self._body_len:
            return self._need_data(avail)
        if self.counter >= _MAX_COUNTER:
            raise self._fail("frame counter exhausted")
        return None

    def _decrypt(self, out: memoryview | None) -> bytes | int | _Sentinel:
        start, length = self._start, self._body_len
        assert length is not None
        end = HEADER_LEN + length
        view = self._view
        nonce = frame_nonce(self.counter)
        body, ad = view[start + HEADER_LEN : start + end], view[start : start + HEADER_LEN]
        try:
            if out is None:
                plaintext: bytes | int = self._aead.decrypt(nonce, body, ad)
            elif _HAS_DECRYPT_INTO:
                plaintext = self._aead.decrypt_into(nonce, body, ad, out[: length - TAG_LEN])
            else:
                data = self._aead.decrypt(nonce, body, ad)
                out[: len(data)] = data
                plaintext = len(data)
        except InvalidTag:
            raise self._fail(
                f"frame {self.counter} failed authentication (tampered, replayed, reordered or "
                "from a different key)"
            ) from None
        self.counter += 1
        self._body_len = None
        self._start += end
        if self._start == self._end:
            self._start = self._end = 0  # the common case: nothing left over, nothing to move
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
