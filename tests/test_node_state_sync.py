"""Late-joiner state sync: the pure download core, the chunk store, and fetches over SimNetwork."""

import hashlib

import pytest
import torch
import trio

from gossip.sim import LinkSpec, SimNetwork
from gossip.transport import Response
from node.checkpoint import deserialize, model_hash, serialize
from node.lm_task import LMConfig, build_model
from node.state_sync import (
    CHUNK,
    ChunkStore,
    Download,
    Manifest,
    Offer,
    StateSyncError,
    choose_offer,
    make_manifest,
    pick_chunk_size,
)
from node.state_transfer import StateServer, fetch_state
from gossip.errors import RemoteProtocolError

TINY = LMConfig(context=16, d_model=16, n_layer=1, n_head=2)


def snapshot_bytes(seed: int, step: int) -> tuple[bytes, str]:
    model = build_model(TINY, seed)
    return serialize({"model": model.state_dict(), "counters": {"step": step}}, {"step": step}), model_hash(model)


# -- pure parts --------------------------------------------------------------------------------


def test_manifest_chunks_and_hashes():
    data = bytes(range(256)) * 10  # 2560 bytes
    m = make_manifest(data, step=7, chunk_size=1024)
    assert m.size == 2560 and m.chunk_size == 1024 and len(m.chunks) == 3
    assert m.chunks[2] == hashlib.sha256(data[2048:]).digest()
    assert m.snapshot == hashlib.sha256(data).digest()
    assert [m.chunk_len(i) for i in range(3)] == [1024, 1024, 512]
    assert Manifest.from_body(m.to_body()) == m
    assert Manifest.from_json(m.to_json()) == m
    with pytest.raises(RemoteProtocolError, match="lists 2 chunks"):
        Manifest(m.snapshot, 7, 2560, 1024, m.chunks[:2])


def test_chunk_size_grows_to_bound_the_chunk_count():
    assert pick_chunk_size(10, 1 << 20) == 1 << 20
    assert pick_chunk_size(8192 * 1024, 1024) == 1024
    assert pick_chunk_size(8192 * 1024 + 1, 1024) == 2048
    with pytest.raises(ValueError, match="too large"):
        pick_chunk_size(8192 * (16 << 20) + 1)


def _m(tag: int, step: int) -> Manifest:
    return Manifest(bytes([tag]) * 32, step, 0, 1024, ())


def test_choose_offer_prefers_trained_then_popular_then_held():
    a, b, c = _m(1, 100), _m(2, 100), _m(3, 50)
    offers = [Offer(b"p1", "x", a), Offer(b"p2", "x", b), Offer(b"p3", "x", b), Offer(b"p4", "x", c)]
    assert choose_offer(offers) == b  # same step: two sources beat one
    assert choose_offer([Offer(b"p4", "x", c), Offer(b"p1", "x", a)]) == a  # most trained wins
    assert choose_offer([Offer(b"p1", "x", _m(1, 0)), Offer(b"p2", "x", _m(2, 0))]) is None  # fresh swarm
    assert choose_offer([]) is None
    # Equal step and sources: the one whose chunks we hold wins.
    d = Manifest(bytes([9]) * 32, 100, 1024, 1024, (b"h" * 32,))
    assert choose_offer([Offer(b"p1", "x", a), Offer(b"p2", "x", d)], held={b"h" * 32}) == d


def test_download_spreads_chunks_and_drops_bad_sources():
    data = bytes(5 * 1024)
    m = make_manifest(data, 1, 1024)
    dl = Download(m, per_source=1)
    dl.add_source(b"A", "a")
    dl.add_source(b"B", "b")
    assert dl.assign() == (0, b"A", "a")
    assert dl.assign() == (1, b"B", "b")
    assert dl.assign() is None  # both sources busy
    assert dl.received(0, b"A", data[:1024]) is True
    assert dl.received(1, b"B", b"\x01" * 1024) is False  # wrong hash: B is dropped at once
    assert dl.sources[b"B"].banned == "sent a bad chunk 1"
    assert dl.bad_chunks == 1
    assert dl.assign() == (1, b"A", "a")  # chunk 1 goes back to A
    dl.failed(1, b"A", "too slow")
    assert dl.sources[b"A"].banned is None and dl.sources[b"A"].strikes == 1
    assert dl.assign() == (1, b"A", "a")
    dl.failed(1, b"A", "too slow")  # second strike
    assert dl.sources[b"A"].banned == "too slow"
    assert dl.stalled and not dl.done and dl.missing() == [1, 2, 3, 4]


def test_download_refuses_short_chunk_and_completes():
    data = bytes(range(200)) * 11
    m = make_manifest(data, 1, 1024)
    dl = Download(m)
    dl.add_source(b"A", "a")
    i, p, _ = dl.assign()
    assert dl.received(i, p, data[:1000]) is False  # right prefix, wrong length
    dl2 = Download(m, have={0, 1})
    dl2.add_source(b"A", "a")
    assert dl2.assign() == (2, b"A", "a")
    assert dl2.received(2, b"A", data[2048:]) and dl2.done


def test_chunk_store_resumes_only_verified_chunks(tmp_path):
    data = hashlib.sha256(b"a").digest() * 96  # 3072 bytes = 3 chunks
    data = bytes(b ^ (i // 1024) for i, b in enumerate(data))  # chunks differ from each other
    m = make_manifest(data, 1, 1024)
    store = ChunkStore(tmp_path / "sync")
    assert store.adopt(m) == set()
    store.put(m.chunks[0], data[:1024])
    store.put(m.chunks[1], data[1024:2048])
    (tmp_path / "sync" / f"{m.chunks[1].hex()}.chunk").write_bytes(b"torn")  # damaged on disk
    (tmp_path / "sync" / "stray.chunk").write_bytes(b"x")
    again = ChunkStore(tmp_path / "sync")
    assert again.resume_manifest() == m
    assert again.adopt(m) == {0}  # the damaged one and the stray are deleted
    assert sorted(p.name for p in (tmp_path / "sync").iterdir()) == sorted(["manifest.json", f"{m.chunks[0].hex()}.chunk"])
    again.put(m.chunks[1], data[1024:2048])
    again.put(m.chunks[2], data[2048:])
    assert again.assemble(m) == data
    again.clear()
    assert not (tmp_path / "sync").exists()


# -- over the simulated network ----------------------------------------------------------------


class CorruptingServer(StateServer):
    """A donor that flips a byte in every chunk it serves after the first `good` ones."""

    def __init__(self, transport, good: int) -> None:
        super().__init__(transport)
        self.good = good
        transport.route(CHUNK.name, self._bad_chunk)

    async def _bad_chunk(self, req):
        resp = await self._on_chunk(req)
        if self.chunks_served <= self.good:
            return resp
        buf = bytearray(resp.buffers[0])
        buf[0] ^= 0xFF
        return Response(resp.body, [bytes(buf)])


async def _hosts(nursery, net, n):
    hosts = []
    for i in range(n):
        h = net.add_host(bytes([i + 1]) * 32)
        nursery.start_soon(h.run)
        hosts.append(h)
    await trio.sleep(0)
    return hosts


async def test_joiner_model_hash_equals_donor_after_sync(autojump_clock):
    data, donor_hash = snapshot_bytes(seed=3, step=40)
    net = SimNetwork(seed=0)
    async with trio.open_nursery() as nursery:
        donor, joiner = await _hosts(nursery, net, 2)
        server = StateServer(donor)
        server.publish(make_manifest(data, 40, 4096), data)
        result = await fetch_state(joiner, [(donor.peer_id, donor.address)], ChunkStore())
        nursery.cancel_scope.cancel()
    assert result.sources == (donor.peer_id,)
    assert result.chunks_fetched == len(result.manifest.chunks) > 3 and result.chunks_resumed == 0
    snap = deserialize(result.data)
    model = build_model(TINY, seed=99)
    model.load_state_dict(snap.state["model"])
    assert model_hash(model) == donor_hash
    assert snap.state["counters"] == {"step": 40}


async def test_fresh_swarm_needs_no_download(autojump_clock):
    data, _ = snapshot_bytes(seed=0, step=0)
    net = SimNetwork(seed=0)
    async with trio.open_nursery() as nursery:
        a, b = await _hosts(nursery, net, 2)
        StateServer(a).publish(make_manifest(data, 0, 4096), data)
        assert await fetch_state(b, [(a.peer_id, a.address)], ChunkStore()) is None
        nursery.cancel_scope.cancel()


async def test_bad_chunks_drop_the_liar_and_the_honest_peer_finishes(autojump_clock):
    data, _ = snapshot_bytes(seed=1, step=10)
    m = make_manifest(data, 10, 2048)
    net = SimNetwork(seed=0)
    async with trio.open_nursery() as nursery:
        liar, honest, joiner = await _hosts(nursery, net, 3)
        CorruptingServer(liar, good=1).publish(m, data)
        StateServer(honest).publish(m, data)
        result = await fetch_state(joiner, [(liar.peer_id, liar.address), (honest.peer_id, honest.address)], ChunkStore())
        nursery.cancel_scope.cancel()
    assert result.data == data
    assert [p for p, _ in result.dropped] == [liar.peer_id]
    assert result.dropped[0][1].startswith("sent a bad chunk")
    assert result.sources[0] == honest.peer_id


async def test_slow_donor_is_dropped_for_another_peer(autojump_clock):
    best, _ = snapshot_bytes(seed=1, step=500)
    other, other_hash = snapshot_bytes(seed=2, step=300)
    net = SimNetwork(seed=0)
    async with trio.open_nursery() as nursery:
        slow, fine, joiner = await _hosts(nursery, net, 3)
        # The most trained donor answers manifests quickly but pushes chunks at 1 KB/s.
        net.set_link(slow.address, joiner.address, LinkSpec(latency=0.01, bandwidth=1e3), both_ways=False)
        StateServer(slow).publish(make_manifest(best, 500, 4096), best)
        StateServer(fine).publish(make_manifest(other, 300, 4096), other)
        t0 = trio.current_time()
        result = await fetch_state(
            joiner, [(slow.peer_id, slow.address), (fine.peer_id, fine.address)], ChunkStore(), chunk_timeout=2.0
        )
        elapsed = trio.current_time() - t0
        nursery.cancel_scope.cancel()
    assert result.manifest.step == 300 and result.data == other
    assert result.dropped == ((slow.peer_id, "too slow (chunk deadline missed)"),)
    assert elapsed < 10.0  # two missed 2 s deadlines, then the other peer


async def test_interrupted_download_resumes_from_disk(autojump_clock, tmp_path):
    data, _ = snapshot_bytes(seed=5, step=20)
    m = make_manifest(data, 20, 2048)
    n = len(m.chunks)
    net = SimNetwork(seed=0)
    async with trio.open_nursery() as nursery:
        donor, joiner = await _hosts(nursery, net, 2)
        server = StateServer(donor)
        server.publish(m, data)
        orig = server._on_chunk

        async def die_after_five(req):
            if server.chunks_served >= 5:
                net.kill(donor.address)
                await trio.sleep_forever()
            return await orig(req)

        donor.route(CHUNK.name, die_after_five)
        with pytest.raises(StateSyncError):
            await fetch_state(joiner, [(donor.peer_id, donor.address)], ChunkStore(tmp_path / "sync"),
                              chunk_timeout=1.0, parallel=1)
        # The donor comes back with the same snapshot; a new process resumes from the disk.
        await trio.sleep(1)
        donor2 = net.add_host(donor.peer_id, donor.address)
        nursery.start_soon(donor2.run)
        await trio.sleep(0)
        StateServer(donor2).publish(m, data)
        result = await fetch_state(joiner, [(donor.peer_id, donor.address)], ChunkStore(tmp_path / "sync"))
        nursery.cancel_scope.cancel()
    assert result.chunks_resumed == 5
    assert result.chunks_fetched == n - 5
    assert result.data == data


async def test_nobody_published_yet_means_nothing_to_fetch(autojump_clock):
    net = SimNetwork(seed=0)
    async with trio.open_nursery() as nursery:
        a, b = await _hosts(nursery, net, 2)
        StateServer(a)  # never published: answers with a RemoteError
        assert await fetch_state(b, [(a.peer_id, a.address)], ChunkStore()) is None
        nursery.cancel_scope.cancel()
