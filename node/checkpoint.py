"""Checkpoints: atomic, pickle-free, hash-verified snapshots of a node's whole training state.

A checkpoint is one safetensors file holding the model, the inner optimizer's state, the outer
algorithm's state and the counters. Nested state dicts (torch optimizers keep
`{"state": {0: {"exp_avg": tensor}}, "param_groups": [...]}`) are flattened by `flatten_state`
into named tensors plus a JSON skeleton of the non-tensor leaves, so nothing is ever unpickled:
safetensors parses a fixed header and raw bytes, json parses plain values.

A content hash (SHA-256 over every tensor's name, dtype, shape and bytes, and over the skeleton)
is stored in the file's metadata and checked on load; a file that fails it, or fails to parse, is
refused with a `CheckpointError` saying why. `CheckpointStore` writes `ckpt-<step>.safetensors`
through a temp file, fsync and rename (so a crash mid-write leaves the previous file intact),
keeps the newest few, and on load falls back to the newest file that verifies, renaming a
corrupt one to `*.corrupt` so it can be inspected and never shadows a good one again.

The same flatten/hash/serialize functions carry state to late joiners (node/state_sync.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT = "murmur-checkpoint/1"
_NAME_RE = re.compile(r"^ckpt-(\d{9,})\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint (or a state snapshot from a peer) is missing, corrupt or does not fit."""


@dataclass
class Snapshot:
    """A node's state as named tensors plus plain values: what a checkpoint file holds.

    `state` is a nested structure (dicts, lists, numbers, strings, None and tensors), e.g.
    `{"model": model.state_dict(), "inner": opt.state_dict(), "outer": ..., "counters": {...}}`.
    """

    state: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)  # small JSON facts: peer id, step, time

    def to_bytes(self) -> bytes:
        return serialize(self.state, self.meta)

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))


# ---------------------------------------------------------------------------------------------
# Flattening nested state into named tensors + a JSON skeleton
# ---------------------------------------------------------------------------------------------


def flatten_state(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state into {path: tensor} and a JSON-able skeleton that points at them.

    Dict keys keep their type (an optimizer's int parameter indices stay ints), tuples become
    lists, numpy arrays become tensors. Tensors are copied to contiguous CPU memory and de-aliased
    (a tied weight appears under each of its names), because safetensors refuses shared storage.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            tensors[path] = obj.detach().to("cpu").contiguous().clone()
            return {"__tensor__": path}
        if isinstance(obj, np.ndarray):
            tensors[path] = torch.from_numpy(np.ascontiguousarray(obj).copy())
            return {"__tensor__": path}
        if isinstance(obj, dict):
            items = []
            for k, v in obj.items():
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise CheckpointError(f"state key {k!r} at {path or '<root>'} is not a str or int")
                items.append([k, walk(v, f"{path}.{k}" if path else str(k))])
            return {"__dict__": items}
        if isinstance(obj, (list, tuple)):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(obj)]
        if isinstance(obj, (np.integer, np.floating, np.bool_)):
            return obj.item()
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise CheckpointError(f"state value at {path or '<root>'} has type {type(obj).__name__}, which a checkpoint cannot hold")

    skeleton = walk(state, "")
    return tensors, skeleton


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """The inverse of `flatten_state`; every tensor the skeleton names must be present."""
    used: set[str] = set()

    def walk(obj: Any) -> Any:
        if isinstance(obj, dict):
            if set(obj) == {"__tensor__"}:
                name = obj["__tensor__"]
                if name not in tensors:
                    raise CheckpointError(f"state names tensor {name!r}, which the file does not hold")
                used.add(name)
                return tensors[name]
            if set(obj) == {"__dict__"} and isinstance(obj["__dict__"], list):
                out = {}
                for pair in obj["__dict__"]:
                    if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], (str, int))):
                        raise CheckpointError("malformed state skeleton (a dict entry is not a [key, value] pair)")
                    out[pair[0]] = walk(pair[1])
                return out
            raise CheckpointError("malformed state skeleton (unknown object)")
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        return obj

    out = walk(skeleton)
    extra = set(tensors) - used
    if extra:
        raise CheckpointError(f"file holds {len(extra)} tensors the state does not name (e.g. {sorted(extra)[0]!r})")
    return out


# ---------------------------------------------------------------------------------------------
# Hash and (de)serialisation
# ---------------------------------------------------------------------------------------------


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)


def content_hash(tensors: dict[str, torch.Tensor], skeleton: Any, meta: dict[str, Any]) -> str:
    """SHA-256 (hex) over every tensor's name, dtype, shape and bytes, then the skeleton and meta."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        head = f"{name}\x00{str(t.dtype)}\x00{tuple(t.shape)}\x00".encode()
        h.update(len(head).to_bytes(4, "big") + head)
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)
        h.update(len(data).to_bytes(8, "big"))
        h.update(memoryview(data).cast("B") if data.size else b"")
    h.update(_canonical_json(skeleton).encode())
    h.update(b"\x00")
    h.update(_canonical_json(meta).encode())
    return h.hexdigest()


def tensor_hash(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over named tensors only: equal iff two models hold bit-identical weights."""
    return content_hash(tensors, None, {})


def model_hash(model: torch.nn.Module) -> str:
    return tensor_hash({k: v.detach().cpu() for k, v in model.state_dict().items()})


def serialize(state: dict[str, Any], meta: dict[str, Any] | None = None) -> bytes:
    """A snapshot as safetensors bytes with its skeleton, meta and content hash in the header."""
    meta = dict(meta or {})
    tensors, skeleton = flatten_state(state)
    digest = content_hash(tensors, skeleton, meta)
    header = {
        "murmur.format": FORMAT,
        "murmur.skeleton": _canonical_json(skeleton),
        "murmur.meta": _canonical_json(meta),
        "murmur.hash": digest,
    }
    return st_save(tensors, metadata=header)


def _read_header_metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's __metadata__ map, parsed by hand (json only, bounded)."""
    if len(data) < 8:
        raise CheckpointError("file is too short to be a safetensors file")
    n = int.from_bytes(data[:8], "little")
    if n > min(len(data) - 8, 100 << 20):
        raise CheckpointError("header length is larger than the file (truncated or not a checkpoint)")
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError("header is not valid JSON (corrupt file)") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    ends = [
        v["data_offsets"][1]
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2
        and isinstance(v["data_offsets"][1], int)
    ] if isinstance(header, dict) else []
    body = len(data) - 8 - n
    if ends and max(ends) > body:
        raise CheckpointError(f"file is truncated ({max(ends) - body} bytes of tensor data missing)")
    if not isinstance(meta, dict):
        raise CheckpointError("file has no murmur metadata (not a murmur checkpoint)")
    return meta


def deserialize(data: bytes, *, what: str = "checkpoint") -> Snapshot:
    """Parse and verify snapshot bytes; any damage is a CheckpointError that says what failed."""
    header = _read_header_metadata(data)
    if header.get("murmur.format") != FORMAT:
        raise CheckpointError(f"{what} has format {header.get('murmur.format')!r}, expected {FORMAT!r}")
    try:
        skeleton = json.loads(header["murmur.skeleton"])
        meta = json.loads(header["murmur.meta"])
        expected = header["murmur.hash"]
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{what} metadata is incomplete or corrupt") from None
    try:
        tensors = st_load(bytes(data))
    except Exception as exc:  # SafetensorError, or ValueError/RuntimeError on a damaged layout
        raise CheckpointError(f"{what} tensor data is corrupt: {exc}") from None
    actual = content_hash(tensors, skeleton, meta)
    if actual != expected:
        raise CheckpointError(f"{what} content hash mismatch (stored {expected[:16]}..., computed {actual[:16]}...): the file is corrupt")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{what} meta is not a map")
    return Snapshot(unflatten_state(tensors, skeleton), meta)


def stored_hash(data: bytes) -> str:
    """The content hash a snapshot's header claims (not verified; `deserialize` verifies)."""
    value = _read_header_metadata(data).get("murmur.hash")
    if not isinstance(value, str):
        raise CheckpointError("file has no content hash")
    return value


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a reader sees either the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)  # make the rename itself durable
    finally:
        os.close(dfd)


def load_checkpoint(path: str | Path) -> Snapshot:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {exc}") from None
    try:
        return deserialize(data, what=f"checkpoint {path.name}")
    except CheckpointError as exc:
        raise CheckpointError(f"refusing {path}: {exc}") from None


class CheckpointStore:
    """A directory of `ckpt-<step>.safetensors` files; the newest that verifies wins."""

    def __init__(self, directory: str | Path, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (checkpoints kept on disk), got {keep}")
        self.dir = Path(directory)
        self.keep = keep
        self.refused: list[tuple[Path, str]] = []  # (file, reason) for every corrupt file met

    def paths(self) -> list[tuple[int, Path]]:
        """(step, path) of every checkpoint file, newest first."""
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            m = _NAME_RE.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found, reverse=True)

    def save(self, snapshot: Snapshot) -> Path:
        return self.save_bytes(snapshot.step, snapshot.to_bytes())

    def save_bytes(self, step: int, data: bytes) -> Path:
        """Store serialized snapshot bytes (`Snapshot.to_bytes()`) as the checkpoint of `step`."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"ckpt-{step:09d}.safetensors"
        write_atomic(path, data)
        for _, old in self.paths()[self.keep :]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self) -> Snapshot | None:
        """The newest checkpoint that verifies, or None if there is none.

        A corrupt file is refused (its reason kept in `refused`), renamed to `<name>.corrupt`,
        and the previous one is tried.
        """
        for _, path in self.paths():
            try:
                return load_checkpoint(path)
            except CheckpointError as exc:
                self.refused.append((path, str(exc)))
                try:
                    path.rename(path.with_name(path.name + ".corrupt"))
                except OSError:
                    pass
        return None
