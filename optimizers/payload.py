"""Lists of flat float32 arrays <-> (msgpack-able metadata, raw buffers) through a codec.

NoLoCo sends its (φ, Δ) as a `pair_exchange` body plus buffers; this module packs a list of
tensors with a `compression` codec and unpacks a peer's, validating every field first. The
layout, which PROTOCOL.md's NoLoCo section refers to:

    meta    = [{"h": <codec header>, "n": <number of buffers>}, ...]   one entry per tensor
    buffers = the codec buffers of tensor 0, then of tensor 1, ...     (flat list)

It also estimates what a `group_average` of a tensor list costs on the wire, for the stats of
DiLoCo and Streaming DiLoCo (the collectives do the encoding there, not us).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from gossip.errors import RemoteProtocolError

if TYPE_CHECKING:
    from compression.base import Codec

# A peer's metadata list is bounded by our own tensor count, but we also refuse absurd buffer
# counts per tensor before slicing, so a hostile header cannot make us build huge lists.
_MAX_BUFFERS_PER_TENSOR = 64


def encode_tensors(codec: "Codec", arrays: Sequence[np.ndarray]) -> tuple[list[dict], list[Any]]:
    """Encode each array with `codec`; returns `(meta, buffers)` in the layout above."""
    meta: list[dict] = []
    buffers: list[Any] = []
    for a in arrays:
        header, bufs = codec.encode(a)
        meta.append({"h": header, "n": len(bufs)})
        buffers.extend(bufs)
    return meta, buffers


def decode_tensors(
    codec: "Codec", meta: Any, buffers: Sequence[Any], shapes: Sequence[tuple[int, ...]]
) -> list[np.ndarray]:
    """Decode a peer's tensors, each to float32 with the expected shape.

    Raises RemoteProtocolError (with the reason) on any malformed field, a buffer count that does
    not add up, or a codec error; nothing is allocated from an unchecked size.
    """
    from compression.base import CodecError  # late: keep this module importable on its own

    if not isinstance(meta, list) or len(meta) != len(shapes):
        raise RemoteProtocolError(
            f"tensor metadata must be a list of {len(shapes)} entries, got "
            f"{type(meta).__name__}{'' if not isinstance(meta, list) else f' of {len(meta)}'}"
        )
    counts: list[int] = []
    for i, m in enumerate(meta):
        if not isinstance(m, dict) or not isinstance(m.get("h"), dict):
            raise RemoteProtocolError(f"tensor {i}: metadata must be a map with a map 'h'")
        n = m.get("n")
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= _MAX_BUFFERS_PER_TENSOR:
            raise RemoteProtocolError(f"tensor {i}: buffer count {n!r} not an int in [0, {_MAX_BUFFERS_PER_TENSOR}]")
        counts.append(n)
    if sum(counts) != len(buffers):
        raise RemoteProtocolError(f"metadata names {sum(counts)} buffers, {len(buffers)} arrived")
    out: list[np.ndarray] = []
    pos = 0
    for i, (m, n, shape) in enumerate(zip(meta, counts, shapes)):
        try:
            t = codec.decode(m["h"], list(buffers[pos : pos + n]), expected_shape=tuple(shape))
        except CodecError as e:
            raise RemoteProtocolError(f"tensor {i}: {e}") from e
        pos += n
        arr = t.detach().to("cpu").float().numpy() if hasattr(t, "detach") else np.asarray(t, dtype=np.float32)
        if arr.shape != tuple(shape):
            raise RemoteProtocolError(f"tensor {i}: decoded shape {arr.shape}, expected {tuple(shape)}")
        out.append(arr)
    return out


def payload_nbytes(codec: "Codec", numel: int) -> int:
    """Bytes of codec buffers for one flat tensor of `numel` values (headers not counted).

    Every codec in `compression/` has a size fixed by numel (and its options), so encoding a zero
    vector of that length gives the exact figure; callers cache it per tensor.
    """
    _, bufs = codec.encode(np.zeros(int(numel), dtype=np.float32))
    return sum(memoryview(b).nbytes for b in bufs)


def ring_allreduce_bytes(payload: int, members: int) -> int:
    """Bytes one member sends (and receives) in a reduce-scatter + all-gather of `payload` bytes.

    Each member sends (n−1)/n of its encoded payload in each of the two phases; alone, nothing.
    """
    if members <= 1:
        return 0
    return (2 * (members - 1) * payload) // members
