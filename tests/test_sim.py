"""SimNetwork: timing from latency and bandwidth, loss, partitions, kill and restart, schemas."""

import math

import pytest
import trio

from gossip import messages
from gossip.errors import PeerTimeout, PeerUnreachable, RemoteError
from gossip.messages import Bytes, Int, Map
from gossip.sim import FRAME_OVERHEAD, LinkSpec, SimNetwork
from gossip.transport import Response

ECHO = messages.define(
    "test.echo",
    1,
    Map({"n": Int(0, 1000)}),
    Map({"n": Int(0, 1000), "pad": Bytes(max_len=1 << 20)}),
    max_request_buffers=1,
    max_response_buffers=1,
    max_buffer_bytes=1 << 24,
)


async def echo(req):
    if req.body["n"] == 13:
        raise ValueError("unlucky")
    return Response({"n": req.body["n"], "pad": b""}, list(req.buffers))


async def start(nursery, net, n):
    hosts = []
    for i in range(n):
        h = net.add_host(bytes([i]) * 32)
        h.route("test.echo", echo)
        nursery.start_soon(h.run)
        hosts.append(h)
    await trio.sleep(0)
    return hosts


async def test_round_trip_time_is_latency_plus_serialisation(autojump_clock):
    net = SimNetwork(seed=1, default_link=LinkSpec(latency=0.05, bandwidth=1e6))
    async with trio.open_nursery() as nursery:
        a, b = await start(nursery, net, 2)
        t0 = trio.current_time()
        reply = await a.call(b.address, "test.echo", {"n": 7}, [b"x" * 100_000], timeout=5)
        elapsed = trio.current_time() - t0
        assert reply.body == {"n": 7, "pad": b""}
        assert bytes(reply.buffers[0]) == b"x" * 100_000
        assert reply.peer_id == b.peer_id
        # Both directions carry the 100 kB buffer: 2 x (latency + size / bandwidth).
        req_size = a.stats.bytes_sent
        resp_size = a.stats.bytes_received
        assert req_size > 100_000 and resp_size > 100_000
        assert elapsed == pytest.approx(0.1 + (req_size + resp_size) / 1e6)
        assert b.stats.bytes_received == req_size and b.stats.bytes_sent == resp_size
        nursery.cancel_scope.cancel()


async def test_messages_queue_behind_each_other_on_a_link(autojump_clock):
    net = SimNetwork(seed=1, default_link=LinkSpec(latency=0.0, bandwidth=1e6))
    async with trio.open_nursery() as nursery:
        a, b = await start(nursery, net, 2)
        finished = []

        async def one(i):
            await a.call(b.address, "test.echo", {"n": i}, [b"y" * 500_000], timeout=50)
            finished.append(trio.current_time())

        async with trio.open_nursery() as inner:
            inner.start_soon(one, 1)
            inner.start_soon(one, 2)
        # The second request waits for the first to leave the link, so it finishes later.
        assert finished[1] - finished[0] == pytest.approx(0.5, rel=0.01)
        nursery.cancel_scope.cancel()


async def test_handler_error_is_a_remote_error(autojump_clock):
    net = SimNetwork()
    async with trio.open_nursery() as nursery:
        a, b = await start(nursery, net, 2)
        with pytest.raises(RemoteError) as info:
            await a.call(b.address, "test.echo", {"n": 13}, timeout=1)
        assert info.value.kind == "ValueError" and info.value.message == "unlucky"
        nursery.cancel_scope.cancel()


async def test_kill_partition_loss_and_restart(autojump_clock):
    net = SimNetwork(seed=3, default_link=LinkSpec(latency=0.01))
    async with trio.open_nursery() as nursery:
        a, b, c = await start(nursery, net, 3)
        net.partition([a.address], [b.address, c.address])
        t0 = trio.current_time()
        with pytest.raises(PeerTimeout):
            await a.call(b.address, "test.echo", {"n": 1}, timeout=2)
        assert trio.current_time() - t0 == pytest.approx(2.0)
        assert (await b.call(c.address, "test.echo", {"n": 2}, timeout=2)).body["n"] == 2
        net.heal()
        assert (await a.call(b.address, "test.echo", {"n": 3}, timeout=2)).body["n"] == 3

        net.kill(c.address)
        await trio.sleep(0)
        with pytest.raises(PeerUnreachable):
            await a.call(c.address, "test.echo", {"n": 4}, timeout=2)
        c2 = net.add_host(c.peer_id, c.address)
        c2.route("test.echo", echo)
        nursery.start_soon(c2.run)
        await trio.sleep(0)
        assert (await a.call(c.address, "test.echo", {"n": 5}, timeout=2)).body["n"] == 5

        net.set_link(a.address, b.address, LinkSpec(latency=0.01, loss=1.0))
        with pytest.raises(PeerTimeout):
            await a.call(b.address, "test.echo", {"n": 6}, timeout=1)
        assert a.stats.calls_failed == 3
        nursery.cancel_scope.cancel()


async def test_killed_mid_handler_means_timeout(autojump_clock):
    net = SimNetwork()
    slow = messages.define("test.slow", 1, Map({}), Map({}))

    async def handler(req):
        await trio.sleep(10)
        return Response({})

    async with trio.open_nursery() as nursery:
        a, b = await start(nursery, net, 2)
        b.route("test.slow", handler)
        nursery.start_soon(_kill_later, net, b.address)
        with pytest.raises(PeerTimeout):
            await a.call(b.address, slow.name, {}, timeout=3)
        assert trio.current_time() == pytest.approx(3.0)
        nursery.cancel_scope.cancel()


async def _kill_later(net, address):
    await trio.sleep(1)
    net.kill(address)


async def test_invalid_request_is_refused_by_schema(autojump_clock):
    net = SimNetwork()
    async with trio.open_nursery() as nursery:
        a, b = await start(nursery, net, 2)
        # Our own side refuses to send what breaks the schema...
        with pytest.raises(messages.LocalProtocolError):
            await a.call(b.address, "test.echo", {"n": "seven"}, timeout=1)
        # ...and an unknown type is refused before anything is sent.
        with pytest.raises(messages.RemoteProtocolError):
            await a.call(b.address, "test.nope", {}, timeout=1)
        assert a.stats.messages_sent == 0
        nursery.cancel_scope.cancel()


def test_link_spec_rejects_nonsense():
    with pytest.raises(ValueError):
        LinkSpec(bandwidth=0)
    with pytest.raises(ValueError):
        LinkSpec(loss=1.5)
    assert math.isinf(LinkSpec(bandwidth=math.inf).bandwidth)
    assert FRAME_OVERHEAD > 0


async def test_idle_links_are_forgotten(autojump_clock):
    net = SimNetwork(default_link=LinkSpec(latency=0.001, bandwidth=1e9))
    async with trio.open_nursery() as nursery:
        hosts = await start(nursery, net, 50)
        for a in hosts:
            for b in hosts:
                if a is not b:
                    await a.call(b.address, "test.echo", {"n": 1}, timeout=1)
        # 50 * 49 * 2 directed links were used, one at a time; only the recent ones are kept.
        assert len(net._links) < 1024 + 2
        nursery.cancel_scope.cancel()
