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
