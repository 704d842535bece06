"""The sans-IO RPC core: envelopes, framing, chunks, ids, cancel, GOAWAY, and hostile input."""

import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossip import messages
from gossip import rpc_wire as wire
from gossip.errors import LocalProtocolError, RemoteProtocolError
from gossip.messages import Int, Map
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

BLOB = messages.define(
    "test.rpc_blob",
    1,
    Map({"n": Int(0, 1000)}, optional=frozenset({"n"})),
    Map({"n": Int(0, 1000)}),
    max_request_buffers=3,
    max_response_buffers=3,
    max_buffer_bytes=4 << 20,
)
PING = messages.PING


def drain(src: RpcProtocol) -> bytes:
    out = bytearray()
    while (data := src.data_to_send()) is not None:
        out += data
    return bytes(out)


def events(dst: RpcProtocol, data: bytes) -> list:
    dst.receive_data(data)
    out = []
    while (ev := dst.next_event()) is not NEED_DATA:
        out.append(ev)
        if isinstance(ev, ConnectionEnded):
            break
    return out


def pair(**kw):
    return RpcProtocol(RpcLimits(**kw)), RpcProtocol(RpcLimits(**kw))


def frame(kind: int, payload: bytes) -> bytes:
    return struct.pack("!IB", len(payload) + 1, kind) + payload


def request_bytes(id_=1, type_="wire.ping", v=1, body=None, bufs=(), **extra) -> bytes:
    env = {"id": id_, "type": type_, "v": v, "body": {"nonce": 7} if body is None else body, "bufs": list(bufs)}
    env.update(extra)
    return frame(wire.REQUEST, msgpack.packb(env))


# -- the wire format, byte for byte -----------------------------------------------------------------


def test_ping_request_bytes_are_exactly_as_documented():
    a = RpcProtocol()
    assert a.start_call(PING, {"nonce": 7}) == 1
    sent = drain(a)
    # length 43 (kind + 42-byte map), kind 1, then {"id":1,"type":"wire.ping","v":1,"body":{"nonce":7},"bufs":[]}
    assert sent.hex() == (
        "0000002b01"
        "85a2696401a474797065a9776972652e70696e67a17601a4626f647981a56e6f6e636507a46275667390"
    )


def test_chunks_follow_the_header_split_at_chunk_bytes():
    a = RpcProtocol(RpcLimits(chunk_bytes=100))
    a.start_call(BLOB, {}, [b"x" * 250, b"", b"y" * 30])
    pieces = []
    while (data := a.data_to_send()) is not None:
        pieces.append(bytes(data))
    head = msgpack.unpackb(pieces[0][5:])
    assert head == {"id": 1, "type": "test.rpc_blob", "v": 1, "body": {}, "bufs": [250, 0, 30]}
    # Chunks: length (kind + id + data), kind 5, id 1, data; never crossing a buffer boundary.
    assert [(struct.unpack("!IBQ", p[:13]), len(p) - 13) for p in pieces[1:]] == [
        ((109, 5, 1), 100),
        ((109, 5, 1), 100),
        ((59, 5, 1), 50),
        ((39, 5, 1), 30),
    ]
    assert pieces[4][13:] == b"y" * 30


def test_round_trip_with_buffers_both_ways():
    a, b = pair(chunk_bytes=1000)
    cid = a.start_call(BLOB, {"n": 3}, [b"abc" * 1000, bytearray(b"z" * 10)])
    [req] = events(b, drain(a))
    assert isinstance(req, RequestReceived)
    assert (req.request_id, req.message_type.name, req.body) == (1, "test.rpc_blob", {"n": 3})
    assert [bytes(x) for x in req.buffers] == [b"abc" * 1000, b"z" * 10]
    assert b.respond(req.request_id, {"n": 4}, [memoryview(b"r" * 2500)])
    [resp] = events(a, drain(b))
    assert resp == ResponseReceived(cid, {"n": 4}, [bytearray(b"r" * 2500)])
    assert a.idle and b.idle
    assert a.stats.messages_sent == 1 and a.stats.messages_received == 1
    assert b.stats.messages_sent == 1 and b.stats.messages_received == 1
    # Bytes per method: the request's header plus four chunk headers and 3010 raw bytes.
    assert a.stats.by_method["test.rpc_blob"] == len(request_bytes(1, "test.rpc_blob", 1, {"n": 3}, [3000, 10])) + 4 * 13 + 3010


# -- the decoder three ways ---------------------------------------------------------------------------


def _two_messages() -> tuple[bytes, bytes]:
    a = RpcProtocol(RpcLimits(chunk_bytes=64))
    a.start_call(BLOB, {"n": 1}, [bytes(range(200))])
    first = drain(a)
    a.start_call(PING, {"nonce": 9})
    return first, drain(a)


def test_decoder_whole_buffer():
    first, second = _two_messages()
    b = RpcProtocol()
    evs = events(b, first + second)
    assert [type(e) for e in evs] == [RequestReceived, RequestReceived]
    assert bytes(evs[0].buffers[0]) == bytes(range(200))
    assert evs[1].body == {"nonce": 9}
    assert b.buffered_bytes == 0


def test_decoder_one_byte_at_a_time():
    first, second = _two_messages()
    b = RpcProtocol()
    got = []
    data = first + second
    for i in range(len(data)):
        b.receive_data(data[i : i + 1])
        ev = b.next_event()
        if ev is NEED_DATA:
            continue
        got.append((i, ev))
        assert b.next_event() is NEED_DATA
    # Each event appears exactly when its last byte arrives, not one byte earlier.
    assert [i for i, _ in got] == [len(first) - 1, len(data) - 1]
    assert bytes(got[0][1].buffers[0]) == bytes(range(200))


def test_decoder_with_trailing_bytes():
    first, second = _two_messages()
    b = RpcProtocol()
    evs = events(b, first + second[:7])
    assert len(evs) == 1 and isinstance(evs[0], RequestReceived)
    assert b.buffered_bytes == 7  # the partial next message waits, nothing is lost
    evs = events(b, second[7:])
    assert evs[0].body == {"nonce": 9}


def test_end_of_stream_at_a_boundary_and_mid_message():
    b = RpcProtocol()
    assert events(b, b"") == [ConnectionEnded()]
    b = RpcProtocol()
    b.receive_data(request_bytes()[:10])
    assert b.next_event() is NEED_DATA
    b.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="ended in the middle"):
        b.next_event()


# -- scheduling: control before bulk, round robin ------------------------------------------------


def test_control_message_never_waits_behind_more_than_one_chunk():
    a = RpcProtocol(RpcLimits(chunk_bytes=1000))
    a.start_call(BLOB, {}, [b"a" * 5000])
    kinds = []
    kinds.append(bytes(a.data_to_send())[4])  # the header
    kinds.append(bytes(a.data_to_send())[4])  # one chunk
    a.start_call(PING, {"nonce": 1})  # arrives while the transfer is half done
    kinds.append(bytes(a.data_to_send())[4])
    while (d := a.data_to_send()) is not None:
        kinds.append(bytes(d)[4])
    assert kinds == [wire.REQUEST, wire.REQUEST_CHUNK, wire.REQUEST] + [wire.REQUEST_CHUNK] * 4


def test_transfers_take_turns():
    a = RpcProtocol(RpcLimits(chunk_bytes=10))
    a.start_call(BLOB, {}, [b"1" * 30])
    a.start_call(BLOB, {}, [b"2" * 20])
    assert bytes(a.data_to_send())[4] == wire.REQUEST  # both headers in one write
    ids = []
    while (d := a.data_to_send()) is not None:
        ids.append(struct.unpack("!IBQ", bytes(d)[:13])[2])
    assert ids == [1, 2, 1, 2, 1]


# -- cancel, errors, late answers ---------------------------------------------------------------


def test_cancel_before_the_header_is_sent_sends_nothing():
    a = RpcProtocol()
    cid = a.start_call(BLOB, {}, [b"x" * 10])
    a.cancel_call(cid)
    assert a.data_to_send() is None and a.idle


def test_cancel_mid_transfer_stops_chunks_and_cancels_the_handler():
    a, b = pair(chunk_bytes=10)
    cid = a.start_call(BLOB, {}, [b"x" * 100])
    sent = a.data_to_send() + a.data_to_send()  # header + one chunk
    assert events(b, sent) == []  # still assembling
    a.cancel_call(cid)
    rest = drain(a)
    assert rest == frame(wire.CANCEL, msgpack.packb({"id": cid}))  # no further chunks
    assert events(b, rest) == []  # an assembling request is just dropped
    assert b.idle

    cid = a.start_call(PING, {"nonce": 5})
    [req] = events(b, drain(a))
    a.cancel_call(cid)
    assert events(b, drain(a)) == [CancelReceived(req.request_id)]
    assert b.respond(req.request_id, {"nonce": 5}) is False  # the handler's late answer is dropped
    assert b.data_to_send() is None


def test_late_answer_to_a_cancelled_call_is_skipped():
    a, b = pair(chunk_bytes=10)
    cid = a.start_call(BLOB, {})
    [req] = events(b, drain(a))
    b.respond(req.request_id, {"n": 1}, [b"q" * 35])
    answer = drain(b)
    a.cancel_call(cid)
    assert events(a, answer) == []  # header and chunks skipped, nothing buffered
    assert a.buffered_bytes == 0
    cid2 = a.start_call(PING, {"nonce": 2})
    [req2] = events(b, drain(a))
    b.respond(req2.request_id, {"nonce": 2})
    assert events(a, drain(b)) == [ResponseReceived(cid2, {"nonce": 2}, [])]


def test_error_answer_and_early_refusal_stop_our_chunks():
    a, b = pair(chunk_bytes=10)
    cid = a.start_call(PING, {"nonce": 1})
    [req] = events(b, drain(a))
    b.respond_error(req.request_id, "ValueError", "bad " * 400)
    [err] = events(a, drain(b))
    assert err == ErrorReceived(cid, "ValueError", ("bad " * 400)[:1000])

    a, b = pair(max_inbound=1, chunk_bytes=10)
    a.start_call(PING, {"nonce": 1})
    [first] = events(b, drain(a))
    second = a.start_call(BLOB, {}, [b"y" * 100])
    assert events(b, bytes(a.data_to_send()) + bytes(a.data_to_send())) == []
    [refusal] = events(a, drain(b))
    assert refusal.call_id == second and refusal.kind == "Overloaded"
    assert a.data_to_send() is None  # the other 90 bytes are never sent
    assert first.request_id == 1


def test_our_own_invalid_messages_are_local_errors():
    a, b = pair()
    with pytest.raises(LocalProtocolError):
        a.start_call(PING, {"nonce": -1})
    with pytest.raises(LocalProtocolError):
        a.start_call(PING, {"nonce": 1}, [b"x"])  # ping allows no buffers
    a.start_call(PING, {"nonce": 1})
    [req] = events(b, drain(a))
    with pytest.raises(LocalProtocolError):
        b.respond(req.request_id, {"nonce": "x"})
    assert b.respond_error(req.request_id, "LocalProtocolError", "bad response")


def test_goaway_lets_calls_finish_then_reports_finished():
    a, b = pair()
    cid = a.start_call(PING, {"nonce": 3})
    [req] = events(b, drain(a))
    b.send_goaway()
    assert not b.can_start_call
    assert events(a, drain(b)) == [GoAwayReceived()]
    with pytest.raises(LocalProtocolError, match="GOAWAY"):
        a.start_call(PING, {"nonce": 4})
    assert events(b, drain(a)) == [GoAwayReceived()]  # a answered with its own GOAWAY
    assert not b.finished  # still owes an answer
    b.respond(req.request_id, {"nonce": 3})
    assert events(a, drain(b)) == [ResponseReceived(cid, {"nonce": 3}, [])]
    assert a.finished and b.finished


# -- hostile input: each a typed error, the peer dropped -----------------------------------------------


@pytest.mark.parametrize(
    "data, match",
    [
        (frame(9, b"x"), "unknown message kind 9"),
        (struct.pack("!IB", wire.MAX_CONTROL_BYTES + 2, wire.REQUEST), "outside"),
        (struct.pack("!IBQ", wire.CHUNK_BYTES + 10, wire.REQUEST_CHUNK, 1), "outside"),
        (frame(wire.GOAWAY, b"x"), "outside"),
        (frame(wire.REQUEST, b"\xc1"), "invalid msgpack"),
        (frame(wire.REQUEST, msgpack.packb({"id": 1}) + b"\x00"), "invalid msgpack"),
        (frame(wire.REQUEST, msgpack.packb(msgpack.ExtType(5, b"x"))), "max_ext_len"),
        (frame(wire.REQUEST, b"\xc7\x00\x05"), "ext type 5 is not allowed"),  # empty ext 8
        (frame(wire.REQUEST, msgpack.packb([1, 2])), "expected map"),
        (frame(wire.REQUEST, b"\xdd\xff\xff\xff\xff"), "invalid msgpack"),  # array of 4G items
        (request_bytes(extra="x"), "unknown field 'extra'"),
        (request_bytes(id_=0), "outside"),
        (request_bytes(type_="no.such"), "unknown message type"),
        (request_bytes(v=2), "version 2"),
        (request_bytes(body={"nonce": "7"}), "expected int"),
        (request_bytes(body={"nonce": 7, "x": 1}), "unknown field 'x'"),
        (request_bytes(bufs=[1]), "1 buffers, at most 0"),
        (request_bytes(type_="test.rpc_blob", body={}, bufs=[4 << 20, 1]), "at most 4194304"),
        (request_bytes(type_="test.rpc_blob", body={}, bufs=[1, 1, 1, 1]), "4 buffers"),
        (request_bytes(id_=2) + request_bytes(id_=2), "does not increase"),
        (frame(wire.RESPONSE, msgpack.packb({"id": 1, "body": {}, "bufs": []})), "never made"),
        (frame(wire.CANCEL, msgpack.packb({"id": 3})), "never sent"),
        (struct.pack("!IBQ", 10, wire.REQUEST_CHUNK, 1) + b"x", "not receiving"),
        (request_bytes(type_="test.rpc_blob", body={}, bufs=[2]) + struct.pack("!IBQ", 12, wire.REQUEST_CHUNK, 1) + b"xyz", "only 2 left"),
        (frame(wire.GOAWAY, b"") + request_bytes(), "after the peer's GOAWAY"),
        (frame(wire.GOAWAY, b"") * 2, "second GOAWAY"),
    ],
)
def test_hostile_messages_are_remote_protocol_errors(data, match):
    b = RpcProtocol()
    b.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=match):
        while b.next_event() is not NEED_DATA:
            pass
    assert b.broken
    with pytest.raises(RemoteProtocolError):  # final: the connection is dead
        b.next_event()


def test_oversized_length_is_refused_from_the_prefix_alone():
    b = RpcProtocol()
    b.receive_data(struct.pack("!IB", 0xFFFFFFFF, wire.REQUEST))  # 5 bytes announce 4 GiB
    with pytest.raises(RemoteProtocolError, match="outside"):
        b.next_event()
    assert b.buffered_bytes == 0


def test_invalid_request_is_answered_before_the_drop():
    b = RpcProtocol()
    b.receive_data(request_bytes(id_=4, body={"nonce": 7, "evil": 1}))
    with pytest.raises(RemoteProtocolError):
        b.next_event()
    reply = msgpack.unpackb(bytes(b.data_to_send())[5:])
    assert reply == {"id": 4, "kind": "RemoteProtocolError", "message": "wire.ping request: unknown field 'evil'"}
    assert b.data_to_send() is None


def test_invalid_response_fails_that_call():
    a = RpcProtocol()
    cid = a.start_call(PING, {"nonce": 1})
    drain(a)
    a.receive_data(frame(wire.RESPONSE, msgpack.packb({"id": cid, "body": {"nonce": True}, "bufs": []})))
    with pytest.raises(CallProtocolError) as info:
        a.next_event()
    assert info.value.call_id == cid and "expected int, got bool" in str(info.value)


def test_limits_are_checked():
    with pytest.raises(ValueError, match="chunk_bytes"):
        RpcLimits(chunk_bytes=wire.CHUNK_BYTES + 1)
    with pytest.raises(ValueError, match="max_calls"):
        RpcLimits(max_calls=0)
    a = RpcProtocol(RpcLimits(max_calls=2))
    a.start_call(PING, {"nonce": 1})
    a.start_call(PING, {"nonce": 2})
    assert not a.can_start_call
    with pytest.raises(LocalProtocolError, match="2 calls in flight"):
        a.start_call(PING, {"nonce": 3})


# -- fuzzing ------------------------------------------------------------------------------------------


def _valid_stream() -> bytes:
    a = RpcProtocol(RpcLimits(chunk_bytes=16))
    a.start_call(BLOB, {"n": 2}, [b"k" * 40, b"j" * 3])
    a.start_call(PING, {"nonce": 11})
    a.start_call(BLOB, {})
    return drain(a) + frame(wire.CANCEL, msgpack.packb({"id": 3}))


VALID = _valid_stream()
CAP = 4 + 1 + wire.MAX_CONTROL_BYTES


def _feed_all(data: bytes, step: int) -> None:
    b = RpcProtocol()
    try:
        for i in range(0, len(data), step):
            b.receive_data(data[i : i + step])
            while (ev := b.next_event()) is not NEED_DATA:
                if isinstance(ev, RequestReceived):
                    # Allocated buffers never exceed what the type allows.
                    assert sum(len(x) for x in ev.buffers) <= ev.message_type.max_buffer_bytes
            assert b.buffered_bytes <= CAP + step
    except RemoteProtocolError:
        assert b.broken


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.integers(1, 64))
def test_fuzz_random_bytes_only_typed_errors(data, step):
    _feed_all(data, step)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=6),
       st.integers(0, len(VALID)), st.integers(1, 97))
def test_fuzz_mutated_valid_stream_only_typed_errors(flips, cut, step):
    data = bytearray(VALID)
    for pos, value in flips:
        data[pos] = value
    _feed_all(bytes(data[:cut]) + bytes(data[cut:]), step)


# -- receiving chunk payloads straight into their buffers ----------------------------------------------


def test_chunk_target_takes_payload_in_place_and_matches_receive_data():
    a, b = pair(chunk_bytes=100)
    payload = bytes(range(250))
    a.start_call(BLOB, {"n": 1}, [payload, b"tail"])
    assert a.has_output
    pieces = []
    while (p := a.pieces_to_send()) is not None:
        pieces.append([bytes(x) for x in p])
    assert not a.has_output
    assert [len(x) for p in pieces for x in p][1:] == [13, 100, 13, 100, 13, 50, 13, 4]
    assert b.chunk_target() is None  # nothing in flight yet: feed receive_data
    got = []
    for head, *data in pieces:
        assert events(b, head) == []  # the request header, or a chunk header
        if not data:
            continue
        target = b.chunk_target()
        assert target is not None and len(target) == len(data[0])  # exactly this chunk's payload
        k = len(data[0]) // 2
        target[:k] = data[0][:k]  # a partial receive is fine
        b.chunk_received(k)
        assert b.next_event() is NEED_DATA
        rest = b.chunk_target()
        assert len(rest) == len(data[0]) - k
        rest[:] = data[0][k:]
        b.chunk_received(len(rest))
        got += list(iter(b.next_event, NEED_DATA))
        assert b.chunk_target() is None  # between chunks: the next header goes to receive_data
    [req] = got
    assert isinstance(req, RequestReceived)
    assert [bytes(x) for x in req.buffers] == [payload, b"tail"]


def test_chunk_target_only_when_nothing_is_buffered_and_misuse_is_refused():
    a, b = pair(chunk_bytes=100)
    a.start_call(BLOB, {"n": 1}, [b"x" * 100])
    data = drain(a)
    header = len(data) - 113  # the request header, then one chunk: 13-byte header + 100 bytes
    b.receive_data(data[: header + 13 + 5])  # up to 5 bytes into the chunk's payload
    assert b.next_event() is NEED_DATA
    assert len(b.chunk_target()) == 95  # the 5 bytes were copied in already
    with pytest.raises(LocalProtocolError, match="chunk_received"):
        b.chunk_received(96)  # more than the chunk has left
    b.chunk_target()[:] = data[header + 18 :]
    b.chunk_received(95)
    [req] = list(iter(b.next_event, NEED_DATA))
    assert bytes(req.buffers[0]) == b"x" * 100
    assert b.chunk_target() is None
    with pytest.raises(LocalProtocolError, match="chunk_received"):
        b.chunk_received(1)
    b.receive_data(b"\x00\x00")  # two bytes of a length prefix: no target while they wait
    assert b.chunk_target() is None
    b.chunk_received(0)  # end of stream, in the middle of a message
    with pytest.raises(RemoteProtocolError, match="middle of a message"):
        b.next_event()
