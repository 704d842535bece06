"""The secure channel: a trio stream that runs the murmur handshake, then encrypted frames.

`open_secure_channel(stream, ...)` wraps any `trio.abc.Stream` (TCP, a memory stream pair, the
simulated network), like trio's SSLStream. It pumps bytes between the transport and the sans-IO
cores in `handshake.py` and `frames.py`; this module only does I/O and translates errors:

- during the handshake: `trio.TooSlowError` -> `PeerTimeout`; a transport that breaks or closes
  -> `PeerUnreachable`; the peer failing authentication -> `AuthenticationError`; garbage ->
  `RemoteProtocolError`. Any failure closes the transport; nothing of it reaches the caller.
- afterwards, `SecureStream` keeps trio's stream contract (it passes
  `trio.testing.check_half_closeable_stream`): `trio.BrokenResourceError` when the transport
  breaks, `trio.ClosedResourceError` after our own `aclose`, `trio.BusyResourceError` on
  concurrent sends or receives. A frame that fails authentication (cryptography's InvalidTag),
  or any other framing violation, raises `RemoteProtocolError` to the reader and tears the
  connection down; later calls then raise `trio.BrokenResourceError`.

End of stream: `send_eof()` sends an authenticated end-of-stream frame (and half-closes the
transport if it can). `aclose()` does not send one: like SSLStream in https-compatible mode it
just closes the transport, because waiting to send on a stalled peer could hang. A reader thus
sees b"" both after the peer's `send_eof()` and after the transport closes between frames; a
transport closing in the middle of a frame is a truncation and raises `RemoteProtocolError`.
Layers above frame their own messages, so a cut at a frame boundary shows up there as an
incomplete message.

Bulk paths beyond the stream contract, for the RPC layer: `send_parts` sends each part as its
own frame(s) in one transport write, so that `receive_into` on the other side can decrypt a
part straight into the buffer it belongs in; `receive_some_nowait` / `receive_into_nowait`
take what is already here without a pass through the scheduler. Over TCP the socket is read
and written directly (`gossip.sockio`), into the frame decoder's buffer and from one reused
send buffer.
"""

from __future__ import annotations

import math
import operator
from typing import Awaitable, Callable, Sequence

import trio

from gossip import sockio
from gossip.errors import PeerTimeout, PeerUnreachable, RemoteProtocolError
from gossip.frames import (
    CLOSED,
    DEFAULT_FRAME_PLAINTEXT,
    END_OF_STREAM,
    NEED_DATA,
    FrameDecoder,
    FrameEncoder,
    HEADER_LEN,
    MAX_FRAME_PLAINTEXT,
    TAG_LEN,
)
from gossip.handshake import PROTOCOL_VERSION, Handshake, HandshakeResult, PeerHello
from gossip.identity import Identity, SwarmKey

__all__ = ["PROTOCOL_VERSION", "PeerHello", "SecureStream", "open_secure_channel"]

# Largest read we ask the transport for beyond what the current frame still needs: small frames
# arrive many per read, large frames are read up to their end in one call.
_READ_SIZE = 1 << 16
# A write of several frames (`send_parts`) goes out in one transport write while the frames fit
# in one maximal frame plus this much: an RPC chunk's 13-byte header frame rides along with the
# chunk's frame, and the send buffer never exceeds about one maximal frame.
_COALESCE = 1 << 16
# How long a refusing responder spends trying to tell the initiator why before it closes.
_REJECT_FLUSH_TIMEOUT = 1.0


class SecureStream(trio.abc.HalfCloseableStream):
    """An authenticated, encrypted stream over `transport_stream`, after a successful handshake.

    `peer` is what the handshake proved about the other side; `handshake_hash` is unique to this
    connection (both sides agree on it), usable for channel binding.
    """

    def __init__(
        self, transport_stream: trio.abc.Stream, result: HandshakeResult, *, frame_size: int = DEFAULT_FRAME_PLAINTEXT
    ) -> None:
        self.transport_stream = transport_stream
        self.peer: PeerHello = result.peer
        self.handshake_hash: bytes = result.handshake_hash
        self._encoder = FrameEncoder(result.send_key, max_frame=frame_size, first_counter=result.send_counter)
        self._decoder = FrameDecoder(result.recv_key, first_counter=result.recv_counter)
        if result.leftover:
            self._decoder.receive_data(result.leftover)
        self._sending = False  # a task is in send_all / send_eof / wait_send_all_might_not_block
        self._receiving = False  # a task is in receive_some
        self._closed = False  # we called aclose()
        self._eof_sent = False
        self._send_broken = False  # a send was interrupted mid-frame: the counter is out of step
        self._torn_down: RemoteProtocolError | None = None  # the peer broke the protocol
        self._pending = b""  # plaintext of a frame that did not fit in the last receive_some
        self._pending_at = 0
        # TCP fast paths. SocketStream.send_all has handed every byte to the kernel when it
        # returns, so one send buffer (grown to the largest write so far) serves every frame;
        # and we receive straight into the frame decoder's buffer. A wrapper that keeps these
        # properties says so (`gossip.tcp.CountingStream`: `copies_on_send`, `receive_into_nowait`).
        # Other transports might keep a reference to what they are given (a simulated link
        # queueing it), so they get a fresh buffer per write.
        self._direct = _direct_receiver(transport_stream)
        self._send = _sender(transport_stream)
        self._reuse_send_buffer = type(transport_stream) is trio.SocketStream or (
            getattr(transport_stream, "copies_on_send", False) is True
        )
        self._send_buf: bytearray | None = None

    # -- sending ----------------------------------------------------------------------------

    def _enter_send(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this SecureStream")
        if self._closed:
            raise trio.ClosedResourceError("this SecureStream was closed")
        if self._torn_down is not None:
            raise trio.BrokenResourceError(f"connection torn down: {self._torn_down}")
        if self._send_broken:
            raise trio.BrokenResourceError("an earlier send was interrupted; the stream can no longer send")
        self._sending = True

    async def _send_frame(self, frame: bytes | bytearray | memoryview) -> None:
        try:
            await self._send(frame)
        except trio.ClosedResourceError:
            # Closed under us by our own aclose(), or torn down after a protocol error.
            self._send_broken = True
            if self._torn_down is not None:
                raise trio.BrokenResourceError(f"connection torn down: {self._torn_down}") from None
            raise
        except BaseException:
            # Part of a frame may have gone out (or a counter was spent): never send again.
            self._send_broken = True
            raise

    def _send_buffer(self, need: int) -> bytearray:
        """A buffer for `need` bytes of frames (at most one maximal frame plus _COALESCE)."""
        if not self._reuse_send_buffer:
            return bytearray(need)
        if self._send_buf is None or len(self._send_buf) < need:
            # Round up to a power of two (capped) so growth happens rarely.
            cap = HEADER_LEN + self._encoder.max_frame + TAG_LEN + _COALESCE
            self._send_buf = bytearray(min(cap, max(1 << 12, 1 << (need - 1).bit_length())))
        return self._send_buf

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.send_parts((data,))

    async def send_parts(self, parts: Sequence[bytes | bytearray | memoryview], *, checkpoint: bool = True) -> None:
        """Send the concatenation of `parts`; each part starts a new frame.

        Frame boundaries carry no meaning for the peer, but a receiver that knows where a part
        belongs (an RPC chunk after its header) can decrypt that frame straight into place
        (`receive_into`). Small frames are coalesced into one transport write with the next.
        `checkpoint=False`: do not yield if the transport takes the bytes at once (a caller
        that writes in a loop then checkpoints now and then itself).
        """
        self._enter_send()
        try:
            if self._eof_sent:
                raise trio.ClosedResourceError("send_all() after send_eof()")
            views = [v for v in map(_byte_view, parts) if v]
            if not views:
                await trio.lowlevel.checkpoint()
                return
            # The one checkpoint of this call (the socket path below does not yield when the
            # kernel takes the bytes at once). Cancelled here costs nothing: no counter is spent.
            if checkpoint:
                await trio.lowlevel.checkpoint()
            else:
                await trio.lowlevel.checkpoint_if_cancelled()
            step = self._encoder.max_frame
            frames = [v[at : at + step] for v in views for at in range(0, len(v), step)]
            overhead = HEADER_LEN + TAG_LEN
            limit = HEADER_LEN + step + TAG_LEN + _COALESCE
            i = 0
            while i < len(frames):
                # As many whole frames as fit in one write of at most `limit` bytes (at least one).
                j, size = i + 1, len(frames[i]) + overhead
                while j < len(frames) and size + len(frames[j]) + overhead <= limit:
                    size += len(frames[j]) + overhead
                    j += 1
                out = self._send_buffer(size)
                with memoryview(out) as buf:
                    pos = 0
                    for frame in frames[i:j]:
                        n = len(frame) + overhead
                        self._encoder.encode(frame, buf[pos : pos + n])
                        pos += n
                    await self._send_frame(buf[:size] if len(out) != size else out)
                i = j
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        self._enter_send()
        try:
            if self._eof_sent:
                await trio.lowlevel.checkpoint()
                return
            await self._send_frame(self._encoder.encode_eof())
            self._eof_sent = True
            if isinstance(self.transport_stream, trio.abc.HalfCloseableStream):
                await self.transport_stream.send_eof()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        self._enter_send()
        try:
            await self.transport_stream.wait_send_all_might_not_block()
        finally:
            self._sending = False

    # -- receiving --------------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        return await self._receive(None, max_bytes)  # type: ignore[return-value]

    async def receive_into(self, buffer: memoryview) -> int:
        """Like `socket.recv_into`: up to len(buffer) bytes into `buffer`; 0 at end of stream.

        A frame whose plaintext fits is decrypted straight into `buffer` (no copy); a longer one
        fills it and the rest waits for the next receive. If the peer breaks the protocol
        (RemoteProtocolError), `buffer` may hold garbage.
        """
        if not len(buffer):
            raise ValueError("receive_into needs a buffer of at least 1 byte")
        return await self._receive(buffer, None)  # type: ignore[return-value]

    def receive_some_nowait(self, max_bytes: int | None = None) -> bytes:
        """`receive_some` without waiting or yielding: trio.WouldBlock if it would have to wait.

        Data that is already here (a buffered frame, or bytes the socket holds now) comes at
        once. A caller that loops on this must still checkpoint now and then. If it raises
        RemoteProtocolError the stream is torn down: close it.
        """
        return self._receive_nowait(None, max_bytes)  # type: ignore[return-value]

    def receive_into_nowait(self, buffer: memoryview) -> int:
        """`receive_into` without waiting or yielding: trio.WouldBlock if it would have to wait."""
        if not len(buffer):
            raise ValueError("receive_into needs a buffer of at least 1 byte")
        return self._receive_nowait(buffer, None)  # type: ignore[return-value]

    def _enter_receive(self) -> None:
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this SecureStream")
        if self._closed:
            raise trio.ClosedResourceError("this SecureStream was closed")
        if self._torn_down is not None:
            raise trio.BrokenResourceError(f"connection torn down: {self._torn_down}")

    async def _receive(self, buffer: memoryview | None, max_bytes: int | None) -> bytes | int:
        self._enter_receive()
        self._receiving = True
        try:
            waited = False
            while True:
                try:
                    result = self._poll(buffer, max_bytes)
                except trio.WouldBlock:
                    await self._wait_for_data()
                    waited = True
                    continue
                except RemoteProtocolError:
                    await trio.aclose_forcefully(self.transport_stream)
                    raise
                if not waited:
                    await trio.lowlevel.checkpoint()
                return result
        finally:
            self._receiving = False

    def _receive_nowait(self, buffer: memoryview | None, max_bytes: int | None) -> bytes | int:
        self._enter_receive()
        return self._poll(buffer, max_bytes)

    def _poll(self, buffer: memoryview | None, max_bytes: int | None) -> bytes | int:
        """The next data, into `buffer` (a count) or as bytes, from what is here; b""/0 at the end.

        trio.WouldBlock when the next frame is incomplete and the transport has nothing more now.
        """
        limit = max_bytes if buffer is None else len(buffer)
        if self._pending_at < len(self._pending):
            end = len(self._pending) if limit is None else self._pending_at + limit
            data = self._pending[self._pending_at : end]
            self._pending_at += len(data)
        else:
            self._pending, self._pending_at = b"", 0
            decoder = self._decoder
            while True:
                try:
                    item = decoder.next_frame() if buffer is None else decoder.next_frame_into(buffer)
                except RemoteProtocolError as exc:
                    self._torn_down = exc  # later calls raise BrokenResourceError
                    raise
                if item is NEED_DATA:
                    self._read_nowait()
                    continue
                if item is END_OF_STREAM or item is CLOSED:
                    return b"" if buffer is None else 0
                if type(item) is int:
                    return item
                data = self._take(item, limit)  # type: ignore[arg-type]
                break
        if buffer is None:
            return data
        buffer[: len(data)] = data
        return len(data)

    def _take(self, data: bytes, max_bytes: int | None) -> bytes:
        if max_bytes is None or len(data) <= max_bytes:
            return data
        self._pending, self._pending_at = data, max_bytes
        return data[:max_bytes]

    def _read_window(self) -> tuple[int, int]:
        decoder = self._decoder
        wanted = decoder.wanted()
        # Read to the end of the current frame, or up to _READ_SIZE when frames are small: at most
        # _READ_SIZE bytes of a following frame ever have to be slid to the buffer's front.
        return wanted, min(decoder.room(), max(wanted, _READ_SIZE))

    def _read_nowait(self) -> None:
        """Move what the transport holds now into the decoder; trio.WouldBlock if nothing."""
        if self._direct is None:
            raise trio.WouldBlock  # only receive_some, which may wait: see _wait_for_data
        wanted, want = self._read_window()
        n = self._direct[0](self._decoder.get_buffer(wanted)[:want])
        if n:
            self._decoder.buffer_updated(n)
        else:
            self._decoder.receive_data(b"")  # end of file

    async def _wait_for_data(self) -> None:
        if self._direct is not None:
            await self._direct[1]()  # wait_readable; _poll then reads
        else:
            self._decoder.receive_data(await self.transport_stream.receive_some(self._read_window()[1]))

    # -- closing ----------------------------------------------------------------------------

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._pending = b""
        await self.transport_stream.aclose()


def _byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(data)
    return view.cast("B") if view.ndim != 1 or view.format != "B" else view


_Direct = tuple[Callable[[memoryview], int], Callable[[], Awaitable[None]]]


def _direct_receiver(stream: trio.abc.Stream) -> _Direct | None:
    """(read into a buffer without waiting, wait until readable) for `stream`, or None if it
    can only `receive_some` (then every read costs a fresh bytes object and a copy)."""
    if type(stream) is trio.SocketStream:
        sock = stream.socket
        return (lambda buffer: sockio.recv_into_nowait(sock, buffer)), (lambda: trio.lowlevel.wait_readable(sock))
    nowait, wait = getattr(stream, "receive_into_nowait", None), getattr(stream, "wait_readable", None)
    return (nowait, wait) if callable(nowait) and callable(wait) else None


def _sender(stream: trio.abc.Stream) -> Callable[[bytes | bytearray | memoryview], Awaitable[None]]:
    if type(stream) is trio.SocketStream:
        sock = stream.socket
        return lambda data: sockio.send_all(sock, data)
    return stream.send_all


async def _send_handshake(stream: trio.abc.Stream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise PeerUnreachable(f"connection lost during the handshake: {exc!r}") from exc


async def _run_handshake(stream: trio.abc.Stream, hs: Handshake) -> HandshakeResult:
    while True:
        out = hs.data_to_send()
        if out:
            await _send_handshake(stream, out)
        if hs.done:
            assert hs.result is not None
            return hs.result
        try:
            data = await stream.receive_some(hs.bytes_wanted())
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise PeerUnreachable(f"connection lost during the handshake: {exc!r}") from exc
        if not data:
            raise PeerUnreachable(f"peer closed the connection during the handshake ({hs.state})")
        try:
            hs.receive_data(data)
        except RemoteProtocolError:
            reject = hs.data_to_send()
            if reject:
                # Tell the initiator why, but never let a stalled peer hold us: bounded and
                # shielded, so the outer deadline cannot turn our verdict into a timeout.
                with trio.move_on_after(_REJECT_FLUSH_TIMEOUT, shield=True):
                    try:
                        await stream.send_all(reject)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
            raise


async def open_secure_channel(
    stream: trio.abc.Stream,
    *,
    identity: Identity,
    swarm: SwarmKey,
    initiator: bool,
    listen_addrs: Sequence[str] = (),
    expected_peer_id: bytes | None = None,
    timeout: float = 10.0,
    frame_size: int = DEFAULT_FRAME_PLAINTEXT,
) -> SecureStream:
    """Run the murmur handshake over `stream` and return the secure stream on top of it.

    Raises AuthenticationError (wrong swarm key, wrong version, bad signature, swarm id mismatch,
    unexpected peer id, or the peer refused us), RemoteProtocolError (malformed handshake),
    PeerTimeout (not done within `timeout` seconds) or PeerUnreachable (the transport failed).
    On any failure the transport is closed before the error propagates. `frame_size` is the
    largest plaintext we put in one frame (1 byte .. MAX_FRAME_PLAINTEXT); the peer accepts any.
    """
    try:
        if not (isinstance(timeout, (int, float)) and timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        if not 1 <= frame_size <= MAX_FRAME_PLAINTEXT:
            raise ValueError(f"frame_size must be 1..{MAX_FRAME_PLAINTEXT} bytes, not {frame_size!r}")
        hs = Handshake(
            initiator=initiator,
            identity=identity,
            swarm=swarm,
            listen_addrs=listen_addrs,
            expected_peer_id=expected_peer_id,
        )
        try:
            with trio.fail_after(timeout):
                result = await _run_handshake(stream, hs)
        except trio.TooSlowError:
            raise PeerTimeout(f"handshake not finished within {timeout} s ({hs.state})") from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return SecureStream(stream, result, frame_size=frame_size)

