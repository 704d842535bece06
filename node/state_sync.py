"""Late joiners: download a peer's training state in hash-verified chunks, with fallback and resume.

A node publishes its state from time to time as a *snapshot*: the bytes of a checkpoint
(node/checkpoint.py, safetensors + content hash), cut into chunks. Its manifest names the
snapshot by the SHA-256 of those bytes and lists the SHA-256 of every chunk. A joiner

1. asks several peers for their manifests (`state.manifest`) and picks the most trained one
   (`choose_offer`); a swarm where nobody has trained yet (step 0) needs no download;
2. fetches the chunks (`state.chunk`), several in flight, from every peer that offers the same
   snapshot; each chunk is checked against its hash as it arrives. A peer that sends bad data is
   dropped at once; one that is slow (a chunk misses its deadline) or unreachable gets strikes
   and is dropped after `max_strikes`; its chunks go to the other sources (`Download`, sans-IO);
3. when no source is left, asks the remaining peers again and continues with the best new offer;
   chunks already held are kept whenever the new manifest lists the same hash;
4. keeps verified chunks on disk (`ChunkStore`, content-addressed), so a joiner that is killed
   mid-download and restarted fetches only what it lacks, if the donor still offers the snapshot
   (donors keep their last `KEEP_PUBLISHED` snapshots);
5. checks the whole snapshot's hash, then parses it with the checkpoint reader, which verifies the
   content hash again. Nothing from a peer is unpickled.

The decisions (which offer, which chunk from which peer, who is dropped) live here as plain
code with no trio import; `node.state_transfer` (`fetch_state`, `StateServer`) is the trio pump
around them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from gossip import messages
from gossip.errors import MurmurError, RemoteProtocolError
from gossip.messages import Bytes, Int, List, Map

MAX_CHUNKS = 8192  # chunks per snapshot: bounds the manifest to ~300 KB of msgpack
MIN_CHUNK_BYTES = 1 << 10  # smallest chunk a manifest may declare
MAX_CHUNK_BYTES = 16 << 20  # largest chunk: bounds what one reply may carry
DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB: small enough that one slow chunk costs little
KEEP_PUBLISHED = 2  # snapshots a donor keeps serving, so a download survives one republish

_HASH = Bytes(min_len=32, max_len=32)

MANIFEST = messages.define(
    "state.manifest",
    1,
    Map({}),
    Map(
        {
            "snapshot": _HASH,  # sha256 of the whole snapshot's bytes
            "step": Int(0, (1 << 63) - 1),  # inner steps the state has trained
            "size": Int(0, MAX_CHUNKS * MAX_CHUNK_BYTES),  # bytes in the snapshot
            "chunk_size": Int(MIN_CHUNK_BYTES, MAX_CHUNK_BYTES),  # bytes per chunk (the last may be shorter)
            "chunks": List(_HASH, max_len=MAX_CHUNKS),  # sha256 of each chunk, in order
        }
    ),
)

CHUNK = messages.define(
    "state.chunk",
    1,
    Map({"snapshot": _HASH, "index": Int(0, MAX_CHUNKS - 1)}),
    Map({"index": Int(0, MAX_CHUNKS - 1)}),
    max_response_buffers=1,
    max_buffer_bytes=MAX_CHUNK_BYTES,
)


class StateSyncError(MurmurError):
    """No peer could supply a complete, valid snapshot within the attempts allowed."""


# ---------------------------------------------------------------------------------------------
# Manifests (pure)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """What a snapshot is: its hash, size, chunking and each chunk's hash."""

    snapshot: bytes  # sha256 of the whole snapshot
    step: int  # inner steps the state has trained
    size: int  # bytes
    chunk_size: int  # bytes per chunk; the last one holds the rest
    chunks: tuple[bytes, ...]  # sha256 per chunk

    def __post_init__(self) -> None:
        expected = -(-self.size // self.chunk_size) if self.size else 0
        if len(self.chunks) != expected:
            raise RemoteProtocolError(
                f"manifest lists {len(self.chunks)} chunks, but {self.size} bytes in chunks of {self.chunk_size} make {expected}"
            )

    def chunk_len(self, index: int) -> int:
        start = index * self.chunk_size
        return min(self.chunk_size, self.size - start)

    def to_body(self) -> dict:
        return {"snapshot": self.snapshot, "step": self.step, "size": self.size, "chunk_size": self.chunk_size, "chunks": list(self.chunks)}

    @classmethod
    def from_body(cls, body: dict) -> Manifest:
        return cls(body["snapshot"], body["step"], body["size"], body["chunk_size"], tuple(body["chunks"]))

    def to_json(self) -> str:
        return json.dumps({**self.to_body(), "snapshot": self.snapshot.hex(), "chunks": [c.hex() for c in self.chunks]})

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        d = json.loads(text)
        return cls(bytes.fromhex(d["snapshot"]), int(d["step"]), int(d["size"]), int(d["chunk_size"]), tuple(bytes.fromhex(c) for c in d["chunks"]))


def pick_chunk_size(size: int, preferred: int = DEFAULT_CHUNK_BYTES) -> int:
    """`preferred`, doubled until the snapshot fits in MAX_CHUNKS chunks."""
    chunk = max(MIN_CHUNK_BYTES, min(preferred, MAX_CHUNK_BYTES))
    while -(-size // chunk) > MAX_CHUNKS:
        chunk *= 2
        if chunk > MAX_CHUNK_BYTES:
            raise ValueError(f"a snapshot of {size} bytes is too large to publish (max {MAX_CHUNKS * MAX_CHUNK_BYTES})")
    return chunk


def make_manifest(data: bytes, step: int, chunk_size: int = DEFAULT_CHUNK_BYTES) -> Manifest:
    """Chunk and hash a snapshot (CPU work: call it from a worker thread for large states)."""
    chunk_size = pick_chunk_size(len(data), chunk_size)
    view = memoryview(data)
    chunks = tuple(hashlib.sha256(view[i : i + chunk_size]).digest() for i in range(0, len(data), chunk_size))
    return Manifest(hashlib.sha256(view).digest(), step, len(data), chunk_size, chunks)


@dataclass(frozen=True)
class Offer:
    """A peer's manifest, as it answered."""

    peer_id: bytes
    address: str
    manifest: Manifest


def choose_offer(offers: Sequence[Offer], held: set[bytes] = frozenset(), min_step: int = 0) -> Manifest | None:
    """The snapshot to fetch: the most trained; then the one offered by most peers (more
    sources to fall back on); then the one we already hold most chunks of; then the smallest
    hash (so every joiner breaks ties alike). None unless it has trained more than `min_step`
    steps (0: a fresh swarm has nothing to offer)."""
    best: dict[bytes, list] = {}
    for o in offers:
        m = o.manifest
        entry = best.setdefault(m.snapshot, [m, 0])
        entry[1] += 1
    if not best:
        return None

    def key(entry: list) -> tuple:
        m, n = entry
        return (m.step, n, sum(1 for c in m.chunks if c in held), [-b for b in m.snapshot])

    manifest = max(best.values(), key=key)[0]
    return manifest if manifest.step > min_step else None


# ---------------------------------------------------------------------------------------------
# The download state machine (pure)
# ---------------------------------------------------------------------------------------------


@dataclass
class _Source:
    address: str
    strikes: int = 0
    in_flight: int = 0
    banned: str | None = None  # why it was dropped
    served: int = 0  # good chunks received from it


@dataclass
class Download:
    """Which chunks are held, which are in flight where, and which sources are still trusted.

    Feed it outcomes (`received`, `failed`); ask it what to do next (`assign`).
    """

    manifest: Manifest
    have: set[int] = field(default_factory=set)  # indices of verified chunks
    max_strikes: int = 2  # timeouts/unreachable before a source is dropped
    per_source: int = 2  # chunk requests in flight per source

    def __post_init__(self) -> None:
        self.sources: dict[bytes, _Source] = {}
        self.in_flight: dict[int, bytes] = {}
        self.bad_chunks = 0  # chunks refused for a wrong hash or length

    def add_source(self, peer_id: bytes, address: str) -> None:
        if peer_id not in self.sources:
            self.sources[peer_id] = _Source(address)

    @property
    def done(self) -> bool:
        return len(self.have) == len(self.manifest.chunks)

    def usable(self) -> list[bytes]:
        return [p for p, s in self.sources.items() if s.banned is None]

    @property
    def stalled(self) -> bool:
        """Nothing in flight, chunks missing, and no source left to ask."""
        return not self.done and not self.in_flight and not self.usable()

    def missing(self) -> list[int]:
        return [i for i in range(len(self.manifest.chunks)) if i not in self.have]

    def assign(self) -> tuple[int, bytes, str] | None:
        """The next (chunk index, peer id, address) to request, or None if nothing to start now."""
        free = [p for p in self.usable() if self.sources[p].in_flight < self.per_source]
        if not free:
            return None
        for i in range(len(self.manifest.chunks)):
            if i in self.have or i in self.in_flight:
                continue
            # The least-loaded source, then the one with fewest strikes, then the best server.
            peer = min(free, key=lambda p: (self.sources[p].in_flight, self.sources[p].strikes, -self.sources[p].served, p))
            self.in_flight[i] = peer
            self.sources[peer].in_flight += 1
            return i, peer, self.sources[peer].address
        return None

    def _release(self, index: int, peer: bytes) -> None:
        if self.in_flight.get(index) == peer:
            del self.in_flight[index]
        src = self.sources[peer]
        src.in_flight = max(0, src.in_flight - 1)

    def received(self, index: int, peer: bytes, data: bytes | bytearray | memoryview) -> bool:
        """A chunk arrived: keep it if its length and hash match, else drop the sender."""
        self._release(index, peer)
        if index in self.have:
            return False
        if len(data) != self.manifest.chunk_len(index) or hashlib.sha256(data).digest() != self.manifest.chunks[index]:
            self.bad_chunks += 1
            self.sources[peer].banned = f"sent a bad chunk {index}"
            return False
        self.have.add(index)
        self.sources[peer].served += 1
        return True

    def failed(self, index: int, peer: bytes, reason: str, *, fatal: bool = False) -> None:
        """A request failed: a strike for the source (dropped at once if `fatal`)."""
        self._release(index, peer)
        src = self.sources[peer]
        src.strikes += 1
        if fatal or src.strikes >= self.max_strikes:
            src.banned = reason


# ---------------------------------------------------------------------------------------------
# Chunk storage (resume)
# ---------------------------------------------------------------------------------------------


class ChunkStore:
    """Verified chunks by hash: on disk under `directory` (survives a restart), or in memory."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.dir = Path(directory) if directory is not None else None
        self._mem: dict[bytes, bytes] = {}
        self.manifest: Manifest | None = None

    def _path(self, digest: bytes) -> Path:
        assert self.dir is not None
        return self.dir / f"{digest.hex()}.chunk"

    def held_hashes(self) -> set[bytes]:
        """Hashes of chunks on hand (checked again when a manifest is adopted)."""
        if self.dir is None:
            return set(self._mem)
        if not self.dir.is_dir():
            return set()
        out = set()
        for p in self.dir.glob("*.chunk"):
            try:
                out.add(bytes.fromhex(p.stem))
            except ValueError:
                continue
        return out

    def adopt(self, manifest: Manifest) -> set[int]:
        """Start (or resume) this manifest: keep chunks it lists that verify, drop the rest.

        Returns the indices already held.
        """
        wanted = set(manifest.chunks)
        held: set[bytes] = set()
        if self.dir is None:
            self._mem = {h: d for h, d in self._mem.items() if h in wanted}
            held = set(self._mem)
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            for p in self.dir.iterdir():
                if p.name == "manifest.json":
                    continue
                try:
                    digest = bytes.fromhex(p.stem) if p.suffix == ".chunk" else None
                except ValueError:
                    digest = None
                if digest in wanted and hashlib.sha256(p.read_bytes()).digest() == digest:
                    held.add(digest)
                else:
                    p.unlink(missing_ok=True)  # a stray, a torn write, or another snapshot's chunk
            (self.dir / "manifest.json").write_text(manifest.to_json())
        self.manifest = manifest
        return {i for i, h in enumerate(manifest.chunks) if h in held}

    def resume_manifest(self) -> Manifest | None:
        """The manifest an interrupted download was following, if one was saved."""
        if self.dir is None:
            return self.manifest
        try:
            return Manifest.from_json((self.dir / "manifest.json").read_text())
        except (OSError, ValueError, KeyError, RemoteProtocolError):
            return None

    def put(self, digest: bytes, data: bytes) -> None:
        if self.dir is None:
            self._mem[digest] = bytes(data)
            return
        path = self._path(digest)
        tmp = path.with_suffix(".part")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def get(self, digest: bytes) -> bytes:
        if self.dir is None:
            return self._mem[digest]
        return self._path(digest).read_bytes()

    def assemble(self, manifest: Manifest) -> bytes:
        """The whole snapshot, verified against its hash (a mismatch raises StateSyncError)."""
        data = b"".join(self.get(h) for h in manifest.chunks)
        if len(data) != manifest.size or hashlib.sha256(data).digest() != manifest.snapshot:
            raise StateSyncError("assembled snapshot does not match its manifest hash")
        return data

    def clear(self) -> None:
        self._mem.clear()
        self.manifest = None
        if self.dir is not None and self.dir.is_dir():
            for p in self.dir.iterdir():
                p.unlink(missing_ok=True)
            self.dir.rmdir()
