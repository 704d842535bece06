"""SecureStream and open_secure_channel: the trio stream contract, auth failures, tampering."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from gossip.channel import PROTOCOL_VERSION, PeerHello, SecureStream, open_secure_channel
from gossip.errors import AuthenticationError, PeerTimeout, PeerUnreachable, RemoteProtocolError
from gossip.frames import HEADER_LEN, TAG_LEN
from gossip.identity import Identity, SwarmKey

IA = Identity.from_seed(b"a" * 32)
IB = Identity.from_seed(b"b" * 32)
SWARM = SwarmKey.open("channel-tests")


async def secure_pair(
    a: trio.abc.Stream,
    b: trio.abc.Stream,
    *,
    swarm_a: SwarmKey = SWARM,
    swarm_b: SwarmKey = SWARM,
    **kwargs_a: object,
) -> tuple[SecureStream, SecureStream]:
    res: dict[int, SecureStream] = {}

    async def side(k: int, s: trio.abc.Stream, ident: Identity, init: bool, swarm: SwarmKey, kw: dict) -> None:
        res[k] = await open_secure_channel(s, identity=ident, swarm=swarm, initiator=init, **kw)

    async with trio.open_nursery() as n:
        n.start_soon(side, 0, a, IA, True, swarm_a, kwargs_a)
        n.start_soon(side, 1, b, IB, False, swarm_b, {"listen_addrs": ["[::1]:7000", "127.0.0.1:7001"]})
    return res[0], res[1]


async def memory_pair() -> tuple[SecureStream, SecureStream]:
    return await secure_pair(*trio.testing.memory_stream_pair())


async def lockstep_pair() -> tuple[SecureStream, SecureStream]:
    return await secure_pair(*trio.testing.lockstep_stream_pair())


async def test_check_half_closeable_stream_memory() -> None:
    await trio.testing.check_half_closeable_stream(memory_pair, lockstep_pair)


async def test_check_half_closeable_stream_lockstep() -> None:
    await trio.testing.check_half_closeable_stream(lockstep_pair, lockstep_pair)


async def test_handshake_reports_peer() -> None:
    a, b = await memory_pair()
    assert a.peer == PeerHello(
        peer_id=IB.peer_id,
        identity_key=IB.public_key,
        version=PROTOCOL_VERSION,
        swarm_id=SWARM.swarm_id,
        addresses=("[::1]:7000", "127.0.0.1:7001"),
    )
    assert b.peer == PeerHello(
        peer_id=IA.peer_id, identity_key=IA.public_key, version=1, swarm_id=SWARM.swarm_id, addresses=()
    )
    assert a.handshake_hash == b.handshake_hash
    assert len(a.handshake_hash) == 32


async def test_large_transfer_spans_frames() -> None:
    a, b = await memory_pair()
    data = bytes(range(256)) * 5000  # 1.28 MB: several frames of the default size
    got = bytearray()

    async def reader() -> None:
        while len(got) < len(data):
            got.extend(await b.receive_some(100_000))

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await a.send_all(data)
    assert bytes(got) == data


# ---- handshake failures through open_secure_channel -----------------------------------------


async def outcomes(
    a: trio.abc.Stream, b: trio.abc.Stream, *, kw_a: dict | None = None, kw_b: dict | None = None
) -> tuple[object, object]:
    """Run both sides; return each side's SecureStream or the exception it raised."""
    res: dict[int, object] = {}

    async def side(k: int, s: trio.abc.Stream, ident: Identity, init: bool, kw: dict) -> None:
        kw = {"swarm": SWARM, **kw}
        try:
            res[k] = await open_secure_channel(s, identity=ident, initiator=init, **kw)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            res[k] = exc

    async with trio.open_nursery() as n:
        n.start_soon(side, 0, a, IA, True, kw_a or {})
        n.start_soon(side, 1, b, IB, False, kw_b or {})
    return res[0], res[1]


async def assert_closed(stream: trio.abc.Stream) -> None:
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"x")


async def test_wrong_psk_both_sides_refuse_and_close() -> None:
    a, b = trio.testing.memory_stream_pair()
    wrong = SwarmKey(swarm_id=SWARM.swarm_id, psk=b"\x01" * 32)
    ra, rb = await outcomes(a, b, kw_b={"swarm": wrong})
    assert isinstance(ra, AuthenticationError) and str(ra) == "peer refused the handshake: wrong swarm key (PSK mismatch)"
    assert isinstance(rb, AuthenticationError) and str(rb) == "wrong swarm key (PSK mismatch)"
    await assert_closed(a)
    await assert_closed(b)


async def test_other_swarm_refused() -> None:
    a, b = trio.testing.memory_stream_pair()
    ra, rb = await outcomes(a, b, kw_b={"swarm": SwarmKey.open("elsewhere")})
    assert isinstance(ra, AuthenticationError) and str(ra).startswith("swarm id mismatch")
    # The initiator hung up without sending message 3: the responder sees a closed transport.
    assert isinstance(rb, PeerUnreachable) and "closed the connection during the handshake" in str(rb)
    await assert_closed(a)
    await assert_closed(b)


async def test_wrong_version_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import gossip.handshake as hs

    real = hs.make_hello

    def newer_initiator(identity, static, swarm, addresses):  # type: ignore[no-untyped-def]
        if identity is IA:
            monkeypatch.setattr(hs, "PROTOCOL_VERSION", 2)
            try:
                return real(identity, static, swarm, addresses)
            finally:
                monkeypatch.setattr(hs, "PROTOCOL_VERSION", 1)
        return real(identity, static, swarm, addresses)

    monkeypatch.setattr(hs, "make_hello", newer_initiator)
    ra, rb = await outcomes(*trio.testing.memory_stream_pair())
    assert isinstance(rb, AuthenticationError) and str(rb) == "wrong protocol version: peer speaks 2, we speak 1"
    assert isinstance(ra, AuthenticationError)
    assert str(ra) == "peer refused the handshake: wrong protocol version: peer speaks 2, we speak 1"


async def test_unexpected_peer_id_refused() -> None:
    ra, rb = await outcomes(*trio.testing.memory_stream_pair(), kw_a={"expected_peer_id": IA.peer_id})
    assert isinstance(ra, AuthenticationError) and str(ra).startswith("unexpected peer id")
    assert isinstance(rb, PeerUnreachable)
    ra, rb = await outcomes(*trio.testing.memory_stream_pair(), kw_a={"expected_peer_id": IB.peer_id})
    assert isinstance(ra, SecureStream) and ra.peer.peer_id == IB.peer_id


async def test_handshake_timeout_exact(autojump_clock: trio.testing.MockClock) -> None:
    a, b = trio.testing.memory_stream_pair()  # nobody answers on b
    start = trio.current_time()
    with pytest.raises(PeerTimeout, match=r"handshake not finished within 5.0 s \(await message 2\)"):
        await open_secure_channel(a, identity=IA, swarm=SWARM, initiator=True, timeout=5.0)
    assert trio.current_time() - start == 5.0
    await assert_closed(a)


async def test_garbage_from_peer_is_a_protocol_error() -> None:
    a, b = trio.testing.memory_stream_pair()
    await b.send_all(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(RemoteProtocolError, match="handshake message of 18245 bytes"):
        await open_secure_channel(a, identity=IA, swarm=SWARM, initiator=True)
    await assert_closed(a)


async def test_bad_arguments_close_the_stream() -> None:
    a, _ = trio.testing.memory_stream_pair()
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        await open_secure_channel(a, identity=IA, swarm=SWARM, initiator=True, timeout=0)
    await assert_closed(a)
    a, _ = trio.testing.memory_stream_pair()
    with pytest.raises(ValueError, match="frame_size must be"):
        await open_secure_channel(a, identity=IA, swarm=SWARM, initiator=True, frame_size=0)
    await assert_closed(a)


# ---- attacks on frames in transit -----------------------------------------------------------


class Tamper(trio.abc.Stream):
    """Wraps a transport; once armed, `mangle` rewrites the list of outgoing writes."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.armed = False
        self.held: list[bytes] = []
        self.mangle = lambda data, held: [data]

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        data = bytes(data)
        for chunk in self.mangle(data, self.held) if self.armed else [data]:
            await self.inner.send_all(chunk)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def tamper_pair() -> tuple[SecureStream, SecureStream, Tamper]:
    raw_a, raw_b = trio.testing.memory_stream_pair()
    tamper = Tamper(raw_a)
    a, b = await secure_pair(tamper, raw_b)
    tamper.armed = True
    return a, b, tamper


async def expect_reader_error(a: SecureStream, b: SecureStream, sends: list[bytes], good: list[bytes], match: str) -> None:
    for data in sends:
        await a.send_all(data)
    for want in good:
        assert await b.receive_some() == want
    with pytest.raises(RemoteProtocolError, match=match):
        await b.receive_some()
    # The connection is torn down: later use says so, and the transport is closed.
    with pytest.raises(trio.BrokenResourceError, match="connection torn down"):
        await b.receive_some()
    with pytest.raises(trio.BrokenResourceError, match="connection torn down"):
        await b.send_all(b"reply")
    await assert_closed(b.transport_stream)


def flip(data: bytes, held: list[bytes]) -> list[bytes]:
    return [data[:10] + bytes([data[10] ^ 0x80]) + data[11:]]


async def test_tampered_frame_detected() -> None:
    a, b, tamper = await tamper_pair()
    tamper.mangle = flip
    await expect_reader_error(a, b, [b"secret"], [], "frame 0 failed authentication")


async def test_replayed_frame_detected() -> None:
    a, b, tamper = await tamper_pair()
    tamper.mangle = lambda data, held: [data, data]
    await expect_reader_error(a, b, [b"pay once"], [b"pay once"], "frame 1 failed authentication")


async def test_reordered_frames_detected() -> None:
    a, b, tamper = await tamper_pair()

    def swap(data: bytes, held: list[bytes]) -> list[bytes]:
        if not held:
            held.append(data)
            return []
        return [data, held.pop()]

    tamper.mangle = swap
    await expect_reader_error(a, b, [b"first", b"second"], [], "frame 0 failed authentication")


async def test_dropped_frame_detected() -> None:
    a, b, tamper = await tamper_pair()
    tamper.mangle = lambda data, held: [] if not held and not held.append(data) else [data]
    await expect_reader_error(a, b, [b"lost", b"next"], [], "frame 0 failed authentication")


async def test_oversized_frame_refused_before_body() -> None:
    a, b, tamper = await tamper_pair()
    # Announce a 2 MiB frame and send nothing more: refused from the 4 length bytes alone.
    tamper.mangle = lambda data, held: [(2 * 2**20 + TAG_LEN).to_bytes(HEADER_LEN, "big")]
    await expect_reader_error(a, b, [b"x"], [], "exceeds the cap of 1048576")


async def test_truncated_frame_at_close_detected() -> None:
    a, b, tamper = await tamper_pair()
    tamper.mangle = lambda data, held: [data[:-3]]
    await a.send_all(b"almost")
    await tamper.inner.aclose()
    with pytest.raises(RemoteProtocolError, match="closed in the middle of a frame"):
        await b.receive_some()


async def test_clean_close_at_boundary_and_eof_frame() -> None:
    a, b = await memory_pair()
    await a.send_all(b"bye")
    await a.aclose()
    assert await b.receive_some() == b"bye"
    assert await b.receive_some() == b""
    assert await b.receive_some() == b""
    a, b = await memory_pair()
    await a.send_eof()
    with pytest.raises(trio.ClosedResourceError, match="after send_eof"):
        await a.send_all(b"late")
    assert await b.receive_some() == b""
    await b.send_all(b"still open this way")
    assert await a.receive_some() == b"still open this way"


async def test_partial_reads_of_a_frame() -> None:
    a, b = await memory_pair()
    await a.send_all(b"0123456789")
    assert await b.receive_some(3) == b"012"
    assert await b.receive_some(4) == b"3456"
    assert await b.receive_some() == b"789"
    await a.send_all(b"ab")
    assert await b.receive_some(100) == b"ab"


async def test_interrupted_send_breaks_the_send_side() -> None:
    raw_a, raw_b = trio.testing.lockstep_stream_pair()  # send_all blocks until the peer reads
    a, b = await secure_pair(raw_a, raw_b)
    with trio.move_on_after(0.05):
        await a.send_all(b"x" * 100)  # nobody reads: cancelled mid-frame
    with pytest.raises(trio.BrokenResourceError, match="earlier send was interrupted"):
        await a.send_all(b"y")


# ---- real TCP (the recv_into and reused-send-buffer paths) ---------------------------------


async def tcp_pair(frame_size: int = 2**18) -> tuple[SecureStream, SecureStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        port = listeners[0].socket.getsockname()[1]
        res: dict[int, SecureStream] = {}

        async def dial() -> None:
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            res[0] = await open_secure_channel(tcp, identity=IA, swarm=SWARM, initiator=True, frame_size=frame_size)

        async def accept() -> None:
            tcp = await listeners[0].accept()
            res[1] = await open_secure_channel(tcp, identity=IB, swarm=SWARM, initiator=False)

        async with trio.open_nursery() as n:
            n.start_soon(dial)
            n.start_soon(accept)
        return res[0], res[1]
    finally:
        for listener in listeners:
            await listener.aclose()


async def test_check_half_closeable_stream_tcp() -> None:
    await trio.testing.check_half_closeable_stream(tcp_pair, None)


async def test_tcp_bulk_both_ways() -> None:
    a, b = await tcp_pair(frame_size=100_000)
    data = bytes(range(256)) * 12_000  # ~3 MB, frames of 100,000 bytes: not aligned to reads

    async def pump(src: SecureStream, dst: SecureStream, payload: bytes) -> None:
        got = bytearray()

        async def reader() -> None:
            while len(got) < len(payload):
                chunk = await dst.receive_some()
                assert chunk
                got.extend(chunk)

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            for i in range(0, len(payload), 1_000_003):
                await src.send_all(payload[i : i + 1_000_003])
        assert bytes(got) == payload

    async with trio.open_nursery() as n:
        n.start_soon(pump, a, b, data)
        n.start_soon(pump, b, a, data[::-1])
    await a.send_eof()
    assert await b.receive_some() == b""
    await a.aclose()
    await b.aclose()


# ---- send_parts, receive_into and the nowait receives --------------------------------------------


class Recorder(trio.abc.HalfCloseableStream):
    """Records the size of every transport write; says it copies on send, like CountingStream."""

    copies_on_send = True

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self.inner = inner
        self.writes: list[int] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(len(data))
        await self.inner.send_all(bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_send_parts_one_frame_per_part_in_one_write() -> None:
    raw_a, raw_b = trio.testing.memory_stream_pair()
    rec = Recorder(raw_a)
    a, b = await secure_pair(rec, raw_b)
    rec.writes.clear()
    header, payload = b"h" * 13, bytes(range(256)) * 20
    await a.send_parts([header, b"", payload])
    assert rec.writes == [13 + HEADER_LEN + TAG_LEN + len(payload) + HEADER_LEN + TAG_LEN]
    # Each part is its own frame, so the receiver can put each straight where it belongs.
    head_buf, body_buf = bytearray(13), bytearray(len(payload))
    assert await b.receive_into(memoryview(head_buf)) == 13 and head_buf == header
    assert await b.receive_into(memoryview(body_buf)) == len(payload) and body_buf == payload
    assert b._decoder.counter == a._encoder.counter  # two frames each way of the count
    # Writes stay within one maximal frame plus 64 KiB: 3 MiB + 1 goes out as three writes, the
    # 1-byte frame riding with the last maximal one.
    rec.writes.clear()
    big = bytes(3 * 2**20 + 1)
    async with trio.open_nursery() as n:
        n.start_soon(a.send_all, big)
        got = bytearray()
        while len(got) < len(big):
            got += await b.receive_some()
    frame = 2**20 + HEADER_LEN + TAG_LEN
    assert rec.writes == [frame, frame, frame + 1 + HEADER_LEN + TAG_LEN]
    assert got == big


async def test_receive_into_splits_a_frame_that_does_not_fit() -> None:
    a, b = await memory_pair()
    await a.send_all(b"0123456789")
    buf = bytearray(4)
    assert await b.receive_into(memoryview(buf)) == 4 and buf == b"0123"
    assert await b.receive_into(memoryview(buf)) == 4 and buf == b"4567"
    assert await b.receive_into(memoryview(buf)) == 2 and buf[:2] == b"89"
    with pytest.raises(ValueError, match="at least 1 byte"):
        await b.receive_into(memoryview(bytearray(0)))
    await a.send_eof()
    assert await b.receive_into(memoryview(buf)) == 0


async def test_nowait_receives_take_only_what_is_already_here() -> None:
    a, b = await memory_pair()
    with pytest.raises(trio.WouldBlock):
        b.receive_some_nowait()
    await a.send_parts([b"ab", b"cd", b"efgh"])  # three frames, one transport write
    assert await b.receive_some() == b"ab"  # reads the whole write, returns the first frame
    assert b.receive_some_nowait() == b"cd"  # decoded from what is buffered: no wait, no yield
    buf = bytearray(3)
    assert b.receive_into_nowait(memoryview(buf)) == 3 and buf == b"efg"
    assert b.receive_some_nowait(5) == b"h"  # the rest of that frame
    with pytest.raises(trio.WouldBlock):
        b.receive_into_nowait(memoryview(buf))
    await a.aclose()
    assert await b.receive_some() == b""


async def test_nowait_receive_of_a_tampered_frame_tears_the_stream_down() -> None:
    a, b, tamper = await tamper_pair()
    tamper.mangle = lambda data, held: [data, data]  # every write replayed
    await a.send_all(b"once")
    assert await b.receive_some() == b"once"
    with pytest.raises(RemoteProtocolError, match="frame 1 failed authentication"):
        b.receive_some_nowait()
    with pytest.raises(trio.BrokenResourceError, match="connection torn down"):
        await b.receive_some()
    await b.aclose()
    await assert_closed(b.transport_stream)


async def test_tcp_receive_into_and_nowait_carry_every_byte() -> None:
    a, b = await tcp_pair(frame_size=100_000)
    data = bytes(range(256)) * 8_000  # ~2 MB in frames of 100,000 bytes
    got = bytearray(len(data))
    view = memoryview(got)

    async def reader() -> None:
        at = 0
        while at < len(data):
            try:
                n = b.receive_into_nowait(view[at : at + 70_000])  # not aligned to frames
            except trio.WouldBlock:
                n = await b.receive_into(view[at:])
            assert n
            at += n

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await a.send_all(data)
    assert got == data
    await a.aclose()
    assert await b.receive_into(view) == 0
    await b.aclose()


async def test_send_parts_may_skip_the_checkpoint_when_the_kernel_takes_the_bytes() -> None:
    a, b = await tcp_pair()
    ran: list[int] = []

    async def other() -> None:
        ran.append(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)  # runs at the next pass of the scheduler
        await a.send_parts([b"header", b"payload"], checkpoint=False)
        assert ran == []  # the kernel took the bytes: no pass of the scheduler
        with trio.testing.assert_checkpoints():
            await a.send_parts([b"!"])  # by default a checkpoint, like send_all
    assert await b.receive_some() == b"header"
    assert await b.receive_some() == b"payload"
    assert b.receive_some_nowait() == b"!" or await b.receive_some() == b"!"
    await a.aclose()
    await b.aclose()
