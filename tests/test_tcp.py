"""TcpTransport over loopback: reuse, simultaneous dial, IPv6, errors, drops, limits, close.

These use real sockets, so they run on the real clock (autojump would race the kernel) with
short deadlines. `test_conformance_*` runs one scenario through both transports.
"""

import logging
import socket
import struct
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial

import msgpack
import pytest
import trio

from gossip import messages
from gossip import rpc_wire as wire
from gossip.channel import open_secure_channel
from gossip.errors import (
    AuthenticationError,
    LocalProtocolError,
    PeerTimeout,
    PeerUnreachable,
    RemoteError,
    RemoteProtocolError,
)
from gossip.identity import Identity, SwarmKey
from gossip.messages import Bytes, Int, Map
from gossip.sim import LinkSpec, SimNetwork
from gossip.tcp import TcpConfig, format_address, keep_new_connection, open_tcp_transport, parse_address
from gossip.transport import Response

SWARM = SwarmKey.open("test-tcp")
WORK = messages.define(
    "test.tcp_work",
    1,
    Map({"n": Int(0, 1 << 30), "sleep": Int(0, 10_000)}, optional=frozenset({"sleep"})),
    Map({"n": Int(0, 1 << 30), "who": Bytes(max_len=32)}),
    max_request_buffers=2,
    max_response_buffers=2,
    max_buffer_bytes=64 << 20,
)


async def work(req):
    if req.body.get("sleep"):
        await trio.sleep(req.body["sleep"] / 1000)
    n = req.body["n"]
    if n == 13:
        raise ValueError("unlucky")
    if n == 14:
        return Response({"n": "fourteen", "who": b""})  # breaks the response schema
    return Response({"n": n, "who": req.peer_id}, [bytes(b)[::-1] for b in req.buffers])


def ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@asynccontextmanager
async def transports(n, listen=("127.0.0.1:0",), **kw):
    async with AsyncExitStack() as stack:
        out = []
        for _ in range(n):
            t = await stack.enter_async_context(open_tcp_transport(Identity.generate(), SWARM, listen, **kw))
            t.route(WORK.name, work)
            out.append(t)
        yield out


async def free_port_address() -> str:
    """An address where nothing listens (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


# -- plain functions ------------------------------------------------------------------------------


def test_parse_address():
    assert parse_address("127.0.0.1:7000") == ("127.0.0.1", 7000)
    assert parse_address("[::1]:0") == ("::1", 0)
    assert parse_address("localhost:65535") == ("localhost", 65535)
    assert parse_address("node-3.example.org:9") == ("node-3.example.org", 9)
    assert format_address("::1", 80) == "[::1]:80" and format_address("10.0.0.1", 80) == "10.0.0.1:80"
    for bad, why in [
        ("127.0.0.1", "no port"),
        ("::1:80", "brackets"),
        ("[::1]80", "':port' after ']'"),
        ("[::1:80", "missing ']'"),
        ("[zz]:80", "not an IPv6"),
        ("host:http", "not a number"),
        ("host:70000", "above 65535"),
        (":80", "not an IPv4 address or host name"),
        ("a b:80", "not an IPv4 address or host name"),
        ("host:-1", "not a number"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_address(bad)


def test_keep_new_connection_is_the_same_answer_on_both_ends():
    lo, hi = b"\x01" * 32, b"\x02" * 32
    # Simultaneous dial: each end sees its own dial first, then the peer's; both keep lo's dial.
    assert keep_new_connection(lo, hi, True, b"x", False, b"y") is False  # at lo: keep its own dial
    assert keep_new_connection(hi, lo, True, b"y", False, b"x") is True  # at hi: switch to lo's dial
    # Same dialer twice: the smaller handshake hash wins at both ends.
    assert keep_new_connection(lo, hi, True, b"\x09", True, b"\x05") is True
    assert keep_new_connection(hi, lo, False, b"\x09", False, b"\x05") is True
    assert keep_new_connection(hi, lo, False, b"\x05", False, b"\x09") is False


async def test_errors_leave_the_block_unwrapped():
    with pytest.raises(PeerUnreachable, match="refused"):
        async with open_tcp_transport(Identity.generate(), SWARM) as t:
            await t.call(await free_port_address(), messages.PING.name, {"nonce": 1}, timeout=5)
    async with open_tcp_transport(Identity.generate(), SWARM) as t:
        with pytest.raises(OSError, match="cannot listen on"):
            async with open_tcp_transport(Identity.generate(), SWARM, [t.addresses[0]]):
                pass  # the port is taken


def test_config_is_checked():
    with pytest.raises(ValueError, match="max_connections"):
        TcpConfig(max_connections=0)
    with pytest.raises(ValueError, match="dial_timeout"):
        TcpConfig(dial_timeout=0)


# -- calls, reuse, addresses ---------------------------------------------------------------------------


async def test_calls_reuse_one_connection_and_count_socket_bytes():
    async with transports(2) as (a, b):
        reply = await a.call(b.addresses[0], WORK.name, {"n": 5}, [b"abc", b"x" * 300_000], timeout=10)
        assert reply.peer_id == b.peer_id
        assert reply.body == {"n": 5, "who": a.peer_id}
        assert [bytes(x) for x in reply.buffers] == [b"cba", b"x" * 300_000]
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(partial(a.call, b.addresses[0], WORK.name, {"n": 100 + i, "sleep": 20}, timeout=5))
        # ...all of them on the one connection, and b answers a's calls back on it too.
        assert (await b.call(a.addresses[0], messages.PING.name, {"nonce": 3}, timeout=5)).body == {"nonce": 3}
        assert len(a.connections) == 1 and len(b.connections) == 1
        assert a.connections[0].initiator and not b.connections[0].initiator
    # Counted below the encryption: every byte one sent, the other received.
    assert a.stats.bytes_sent == b.stats.bytes_received > 300_000
    assert b.stats.bytes_sent == a.stats.bytes_received > 300_000
    # Socket bytes exceed the RPC bytes by the handshake and the AEAD framing.
    assert a.stats.bytes_sent > sum(a.stats.by_method.values()) > 300_000
    assert a.stats.messages_sent == 22 and b.stats.messages_received == 22


async def test_concurrent_first_calls_share_one_dial():
    async with transports(2) as (a, b):
        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(partial(a.call, b.addresses[0], messages.PING.name, {"nonce": i}, timeout=5))
        assert len(a.connections) == 1 and len(b.connections) == 1


async def test_peer_id_finds_the_connection_whatever_the_address():
    listen = ["127.0.0.1:0", "[::1]:0"] if ipv6_loopback() else ["127.0.0.1:0", "localhost:0"]
    async with transports(1) as (a,), transports(1, listen=listen) as (b,):
        assert len(b.addresses) == 2 and all(parse_address(x)[1] > 0 for x in b.addresses)
        await a.call(b.addresses[0], messages.PING.name, {"nonce": 1}, timeout=5)
        await a.call(b.addresses[1], messages.PING.name, {"nonce": 2}, timeout=5, peer_id=b.peer_id)
        assert len(a.connections) == 1
        with pytest.raises(AuthenticationError, match="not"):
            await a.call(b.addresses[1], messages.PING.name, {"nonce": 3}, timeout=5, peer_id=a.peer_id)


@pytest.mark.skipif(not ipv6_loopback(), reason="this kernel has no IPv6 loopback")
async def test_ipv6_loopback():
    async with transports(2, listen=["[::1]:0"]) as (a, b):
        assert b.addresses[0].startswith("[::1]:")
        reply = await a.call(b.addresses[0], WORK.name, {"n": 6}, [b"v6"], timeout=5)
        assert bytes(reply.buffers[0]) == b"6v"
        assert b.connections[0].address == a.addresses[0]  # what a announced in its hello


async def test_hostname_addresses():
    async with transports(2, listen=["localhost:0"]) as (a, b):
        port = parse_address(b.addresses[0])[1]
        reply = await a.call(f"localhost:{port}", messages.PING.name, {"nonce": 9}, timeout=5)
        assert reply.body == {"nonce": 9}


async def test_bad_announcements_are_refused_at_open():
    with pytest.raises(ValueError, match="port 1..65535"):
        async with open_tcp_transport(Identity.generate(), SWARM, announce=["example.org"]):
            pass


async def test_announce_overrides_the_advertised_addresses():
    async with transports(1, announce=["203.0.113.5:7000"]) as (a,), transports(1) as (b,):
        assert a.addresses == ("203.0.113.5:7000",)
        await a.call(b.addresses[0], messages.PING.name, {"nonce": 1}, timeout=5)
        assert b.connections[0].address == "203.0.113.5:7000"


# -- errors, as the caller sees them ---------------------------------------------------------------------


async def test_dial_errors_are_typed():
    async with transports(1) as (a,):
        with pytest.raises(PeerUnreachable, match="refused"):
            await a.call(await free_port_address(), messages.PING.name, {"nonce": 1}, timeout=5)
        with pytest.raises(PeerUnreachable):
            await a.call("nonexistent.invalid:7000", messages.PING.name, {"nonce": 1}, timeout=5)
        with pytest.raises(PeerUnreachable, match="no port"):
            await a.call("garbage", messages.PING.name, {"nonce": 1}, timeout=5)
        with pytest.raises(PeerUnreachable, match="this node itself"):
            await a.call(a.addresses[0], messages.PING.name, {"nonce": 1}, timeout=5)
        assert a.stats.calls_failed == 4


async def test_dial_timeout_when_the_peer_never_answers_the_handshake():
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    address = format_address("127.0.0.1", listeners[0].socket.getsockname()[1])
    async with transports(1, dial_timeout=0.3) as (a,):
        t0 = trio.current_time()
        with pytest.raises(PeerTimeout, match="no connection within 0.3s"):
            await a.call(address, messages.PING.name, {"nonce": 1}, timeout=5)
        assert 0.3 <= trio.current_time() - t0 < 2
        # The call's own deadline wins when it is shorter.
        with pytest.raises(PeerTimeout, match="no reply within 0.1s"):
            await a.call(address, messages.PING.name, {"nonce": 1}, timeout=0.1)
    for listener in listeners:
        await listener.aclose()


async def test_wrong_swarm_is_refused_and_counted():
    async with transports(1) as (a,):
        async with open_tcp_transport(Identity.generate(), SwarmKey.open("other swarm")) as stranger:
            with pytest.raises(AuthenticationError, match="swarm id mismatch"):
                await stranger.call(a.addresses[0], messages.PING.name, {"nonce": 1}, timeout=5)
        forged = SwarmKey(swarm_id=SWARM.swarm_id, psk=bytes(32))  # the right id, the wrong secret
        async with open_tcp_transport(Identity.generate(), forged) as stranger:
            with pytest.raises(AuthenticationError, match="PSK mismatch"):
                await stranger.call(a.addresses[0], messages.PING.name, {"nonce": 1}, timeout=5)
            assert stranger.stats.calls_failed == 1
        assert a.stats.protocol_errors == 1 and not a.connections


async def test_remote_errors_timeouts_and_cancelled_handlers():
    cancelled = []

    async def slow(req):
        try:
            await trio.sleep(5)
        except trio.Cancelled:
            cancelled.append(True)
            raise
        return Response({"nonce": 0})

    async with transports(2) as (a, b):
        with pytest.raises(RemoteError) as info:
            await a.call(b.addresses[0], WORK.name, {"n": 13}, timeout=5)
        assert (info.value.kind, info.value.message) == ("ValueError", "unlucky")
        with pytest.raises(RemoteError) as info:
            await a.call(b.addresses[0], WORK.name, {"n": 14}, timeout=5)
        assert info.value.kind == "LocalProtocolError"
        with pytest.raises(LocalProtocolError):
            await a.call(b.addresses[0], WORK.name, {"n": -1}, timeout=5)
        with pytest.raises(RemoteProtocolError, match="unknown message type"):
            await a.call(b.addresses[0], "test.nope", {}, timeout=5)
        b.route(messages.PING.name, slow)
        with pytest.raises(PeerTimeout):
            await a.call(b.addresses[0], messages.PING.name, {"nonce": 1}, timeout=0.2)
        with trio.fail_after(2):
            while not cancelled:  # the CANCEL reaches b and stops its handler
                await trio.sleep(0.01)
        assert a.stats.calls_failed == 1 and len(a.connections) == 1


# -- hostile peers: dropped, and the transport keeps serving others ------------------------------------


def _frame(kind, obj) -> bytes:
    payload = msgpack.packb(obj)
    return struct.pack("!IB", len(payload) + 1, kind) + payload


def _request(**fields) -> bytes:
    env = {"id": 1, "type": "wire.ping", "v": 1, "body": {"nonce": 1}, "bufs": []}
    env.update(fields)
    return _frame(wire.REQUEST, env)


@pytest.mark.parametrize(
    "garbage, answered",
    [
        (_request(type="test.unknown_type"), True),
        (_request(body={"nonce": 1, "extra": 2}), True),  # unknown field
        (_request(body={"nonce": "1"}), True),  # wrong type
        (_request(bufs=[1 << 40]), False),  # oversized: refused by the envelope bound
        (struct.pack("!IB", 1 << 30, wire.REQUEST), False),  # oversized length prefix
        (b"\x00\x00\x00\x02\x99\x00", False),  # unknown message kind
    ],
)
async def test_bad_message_drops_that_peer_only(garbage, answered, caplog):
    caplog.set_level(logging.WARNING, logger="murmur.gossip.connection")
    async with transports(2) as (a, b):
        host, port = parse_address(a.addresses[0])
        tcp = await trio.open_tcp_stream(host, port)
        evil = await open_secure_channel(tcp, identity=Identity.generate(), swarm=SWARM, initiator=True)
        await evil.send_all(garbage)
        received = b""
        with trio.fail_after(5):
            try:
                while data := await evil.receive_some():
                    received += data
            except trio.BrokenResourceError:
                pass
        if answered:  # the offending request got an error answer before the drop
            reply = msgpack.unpackb(received[5:])
            assert reply["id"] == 1 and reply["kind"] == "RemoteProtocolError"
        assert a.stats.protocol_errors == 1
        assert "dropping connection to" in caplog.text
        # Others are still served, and a can still call out.
        assert (await b.call(a.addresses[0], WORK.name, {"n": 2}, timeout=5)).body["n"] == 2
        assert (await a.call(b.addresses[0], WORK.name, {"n": 3}, timeout=5)).body["n"] == 3
        await evil.aclose()


async def test_invalid_response_is_a_remote_protocol_error_for_the_caller():
    async with transports(1) as (a,):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        address = format_address("127.0.0.1", listeners[0].socket.getsockname()[1])

        async def evil_server(task_status=trio.TASK_STATUS_IGNORED):
            task_status.started()
            tcp = await listeners[0].accept()
            s = await open_secure_channel(tcp, identity=Identity.generate(), swarm=SWARM, initiator=False)
            await s.receive_some()
            await s.send_all(_frame(wire.RESPONSE, {"id": 1, "body": {"nonce": -5}, "bufs": []}))
            await trio.sleep(0.2)
            await s.aclose()

        async with trio.open_nursery() as nursery:
            await nursery.start(evil_server)
            with pytest.raises(RemoteProtocolError, match="outside"):
                await a.call(address, messages.PING.name, {"nonce": 1}, timeout=5)
        assert a.stats.protocol_errors == 1 and a.stats.calls_failed == 1
        for listener in listeners:
            await listener.aclose()


# -- simultaneous dial, limits, close --------------------------------------------------------------------


async def test_simultaneous_dial_keeps_the_smaller_ids_connection():
    async with transports(2) as (a, b):
        lo, hi = sorted([a, b], key=lambda t: t.peer_id)
        # Force the race: both ends dial each other at once, bypassing connection reuse.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a._open, b.addresses[0])
            nursery.start_soon(b._open, a.addresses[0])
        for t in (a, b):
            other = b if t is a else a
            kept = t.connection_to(other.peer_id)
            assert kept is not None and kept.initiator == (t is lo)  # dialed by the smaller id
        # Calls both ways use the kept connection; the other winds down and closes.
        assert (await lo.call(hi.addresses[0], WORK.name, {"n": 1}, timeout=5)).body["n"] == 1
        assert (await hi.call(lo.addresses[0], WORK.name, {"n": 2}, timeout=5, peer_id=lo.peer_id)).body["n"] == 2
        with trio.fail_after(5):
            while len(a.connections) + len(b.connections) > 2:
                await trio.sleep(0.01)
        assert a.connections[0].initiator != b.connections[0].initiator


async def test_calls_in_flight_survive_losing_a_simultaneous_dial():
    async with transports(2) as (a, b):
        lo, hi = sorted([a, b], key=lambda t: t.peer_id)
        await hi.call(lo.addresses[0], messages.PING.name, {"nonce": 0}, timeout=5)  # hi's dial: the loser
        async with trio.open_nursery() as nursery:
            results = []

            async def slow_call():
                results.append(await hi.call(lo.addresses[0], WORK.name, {"n": 7, "sleep": 300}, timeout=5))

            nursery.start_soon(slow_call)
            await trio.sleep(0.05)
            await lo._open(hi.addresses[0])  # lo dials too: both switch to it, GOAWAY on the old
        assert results[0].body["n"] == 7
        with trio.fail_after(5):
            while len(hi.connections) > 1:
                await trio.sleep(0.01)
        assert not hi.connections[0].initiator


async def test_connection_limit_closes_idle_ones_then_refuses():
    async with transports(1, max_connections=1) as (hub,), transports(2) as (p, q):
        await p.call(hub.addresses[0], messages.PING.name, {"nonce": 1}, timeout=5)
        await q.call(hub.addresses[0], messages.PING.name, {"nonce": 2}, timeout=5)  # p's idle one goes
        with trio.fail_after(5):
            while len(p.connections):
                await trio.sleep(0.01)
        assert len(hub.connections) == 1 and hub.connections[0].peer_id == q.peer_id
        # Now hub's only connection is busy: a third peer is turned away, a hub dial refused.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(q.call, hub.addresses[0], WORK.name, {"n": 1, "sleep": 500}, timeout=5))
            await trio.sleep(0.1)
            with pytest.raises(PeerUnreachable):
                await p.call(hub.addresses[0], messages.PING.name, {"nonce": 3}, timeout=5)
            with pytest.raises(PeerUnreachable, match="1 connections open, none idle"):
                await hub.call(p.addresses[0], messages.PING.name, {"nonce": 4}, timeout=5)


async def test_aclose_lets_calls_in_flight_finish():
    async def slow_ping(req):
        await trio.sleep(0.3)
        return Response({"nonce": req.body["nonce"]})

    async with transports(2) as (a, b):
        a.route(messages.PING.name, slow_ping)
        got = []

        async def slow_call():
            got.append(await b.call(a.addresses[0], messages.PING.name, {"nonce": 8}, timeout=5))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_call)
            await trio.sleep(0.1)
            t0 = trio.current_time()
            await a.aclose()  # graceful: GOAWAY, the call in flight finishes, then close
            assert 0.1 < trio.current_time() - t0 < 2
        assert got[0].body == {"nonce": 8}
        assert not a.connections
        with trio.fail_after(5):
            while b.connections:  # b saw the GOAWAY and the close too
                await trio.sleep(0.01)
        with pytest.raises(PeerUnreachable, match="refused"):
            await b.call(a.addresses[0], messages.PING.name, {"nonce": 9}, timeout=5)
        with pytest.raises(PeerUnreachable, match="closed"):
            await a.call(b.addresses[0], messages.PING.name, {"nonce": 9}, timeout=5)


# -- one conformance scenario, both transports --------------------------------------------------------------


async def conformance(a, b, dead_address):
    """What every Transport must do the same way, from the caller's point of view."""
    assert (await a.call(b.addresses[0], messages.PING.name, {"nonce": 42}, timeout=5)).body == {"nonce": 42}
    reply = await a.call(b.addresses[0], WORK.name, {"n": 1}, [b"hello"], timeout=5, peer_id=b.peer_id)
    assert (reply.peer_id, reply.body, bytes(reply.buffers[0])) == (b.peer_id, {"n": 1, "who": a.peer_id}, b"olleh")
    with pytest.raises(RemoteError) as info:
        await a.call(b.addresses[0], WORK.name, {"n": 13}, timeout=5)
    assert (info.value.kind, info.value.message) == ("ValueError", "unlucky")
    with pytest.raises(RemoteError) as info:
        await a.call(b.addresses[0], WORK.name, {"n": 14}, timeout=5)
    assert info.value.kind == "LocalProtocolError"
    with pytest.raises(LocalProtocolError):
        await a.call(b.addresses[0], WORK.name, {"n": "x"}, timeout=5)
    with pytest.raises(RemoteProtocolError):
        await a.call(b.addresses[0], "test.nope", {}, timeout=5)
    with pytest.raises(PeerTimeout):
        await a.call(b.addresses[0], WORK.name, {"n": 1, "sleep": 2000}, timeout=0.2)
    with pytest.raises(PeerUnreachable):
        await a.call(dead_address, messages.PING.name, {"nonce": 1}, timeout=5)
    with pytest.raises(AuthenticationError):
        await a.call(b.addresses[0], messages.PING.name, {"nonce": 1}, timeout=5, peer_id=b"\x00" * 32)
    assert a.stats.calls_failed == 3


async def test_conformance_tcp():
    async with transports(2) as (a, b):
        await conformance(a, b, await free_port_address())


async def test_conformance_sim():
    net = SimNetwork(default_link=LinkSpec(latency=0.001))
    async with trio.open_nursery() as nursery:
        a, b = net.add_host(b"\x01" * 32), net.add_host(b"\x02" * 32)
        for h in (a, b):
            h.route(WORK.name, work)
            nursery.start_soon(h.run)
        await trio.sleep(0)
        await conformance(a, b, "sim:99")
        nursery.cancel_scope.cancel()
