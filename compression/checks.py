"""Checks on received messages: every header field and buffer is validated here before use.

The header and buffers of a message come from a peer. These functions turn each field into a
trusted Python value or raise ``CodecError`` saying which field is wrong and why. Nothing is
allocated from a peer's number until it has been bounded: element counts are checked against
``max_numel`` (or the caller's expected shape) and against the buffer lengths actually received.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from compression.base import MAX_NDIM, CodecError, Header

# The largest finite float32.
FLT_MAX = float(np.finfo(np.float32).max)


def check_keys(header: Any, codec: str, keys: Sequence[str]) -> Header:
    """The header is a dict with exactly ``keys`` (plus "codec" and "shape") naming ``codec``."""
    if not isinstance(header, dict):
        raise CodecError(f"{codec}: header must be a dict, got {type(header).__name__}")
    wanted = {"codec", "shape", *keys}
    present = set(header)
    if present != wanted:
        missing = sorted(str(k) for k in wanted - present)
        extra = sorted(repr(k) for k in present - wanted)
        raise CodecError(f"{codec}: header fields wrong: missing {missing}, unexpected {extra}")
    if header["codec"] != codec:
        raise CodecError(f"{codec}: header names codec {header['codec']!r}")
    return header


def check_int(header: Header, key: str, codec: str, lo: int, hi: int) -> int:
    """``header[key]`` is an int (not a bool) in [lo, hi]."""
    value = header[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise CodecError(f"{codec}: header field {key!r} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise CodecError(f"{codec}: header field {key!r} = {value} is outside [{lo}, {hi}]")
    return value


def check_str(header: Header, key: str, codec: str, allowed: Sequence[str]) -> str:
    value = header[key]
    if not isinstance(value, str) or value not in allowed:
        raise CodecError(f"{codec}: header field {key!r} = {value!r}; expected one of {list(allowed)}")
    return value


def check_shape(
    header: Header,
    codec: str,
    expected_shape: Sequence[int] | None,
    max_numel: int,
) -> tuple[tuple[int, ...], int]:
    """The header's shape as a tuple, and its element count, bounded before any allocation."""
    raw = header["shape"]
    if not isinstance(raw, (list, tuple)):
        raise CodecError(f"{codec}: shape must be a list of ints, got {type(raw).__name__}")
    if len(raw) > MAX_NDIM:
        raise CodecError(f"{codec}: shape has {len(raw)} dimensions, at most {MAX_NDIM} allowed")
    for d in raw:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise CodecError(f"{codec}: shape {list(raw)!r} must hold non-negative ints")
    shape = tuple(raw)
    if expected_shape is not None:
        want = tuple(int(d) for d in expected_shape)
        if shape != want:
            raise CodecError(f"{codec}: shape {list(shape)} does not match the expected {list(want)}")
    # Multiply with a running bound so a peer's huge dimensions never build a huge int.
    numel = 1
    for d in shape:
        numel *= d
        if numel > max_numel:
            raise CodecError(f"{codec}: shape {list(shape)} exceeds max_numel={max_numel}")
    return shape, numel


def byte_views(buffers: Any, codec: str, count: int) -> list[memoryview]:
    """``buffers`` is a list of exactly ``count`` contiguous bytes-like objects, as flat byte views."""
    if not isinstance(buffers, (list, tuple)):
        raise CodecError(f"{codec}: buffers must be a list, got {type(buffers).__name__}")
    if len(buffers) != count:
        raise CodecError(f"{codec}: expected {count} buffers, got {len(buffers)}")
    views = []
    for i, b in enumerate(buffers):
        if isinstance(b, str):
            raise CodecError(f"{codec}: buffer {i} is a str, not bytes-like")
        try:
            mv = memoryview(b)
        except TypeError:
            raise CodecError(f"{codec}: buffer {i} ({type(b).__name__}) is not bytes-like") from None
        if not mv.c_contiguous:
            raise CodecError(f"{codec}: buffer {i} is not contiguous")
        views.append(mv.cast("B") if mv.ndim != 1 or mv.format != "B" else mv)
    return views


def check_length(view: memoryview, nbytes: int, codec: str, what: str) -> None:
    if len(view) != nbytes:
        raise CodecError(f"{codec}: {what} buffer has {len(view)} bytes, expected {nbytes}")


def check_scales(scales: torch.Tensor, codec: str, limit: float) -> None:
    """Block scales are finite and in [0, limit] (limit keeps every decoded value finite)."""
    if scales.numel() == 0:
        return
    lo, hi = torch.aminmax(scales)
    lo_f, hi_f = float(lo), float(hi)
    # Written so that NaN fails the test: every comparison with NaN is False.
    if not (lo_f >= 0.0 and hi_f <= limit):
        raise CodecError(f"{codec}: block scales must be finite and in [0, {limit:.6g}], "
                         f"got min {lo_f!r}, max {hi_f!r}")


def check_finite(values: torch.Tensor, codec: str, what: str) -> None:
    if values.numel() == 0:
        return
    lo, hi = torch.aminmax(values)
    lo_f, hi_f = float(lo), float(hi)
    if not (math.isfinite(lo_f) and math.isfinite(hi_f)):
        raise CodecError(f"{codec}: {what} contain NaN or infinity")


class WireArray:
    """A little-endian array inside a received buffer, read without trusting its memory.

    Reads are zero-copy when the buffer is writable and aligned for ``dtype``; a read-only buffer
    (``bytes``) is copied chunk by chunk, because torch tensors may not alias read-only memory.
    """

    def __init__(self, view: memoryview, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self._bytes = np.frombuffer(view, dtype=np.uint8)
        aligned = self._bytes.ctypes.data % self.itemsize == 0
        self._direct: torch.Tensor | None = None
        if len(view) and not view.readonly and aligned:
            self._direct = torch.from_numpy(self._bytes).view(dtype)

    def read(self, start: int, stop: int, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Elements [start, stop) as a tensor; copies into ``scratch`` (uint8) when not zero-copy."""
        if self._direct is not None:
            return self._direct[start:stop]
        nbytes = (stop - start) * self.itemsize
        if scratch is None or scratch.numel() < nbytes:
            scratch = torch.empty(nbytes, dtype=torch.uint8)
        dst = scratch[:nbytes]
        dst.numpy()[:] = self._bytes[start * self.itemsize : stop * self.itemsize]
        return dst.view(self.dtype)

    def read_into(self, start: int, stop: int, out: torch.Tensor, scratch: torch.Tensor) -> None:
        """Convert elements [start, stop) into ``out``, copying at most once."""
        if self._direct is None and out.dtype == self.dtype:
            out.view(torch.uint8).numpy()[:] = self._bytes[start * self.itemsize : stop * self.itemsize]
        else:
            out.copy_(self.read(start, stop, scratch))
