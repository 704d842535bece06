"""The trio side of late-joiner state sync: serve our snapshots, fetch a peer's.

The decisions are `node.state_sync`'s (which offer, which chunk from which source, who is
dropped); this module only moves manifests and chunks over the transport, with a deadline on
every call, and stores verified chunks through the `ChunkStore` (in a worker thread).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import trio

from gossip.errors import MurmurError, PeerTimeout, PeerUnreachable, RemoteError, RemoteProtocolError
from gossip.transport import Request, Response, Transport
from node.state_sync import (
    CHUNK,
    KEEP_PUBLISHED,
    MANIFEST,
    ChunkStore,
    Download,
    Manifest,
    Offer,
    StateSyncError,
    choose_offer,
)

log = logging.getLogger("murmur.state_sync")


# ---------------------------------------------------------------------------------------------
# Serving (trio)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    manifest: Manifest
    data: bytes


class StateServer:
    """Answers `state.manifest` / `state.chunk` with the newest of our last published snapshots."""

    def __init__(self, transport: Transport) -> None:
        self._published: list[Published] = []  # oldest first, at most KEEP_PUBLISHED
        self.chunks_served = 0
        transport.route(MANIFEST.name, self._on_manifest)
        transport.route(CHUNK.name, self._on_chunk)

    def publish(self, manifest: Manifest, data: bytes) -> None:
        self._published.append(Published(manifest, data))
        del self._published[:-KEEP_PUBLISHED]

    @property
    def latest(self) -> Manifest | None:
        return self._published[-1].manifest if self._published else None

    async def _on_manifest(self, req: Request) -> Response:
        if not self._published:
            raise LookupError("this node has not published its state yet")
        return Response(self._published[-1].manifest.to_body())

    async def _on_chunk(self, req: Request) -> Response:
        snap, index = req.body["snapshot"], req.body["index"]
        for pub in reversed(self._published):
            if pub.manifest.snapshot == snap:
                if index >= len(pub.manifest.chunks):
                    raise IndexError(f"chunk {index} out of range ({len(pub.manifest.chunks)} chunks)")
                start = index * pub.manifest.chunk_size
                self.chunks_served += 1
                return Response({"index": index}, [memoryview(pub.data)[start : start + pub.manifest.chunk_size]])
        raise LookupError("snapshot no longer offered")


# ---------------------------------------------------------------------------------------------
# Fetching (trio)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchResult:
    data: bytes  # the verified snapshot bytes
    manifest: Manifest
    sources: tuple[bytes, ...]  # peers that served chunks, best first
    chunks_fetched: int  # chunks downloaded in this call (the rest were already on disk)
    chunks_resumed: int  # chunks found on disk from an interrupted download
    dropped: tuple[tuple[bytes, str], ...]  # (peer id, why) for every source dropped


async def _get_offers(transport: Transport, peers: Sequence[tuple[bytes, str]], timeout: float) -> list[Offer]:
    offers: list[Offer] = []

    async def ask(peer_id: bytes, address: str) -> None:
        try:
            reply = await transport.call(address, MANIFEST.name, {}, timeout=timeout, peer_id=peer_id)
            offers.append(Offer(reply.peer_id, address, Manifest.from_body(reply.body)))
        except (MurmurError, OSError) as exc:
            log.info("no manifest from %s: %s", address, exc)

    async with trio.open_nursery() as nursery:
        for peer_id, address in peers:
            nursery.start_soon(ask, peer_id, address)
    return offers


async def fetch_state(
    transport: Transport,
    peers: Sequence[tuple[bytes, str]],
    store: ChunkStore,
    *,
    manifest_timeout: float = 5.0,
    chunk_timeout: float = 10.0,
    parallel: int = 4,
    max_rounds: int = 3,
    min_step: int = 0,
) -> FetchResult | None:
    """Fetch the most trained peer's snapshot; None if nobody has trained (or published) more
    than `min_step` steps (a restarted node passes its own step: it only catches up).

    `peers` are (peer id, address) pairs to ask. Raises StateSyncError when a download was
    started but `max_rounds` rounds of asking end without a verified snapshot.
    """
    if parallel < 1 or max_rounds < 1:
        raise ValueError("parallel and max_rounds must be >= 1")
    excluded: set[bytes] = set()
    dropped: list[tuple[bytes, str]] = []
    resumed = fetched = 0
    first_adopt = True
    for _ in range(max_rounds):
        candidates = [(p, a) for p, a in peers if p not in excluded and p != transport.peer_id]
        offers = await _get_offers(transport, candidates, manifest_timeout)
        if not offers:
            if first_adopt:
                return None  # nobody has published state yet: a fresh swarm, nothing to fetch
            break
        held = store.held_hashes()
        manifest = choose_offer(offers, held, min_step)
        if manifest is None:
            if not excluded:
                return None  # a fresh swarm: nothing to fetch
            break
        have = await trio.to_thread.run_sync(store.adopt, manifest)
        if first_adopt:
            resumed = len(have)
            first_adopt = False
        dl = Download(manifest, have=set(have), per_source=parallel)
        for o in offers:
            if o.manifest.snapshot == manifest.snapshot:
                dl.add_source(o.peer_id, o.address)
        fetched += await _run_download(transport, dl, store, chunk_timeout, parallel)
        for peer_id, src in dl.sources.items():
            if src.banned is not None:
                excluded.add(peer_id)
                dropped.append((peer_id, src.banned))
        if dl.done:
            data = await trio.to_thread.run_sync(store.assemble, manifest)
            sources = tuple(sorted((p for p, s in dl.sources.items() if s.served), key=lambda p: -dl.sources[p].served))
            return FetchResult(data, manifest, sources, fetched, resumed, tuple(dropped))
    raise StateSyncError(
        "could not download a complete snapshot from any peer"
        + (f" (dropped: {', '.join(f'{p.hex()[:8]}: {why}' for p, why in dropped)})" if dropped else "")
    )


async def _run_download(transport: Transport, dl: Download, store: ChunkStore, chunk_timeout: float, parallel: int) -> int:
    """Pump chunk requests until the download is done or stalled; returns chunks fetched."""
    fetched = 0
    wake = trio.Event()
    budget = trio.Semaphore(parallel)

    async def one(index: int, peer: bytes, address: str) -> None:
        nonlocal fetched, wake
        try:
            try:
                reply = await transport.call(
                    address, CHUNK.name, {"snapshot": dl.manifest.snapshot, "index": index},
                    timeout=chunk_timeout, peer_id=peer,
                )
            except PeerTimeout:
                dl.failed(index, peer, "too slow (chunk deadline missed)")
                return
            except (PeerUnreachable, OSError):
                dl.failed(index, peer, "unreachable", fatal=True)
                return
            except RemoteError as exc:
                dl.failed(index, peer, f"refused: {exc.message}", fatal=True)
                return
            except RemoteProtocolError as exc:
                dl.failed(index, peer, f"protocol error: {exc}", fatal=True)
                return
            data = reply.buffers[0] if reply.buffers and reply.body["index"] == index else b""
            if dl.received(index, peer, data):
                await trio.to_thread.run_sync(store.put, dl.manifest.chunks[index], bytes(data))
                fetched += 1
            else:
                log.warning("dropping state source %s: bad chunk %d", address, index)
        finally:
            budget.release()
            wake.set()

    async with trio.open_nursery() as nursery:
        while not dl.done and not dl.stalled:
            job = dl.assign()
            if job is None:
                await wake.wait()
                wake = trio.Event()
                continue
            await budget.acquire()
            nursery.start_soon(one, *job)
    return fetched
