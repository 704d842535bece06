"""One RPC connection over an in-memory stream: concurrency, deadlines, cancel, errors, drops."""

import struct
from contextlib import asynccontextmanager

import msgpack
import pytest
import trio
import trio.testing

from gossip import messages
from gossip import rpc_wire as wire
from gossip.connection import Connection, ConnectionClosing, ConnectionConfig
from gossip.errors import LocalProtocolError, PeerUnreachable, RemoteError, RemoteProtocolError
from gossip.messages import Int, Map
from gossip.rpc import RpcLimits
from gossip.transport import Response, TrafficStats

ECHO = messages.define(
    "test.conn_echo",
    1,
    Map({"n": Int(0, 1 << 20), "sleep": Int(0, 1000)}, optional=frozenset({"sleep"})),
    Map({"n": Int(0, 1 << 20)}),
    max_request_buffers=4,
    max_response_buffers=4,
    max_buffer_bytes=8 << 20,
)
PING = messages.PING
A, B = b"A" * 32, b"B" * 32


async def echo(req):
    if req.body.get("sleep"):
        await trio.sleep(req.body["sleep"])
    if req.body["n"] == 13:
        raise ValueError("unlucky")
    if req.body["n"] == 14:
        return Response({"n": "fourteen"})  # breaks our own response schema
    return Response({"n": req.body["n"]}, [bytes(b)[::-1] for b in req.buffers])


async def ping(req):
    return Response({"nonce": req.body["nonce"]})


HANDLERS = {ECHO.name: echo, PING.name: ping}


@asynccontextmanager
async def connected(config=ConnectionConfig(), handlers_a=HANDLERS, handlers_b=HANDLERS):
    sa, sb = trio.testing.memory_stream_pair()
    a = Connection(sa, peer_id=B, handlers=handlers_a, stats=TrafficStats(), config=config, label="b")
    b = Connection(sb, peer_id=A, handlers=handlers_b, stats=TrafficStats(), config=config, label="a")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run)
        nursery.start_soon(b.run)
        yield a, b
        nursery.cancel_scope.cancel()


async def test_many_concurrent_calls_each_get_their_own_answer(autojump_clock):
    config = ConnectionConfig(limits=RpcLimits(chunk_bytes=1000, max_calls=200, max_inbound=200))
    results = {}
    async with connected(config) as (a, b):

        async def one(i):
            payload = bytes([i % 251]) * (i * 97)
            body, bufs = await a.call(ECHO, {"n": i + 100, "sleep": i % 3}, [payload, b"x" * i])
            results[i] = (body, [bytes(x) for x in bufs])

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(one, i)
    assert len(results) == 200
    for i, (body, bufs) in results.items():
        assert body == {"n": i + 100}
        assert bufs == [(bytes([i % 251]) * (i * 97))[::-1], b"x" * i]
    assert a.stats.messages_sent == 200 and b.stats.messages_received == 200
    assert trio.current_time() == 2.0  # the slowest handler slept 2 s; nothing else took time


async def test_deadline_cancels_the_remote_handler(autojump_clock):
    seen = []

    async def slow(req):
        try:
            await trio.sleep(10)
        finally:
            seen.append(trio.current_time())
        return Response({"nonce": 0})

    handlers_b = {PING.name: slow}
    async with connected(handlers_b=handlers_b) as (a, b):
        with trio.move_on_after(3) as scope:
            await a.call(PING, {"nonce": 1})
        assert scope.cancelled_caught
        await trio.sleep(0.001)
        assert seen == [3.0]  # the handler was cancelled when the deadline hit, not at 10 s
        assert a.idle and b.idle
        # The connection is still good for the next call.
        assert b.usable
        handlers_b[PING.name] = ping  # handlers are looked up per request
        assert (await a.call(PING, {"nonce": 2}))[0] == {"nonce": 2}


async def test_handler_errors_come_back_typed(autojump_clock):
    async with connected(handlers_b={ECHO.name: echo}) as (a, b):
        with pytest.raises(RemoteError) as info:
            await a.call(ECHO, {"n": 13})
        assert (info.value.kind, info.value.message) == ("ValueError", "unlucky")
        with pytest.raises(RemoteError) as info:
            await a.call(ECHO, {"n": 14})
        assert info.value.kind == "LocalProtocolError" and "expected int, got str" in info.value.message
        with pytest.raises(RemoteError) as info:
            await a.call(PING, {"nonce": 1})
        assert (info.value.kind, info.value.message) == ("RemoteProtocolError", "no handler for wire.ping")
        with pytest.raises(LocalProtocolError):
            await a.call(ECHO, {"n": -1})
        assert (await a.call(ECHO, {"n": 5}))[0] == {"n": 5}


async def test_control_messages_overtake_a_bulk_transfer(autojump_clock):
    config = ConnectionConfig(limits=RpcLimits(chunk_bytes=512))
    order = []
    async with connected(config) as (a, b):

        async def bulk():
            await a.call(ECHO, {"n": 1}, [bytes(1 << 20)])
            order.append("bulk")

        async def small():
            await trio.sleep(0)
            await a.call(PING, {"nonce": 3})
            order.append("ping")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(bulk)
            nursery.start_soon(small)
    assert order == ["ping", "bulk"]


async def test_inbound_requests_are_bounded(autojump_clock):
    config = ConnectionConfig(limits=RpcLimits(max_inbound=2))
    outcomes = []
    async with connected(config) as (a, b):

        async def one(i):
            try:
                await a.call(ECHO, {"n": i, "sleep": 5})
                outcomes.append("ok")
            except RemoteError as exc:
                outcomes.append(exc.kind)

        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(one, i)
    assert sorted(outcomes) == ["Overloaded"] * 3 + ["ok"] * 2
    assert trio.current_time() == 5.0


async def test_outbound_calls_wait_for_a_slot(autojump_clock):
    config = ConnectionConfig(limits=RpcLimits(max_calls=2))
    done = []
    async with connected(config) as (a, b):

        async def one(i):
            await a.call(ECHO, {"n": i, "sleep": 4})
            done.append((i, trio.current_time()))

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(one, i)
    assert sorted(t for _, t in done) == [4.0, 4.0, 8.0]


async def test_goaway_finishes_calls_then_closes_both_sides(autojump_clock):
    async with connected() as (a, b):
        got = []

        async def slow_call():
            got.append(await a.call(ECHO, {"n": 9, "sleep": 2}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_call)
            await trio.sleep(1)
            b.start_drain()
            await trio.sleep(0.001)
            assert not a.usable and not b.usable
            with pytest.raises(ConnectionClosing):
                await a.call(PING, {"nonce": 1})
        assert got == [({"n": 9}, [])]
        await a.wait_closed()
        await b.wait_closed()
        assert trio.current_time() == pytest.approx(2.0)
        assert a.ending_reason == "closed after GOAWAY"


async def _raw_peer(config=ConnectionConfig()):
    """A Connection on one end, the raw stream (for hand-written bytes) on the other."""
    sa, raw = trio.testing.memory_stream_pair()
    return Connection(sa, peer_id=B, handlers=HANDLERS, stats=TrafficStats(), config=config), raw


def _frame(kind, obj):
    payload = msgpack.packb(obj)
    return struct.pack("!IB", len(payload) + 1, kind) + payload


async def test_invalid_answer_fails_that_call_and_drops_the_connection(autojump_clock):
    conn, raw = await _raw_peer()
    outcomes = {}

    async def call(n):
        try:
            await conn.call(ECHO, {"n": n})
        except Exception as exc:
            outcomes[n] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        nursery.start_soon(call, 1)
        await trio.sleep(0.01)
        nursery.start_soon(call, 2)
        await trio.sleep(0.01)
        await raw.receive_some()  # both requests
        await raw.send_all(_frame(wire.RESPONSE, {"id": 1, "body": {"n": "one"}, "bufs": []}))
    assert type(outcomes[1]) is RemoteProtocolError and "expected int, got str" in str(outcomes[1])
    assert type(outcomes[2]) is PeerUnreachable
    assert conn.stats.protocol_errors == 1 and conn.closed
    assert await raw.receive_some() == b""  # the socket is closed


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00\x00\x02\x63x",  # unknown kind 99
        b"\xff\xff\xff\xff\x01",  # 4 GiB announced
        _frame(wire.REQUEST, {"id": 1, "type": "wire.ping", "v": 1, "body": {"nonce": 1}, "bufs": [], "x": 0}),
        _frame(wire.REQUEST, {"id": 1, "type": "wire.nope", "v": 1, "body": {}, "bufs": []}),
        _frame(wire.REQUEST, {"id": 1, "type": "wire.ping", "v": 1, "body": {"nonce": "1"}, "bufs": []}),
        _frame(wire.REQUEST, {"id": 1, "type": "wire.ping", "v": 1, "body": {"nonce": 1}, "bufs": [1 << 30]}),
    ],
)
async def test_garbage_drops_the_connection(autojump_clock, garbage):
    conn, raw = await _raw_peer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        await raw.send_all(garbage)
        await conn.wait_closed()
    assert conn.stats.protocol_errors == 1
    assert conn.ending_reason.startswith("dropped: the peer broke the protocol")
    with pytest.raises(ConnectionClosing):
        await conn.call(PING, {"nonce": 1})


async def test_invalid_request_is_answered_before_the_drop(autojump_clock):
    conn, raw = await _raw_peer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        await raw.send_all(_frame(wire.REQUEST, {"id": 7, "type": "wire.ping", "v": 1, "body": {}, "bufs": []}))
        await conn.wait_closed()
    data = b""
    while chunk := await raw.receive_some():
        data += chunk
    assert msgpack.unpackb(data[5:]) == {
        "id": 7, "kind": "RemoteProtocolError", "message": "wire.ping request: missing field 'nonce'"}


async def test_peer_closing_fails_calls_in_flight(autojump_clock):
    conn, raw = await _raw_peer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)

        async def close_later():
            await trio.sleep(1)
            await raw.aclose()

        nursery.start_soon(close_later)
        with pytest.raises(PeerUnreachable, match="closed by the peer"):
            await conn.call(PING, {"nonce": 1})
    assert trio.current_time() == 1.0 and conn.closed


async def test_a_peer_that_stops_reading_is_dropped(autojump_clock):
    sa, sb = trio.testing.lockstep_stream_pair()  # a write blocks until the other side reads
    config = ConnectionConfig(stall_timeout=7)
    conn = Connection(sa, peer_id=B, handlers=HANDLERS, config=config)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        with pytest.raises(PeerUnreachable, match="stalled: the peer read nothing for 7s"):
            await conn.call(ECHO, {"n": 1}, [bytes(1 << 20)])
        assert trio.current_time() == 7.0
    await sb.aclose()


def test_config_is_checked():
    with pytest.raises(ValueError, match="receive_bytes"):
        ConnectionConfig(receive_bytes=0)
    with pytest.raises(ValueError, match="flush_timeout"):
        ConnectionConfig(flush_timeout=0)
