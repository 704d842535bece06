"""The frame encoder/decoder: format, the three feeding patterns, attacks, bounds, fuzzing."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossip.errors import LocalProtocolError, RemoteProtocolError
from gossip.frames import (
    CLOSED,
    END_OF_STREAM,
    HEADER_LEN,
    MAX_FRAME_PLAINTEXT,
    NEED_DATA,
    TAG_LEN,
    FrameDecoder,
    FrameEncoder,
    frame_nonce,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
SMALL = 64  # a small max_frame keeps fuzzing fast and caps easy to reach


def drain(dec: FrameDecoder) -> list[object]:
    """Every item next_frame() returns up to and including the first sentinel."""
    items: list[object] = []
    while True:
        item = dec.next_frame()
        items.append(item)
        if not isinstance(item, bytes):
            return items


def test_frame_format_known_answer() -> None:
    enc = FrameEncoder(KEY)
    frame = bytes(enc.encode(b"hello"))
    header = (5 + 16).to_bytes(4, "big")
    assert frame[:4] == header == b"\x00\x00\x00\x15"
    assert frame[4:] == AESGCM(KEY).encrypt(b"\x00" * 4 + (0).to_bytes(8, "big"), b"hello", header)
    assert frame_nonce(1) == bytes(11) + b"\x01"
    second = bytes(enc.encode(b"hello"))
    assert second[4:] == AESGCM(KEY).encrypt(frame_nonce(1), b"hello", header)
    eof = enc.encode_eof()
    assert eof == b"\x00\x00\x00\x10" + AESGCM(KEY).encrypt(frame_nonce(2), b"", b"\x00\x00\x00\x10")
    assert enc.counter == 3


def test_encode_into_reused_buffer_is_identical() -> None:
    out = bytearray(HEADER_LEN + 100 + TAG_LEN)
    a, b = FrameEncoder(KEY, max_frame=100), FrameEncoder(KEY, max_frame=100)
    for data in (b"x" * 100, b"short", b"y" * 37):
        assert bytes(a.encode(data, out)) == bytes(b.encode(data))
    with pytest.raises(LocalProtocolError, match="too small"):
        a.encode(b"z" * 100, bytearray(10))


def test_encoder_refuses_empty_and_oversized() -> None:
    enc = FrameEncoder(KEY, max_frame=10)
    with pytest.raises(LocalProtocolError, match="1 to 10 bytes, not 0"):
        enc.encode(b"")
    with pytest.raises(LocalProtocolError, match="1 to 10 bytes, not 11"):
        enc.encode(b"x" * 11)
    assert enc.counter == 0  # nothing spent
    with pytest.raises(ValueError, match="max_frame"):
        FrameEncoder(KEY, max_frame=MAX_FRAME_PLAINTEXT + 1)
    with pytest.raises(ValueError, match="32 bytes"):
        FrameDecoder(b"short")


def _stream(*payloads: bytes, eof: bool = False) -> bytes:
    enc = FrameEncoder(KEY, max_frame=SMALL)
    out = b"".join(bytes(enc.encode(p)) for p in payloads)
    return out + (enc.encode_eof() if eof else b"")


def test_whole_buffer() -> None:
    dec = FrameDecoder(KEY, max_frame=SMALL)
    dec.receive_data(_stream(b"one", b"two", b"three"))
    assert drain(dec) == [b"one", b"two", b"three", NEED_DATA]
    assert dec.buffered == 0
    assert dec.next_frame() is NEED_DATA


def test_one_byte_at_a_time() -> None:
    data = _stream(b"one", b"two")
    dec = FrameDecoder(KEY, max_frame=SMALL)
    got = []
    for i in range(len(data)):
        dec.receive_data(data[i : i + 1])
        item = dec.next_frame()
        if i in (HEADER_LEN + 3 + TAG_LEN - 1, len(data) - 1):  # the last byte of each frame
            got.append(item)
            assert dec.next_frame() is NEED_DATA
        else:
            assert item is NEED_DATA, i
    assert got == [b"one", b"two"]


def test_trailing_bytes_wait_for_the_rest() -> None:
    data = _stream(b"one", b"two")
    first = HEADER_LEN + 3 + TAG_LEN
    dec = FrameDecoder(KEY, max_frame=SMALL)
    dec.receive_data(data[: first + 5])
    assert drain(dec) == [b"one", NEED_DATA]
    assert dec.buffered == 5
    assert dec.wanted() == len(data) - first - 5
    dec.receive_data(data[first + 5 :])
    assert drain(dec) == [b"two", NEED_DATA]


def test_zero_copy_buffer_path() -> None:
    data = _stream(b"alpha", b"beta")
    dec = FrameDecoder(KEY, max_frame=SMALL)
    pos = 0
    got = []
    while pos < len(data):
        buf = dec.get_buffer(7)
        n = min(len(buf), len(data) - pos)
        buf[:n] = data[pos : pos + n]
        dec.buffer_updated(n)
        pos += n
        got += [x for x in drain(dec) if isinstance(x, bytes)]
    assert got == [b"alpha", b"beta"]
    with pytest.raises(LocalProtocolError, match="beyond the buffer"):
        dec.buffer_updated(10**6)


def test_end_of_stream_and_close() -> None:
    dec = FrameDecoder(KEY, max_frame=SMALL)
    dec.receive_data(_stream(b"last", eof=True))
    assert drain(dec) == [b"last", END_OF_STREAM]
    assert dec.next_frame() is END_OF_STREAM
    dec.receive_data(b"")
    assert dec.next_frame() is END_OF_STREAM

    dec = FrameDecoder(KEY, max_frame=SMALL)
    dec.receive_data(_stream(b"x"))
    dec.receive_data(b"")  # transport closed at a frame boundary
    assert drain(dec) == [b"x", CLOSED]
    assert dec.next_frame() is CLOSED
    with pytest.raises(LocalProtocolError, match="after end of file"):
        dec.receive_data(b"more")


def test_data_after_end_of_stream_is_refused() -> None:
    dec = FrameDecoder(KEY, max_frame=SMALL)
    dec.receive_data(_stream(eof=True) + b"junk")
    with pytest.raises(RemoteProtocolError, match="data after the end-of-stream frame"):
        dec.next_frame()


def test_truncated_at_close() -> None:
    data = _stream(b"cut short")
    dec = FrameDecoder(KEY, max_frame=SMALL)
    dec.receive_data(data[:-1])
    assert dec.next_frame() is NEED_DATA
    dec.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match=rf"closed in the middle of a frame \({len(data) - 1} bytes"):
        dec.next_frame()
    with pytest.raises(RemoteProtocolError):  # stays failed
        dec.next_frame()
    dec = FrameDecoder(KEY, max_frame=SMALL)
    dec.receive_data(data[:2])  # inside the header
    dec.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        dec.next_frame()


@pytest.mark.parametrize("position", [3, 4, 10, -17, -1])  # header low byte, body, tag
def test_tampering_detected(position: int) -> None:
    data = bytearray(_stream(b"sensitive payload"))
    data[position] ^= 0x01
    dec = FrameDecoder(KEY, max_frame=SMALL)
    dec.receive_data(bytes(data))
    dec.receive_data(b"")  # a shortened length leaves a byte over: it must not matter
    with pytest.raises(RemoteProtocolError, match="frame 0 failed authentication"):
        dec.next_frame()


def test_replay_reorder_drop_and_wrong_key_detected() -> None:
    enc = FrameEncoder(KEY, max_frame=SMALL)
    f0, f1 = bytes(enc.encode(b"zero")), bytes(enc.encode(b"one"))
    cases = {
        "replay": f0 + f0,
        "reorder": f1 + f0,
        "drop": f1,
    }
    expected = {"replay": [b"zero"], "reorder": [], "drop": []}
    for name, data in cases.items():
        dec = FrameDecoder(KEY, max_frame=SMALL)
        dec.receive_data(data)
        got = []
        with pytest.raises(RemoteProtocolError, match="failed authentication"):
            while True:
                got.append(dec.next_frame())
        assert got == expected[name], name
    dec = FrameDecoder(OTHER_KEY, max_frame=SMALL)
    dec.receive_data(f0)
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        dec.next_frame()


def test_oversized_frame_refused_from_header_alone() -> None:
    dec = FrameDecoder(KEY)  # the protocol cap: 1 MiB
    before = dec.allocated
    dec.receive_data((MAX_FRAME_PLAINTEXT + TAG_LEN + 1).to_bytes(4, "big"))
    with pytest.raises(RemoteProtocolError, match=f"exceeds the cap of {MAX_FRAME_PLAINTEXT}"):
        dec.next_frame()
    assert dec.allocated == before  # nothing was allocated for the announced body
    assert dec.buffered == 0 and dec.room() == 0
    small = FrameDecoder(KEY, max_frame=SMALL)
    small.receive_data((SMALL + TAG_LEN + 1).to_bytes(4, "big"))
    with pytest.raises(RemoteProtocolError, match=f"exceeds the cap of {SMALL}"):
        small.next_frame()
    short = FrameDecoder(KEY, max_frame=SMALL)
    short.receive_data((TAG_LEN - 1).to_bytes(4, "big"))
    with pytest.raises(RemoteProtocolError, match="shorter than the 16-byte tag"):
        short.next_frame()


def test_max_size_frame_roundtrip_grows_buffer_once() -> None:
    enc = FrameEncoder(KEY, max_frame=MAX_FRAME_PLAINTEXT)
    payload = bytes(range(256)) * (MAX_FRAME_PLAINTEXT // 256)
    data = bytes(enc.encode(payload)) + bytes(enc.encode(b"tiny"))
    dec = FrameDecoder(KEY)
    assert dec.allocated < dec.capacity
    pos = 0
    got = []
    while pos < len(data):
        n = min(dec.room(), 300_000, len(data) - pos)
        dec.receive_data(data[pos : pos + n])
        pos += n
        got += [x for x in drain(dec) if isinstance(x, bytes)]
        assert dec.buffered <= dec.capacity and dec.allocated <= dec.capacity
    assert got == [payload, b"tiny"]
    assert dec.allocated == dec.capacity == HEADER_LEN + MAX_FRAME_PLAINTEXT + TAG_LEN


def test_feeding_beyond_room_is_a_local_error() -> None:
    dec = FrameDecoder(KEY, max_frame=SMALL)
    with pytest.raises(LocalProtocolError, match="exceeds room"):
        dec.receive_data(b"x" * (dec.capacity + 1))


def test_counter_exhaustion() -> None:
    enc = FrameEncoder(KEY, first_counter=2**64 - 1)
    with pytest.raises(LocalProtocolError, match="counter exhausted"):
        enc.encode(b"x")
    dec = FrameDecoder(KEY, first_counter=2**64 - 1)
    dec.receive_data(_stream(b"x"))
    with pytest.raises(RemoteProtocolError, match="counter exhausted"):
        dec.next_frame()


# ---- fuzzing -------------------------------------------------------------------------------


def _feed_all(dec: FrameDecoder, data: bytes, chunks: list[int], close: bool) -> list[object]:
    """Feed `data` in chunk sizes from `chunks` (respecting room()), draining as we go.

    Returns what came out; stops at the first RemoteProtocolError (recorded as the string
    "error"). Checks the memory bound after every step.
    """
    out: list[object] = []
    pos, i = 0, 0
    try:
        while pos < len(data):
            n = min(max(1, chunks[i % len(chunks)]), dec.room(), len(data) - pos)
            i += 1
            dec.receive_data(data[pos : pos + n])
            pos += n
            assert dec.buffered <= dec.capacity and dec.allocated <= dec.capacity
            while True:
                item = dec.next_frame()
                if not isinstance(item, bytes):
                    break
                out.append(item)
            if item is END_OF_STREAM:
                out.append(item)
                break
        if close and out[-1:] != [END_OF_STREAM]:
            dec.receive_data(b"")
            out.extend(x for x in drain(dec) if x is not NEED_DATA)
    except RemoteProtocolError:
        out.append("error")
    assert dec.buffered <= dec.capacity
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600), chunks=st.lists(st.integers(1, 200), min_size=1, max_size=8), close=st.booleans())
def test_fuzz_random_bytes(data: bytes, chunks: list[int], close: bool) -> None:
    out = _feed_all(FrameDecoder(KEY, max_frame=SMALL), data, chunks, close)
    # Random bytes never authenticate: the only outcomes are an error, waiting, or a clean end.
    assert all(not isinstance(x, bytes) for x in out)
    if close and data:
        assert out[-1] == "error"


PAYLOADS = [b"a", b"bb" * 10, b"c" * SMALL, b"d" * 33]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    op=st.sampled_from(["flip", "truncate", "insert", "delete", "duplicate"]),
    where=st.integers(0, 10_000),
    value=st.integers(1, 255),
    chunks=st.lists(st.integers(1, 100), min_size=1, max_size=6),
    close=st.booleans(),
)
def test_fuzz_mutated_stream(op: str, where: int, value: int, chunks: list[int], close: bool) -> None:
    clean = _stream(*PAYLOADS, eof=True)
    pos = where % len(clean)
    if op == "flip":
        mutated = clean[:pos] + bytes([clean[pos] ^ value]) + clean[pos + 1 :]
    elif op == "truncate":
        mutated = clean[:pos]
    elif op == "insert":
        mutated = clean[:pos] + bytes([value]) + clean[pos:]
    elif op == "delete":
        mutated = clean[:pos] + clean[pos + 1 :]
    else:
        mutated = clean[:pos] + clean[pos : pos + value] + clean[pos:]
    out = _feed_all(FrameDecoder(KEY, max_frame=SMALL), mutated, chunks, close)
    frames = [x for x in out if isinstance(x, bytes)]
    # Authenticity: whatever comes out is an unaltered prefix of what was sent, in order.
    assert frames == PAYLOADS[: len(frames)]
    if END_OF_STREAM in out:
        # The end of stream authenticates only if everything before it arrived unaltered.
        assert frames == PAYLOADS and mutated.startswith(clean)
    if mutated != clean:
        if close:
            assert out[-1] in ("error", END_OF_STREAM, CLOSED)
            # A mutation that leaves a clean prefix ending at a frame boundary reads as CLOSED.
            if out[-1] == CLOSED:
                assert op == "truncate"


def test_encoder_without_encrypt_into_is_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    # cryptography releases before encrypt_into take the allocating path: same bytes on the wire.
    import gossip.frames as frames

    expected = bytes(FrameEncoder(KEY).encode(b"same bytes"))
    monkeypatch.setattr(frames, "_HAS_INTO", False)
    assert bytes(FrameEncoder(KEY).encode(b"same bytes", bytearray(100))) == expected


# ---- decrypting straight into the caller's buffer ------------------------------------------------


def test_next_frame_into_fits_decrypts_in_place_else_returns_bytes() -> None:
    dec = FrameDecoder(KEY)
    dec.receive_data(_stream(b"alpha", b"longer payload", b"x", eof=True))
    out = bytearray(b"-" * 8)
    assert dec.next_frame_into(memoryview(out)) == 5
    assert out == b"alpha---"  # exactly the plaintext's bytes written, the rest untouched
    # Longer than the buffer: returned as bytes, the buffer untouched, the frame consumed.
    assert dec.next_frame_into(memoryview(out)) == b"longer payload"
    assert out == b"alpha---"
    assert dec.next_frame_into(memoryview(out)[3:4]) == 1 and out == b"alpxa---"
    assert dec.next_frame_into(memoryview(out)) is END_OF_STREAM
    assert dec.counter == 4


def test_next_frame_into_waits_and_detects_tampering() -> None:
    data = bytearray(_stream(b"secret"))
    dec = FrameDecoder(KEY, max_frame=SMALL)
    dec.receive_data(bytes(data[:-1]))
    out = memoryview(bytearray(6))
    assert dec.next_frame_into(out) is NEED_DATA
    dec.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        dec.next_frame_into(out)
    data[HEADER_LEN + 2] ^= 1
    dec = FrameDecoder(KEY, max_frame=SMALL)
    dec.receive_data(bytes(data))
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        dec.next_frame_into(out)
    with pytest.raises(RemoteProtocolError):  # the decoder stays dead
        dec.next_frame()


def test_next_frame_into_without_decrypt_into(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gossip.frames._HAS_DECRYPT_INTO", False)  # cryptography < 45
    dec = FrameDecoder(KEY, max_frame=SMALL)
    dec.receive_data(_stream(b"abc", b"defg"))
    out = bytearray(4)
    assert dec.next_frame_into(memoryview(out)) == 3 and out[:3] == b"abc"
    assert dec.next_frame_into(memoryview(out)) == 4 and out == b"defg"
