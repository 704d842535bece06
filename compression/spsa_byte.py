"""One signed log-byte per scalar: the SPSA projected-gradient codec (ALGORITHMS.md §4).

"Just One Byte" (Zelikman et al., arXiv 2306.10015) quantises q = clamp(round(16 ln|g|), -127,
127) but then needs a sign bit too (9 bits) and its reference code sends the float anyway.
This is the PROPOSED true one-byte form of §4:

    c = sign(g) * clamp(round(16 * ln|g|) + 64, 1, 127),   c = 0 when g = 0
    g_hat = sign(c) * exp((|c| - 64) / 16)

|g| in [e**-3.94, e**3.94] = [0.0195, 51.4] is kept within a relative error of e**(1/32) - 1
(3.2 %); smaller magnitudes round up to 0.0195 and larger ones clip to 51.4.

Wire format:

    header  {"codec": "spsa_byte", "shape": [d0, ...]}
    buffers [codes]   numel int8 (two's complement) codes c, row-major; -128 is invalid
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from compression.base import DEFAULT_MAX_NUMEL, Codec, CodecError, Header
from compression.checks import WireArray, byte_views, check_keys, check_length, check_shape
from compression.layout import CHUNK, alloc, as_flat_input, check_finite_input, chunks, load_f32, wire_view


def _decode_table() -> torch.Tensor:
    """Unsigned byte u (= c mod 256) -> g_hat, as 256 float32 (computed in float64, rounded once)."""
    table = []
    for u in range(256):
        c = u - 256 if u >= 128 else u
        table.append(0.0 if c == 0 else math.copysign(math.exp((abs(c) - 64) / 16), c))
    return torch.tensor(table, dtype=torch.float64).to(torch.float32)


def _pair_table(single: torch.Tensor) -> torch.Tensor:
    """Two code bytes (read as one little-endian uint16) -> their two float32 values, as an int64.

    One 8-byte gather per two codes: ~1.7x faster than one 4-byte gather per code.
    """
    u = torch.arange(1 << 16)
    return torch.stack([single[u & 255], single[u >> 8]], dim=1).contiguous().view(torch.int64).reshape(-1)


class SpsaByteCodec(Codec):
    """8 bits per value, no scale: for (seed, projected gradient) records, not for tensors."""

    name = "spsa_byte"
    lossless = False
    _table = _decode_table()
    _pairs = _pair_table(_table)

    def __init__(self, *, max_numel: int = DEFAULT_MAX_NUMEL) -> None:
        super().__init__(max_numel=max_numel)
        self.bits_per_value = 8.0

    def _encode(self, x: torch.Tensor | np.ndarray) -> tuple[Header, list[memoryview]]:
        flat, shape = as_flat_input(x)
        n = flat.numel()
        codes = alloc(n, torch.int8)
        step = min(n, CHUNK)
        convert = torch.empty(step) if flat.dtype != torch.float32 else None
        a = torch.empty(step)
        for s, e in chunks(n, CHUNK):
            g = load_f32(flat, s, e, convert)
            ac = a[: e - s]
            torch.abs(g, out=ac)
            mag = ac.numpy()
            check_finite_input(0.0, float(mag.max()), self.name)  # max |g| is NaN/inf if any is
            has_zero = float(mag.min()) == 0.0
            torch.log(ac, out=ac)
            # round(16 ln|g|) + 64 in 1..127, with g's sign (rounded before the +64, where the
            # float32 spacing is finer, so the rounding boundaries stay where §4 puts them)
            ac.mul_(16.0).round_().add_(64.0).clamp_(1.0, 127.0).copysign_(g)
            if has_zero:
                ac.masked_fill_(g == 0, 0.0)  # c = 0 for g = 0 (log gave -inf, clamped to 1)
            codes[s:e].copy_(ac)
        return {"codec": self.name, "shape": list(shape)}, [wire_view(codes)]

    def _decode(
        self,
        header: Header,
        buffers: Sequence[Any],
        expected_shape: Sequence[int] | None = None,
    ) -> torch.Tensor:
        check_keys(header, self.name, ())
        shape, n = check_shape(header, self.name, expected_shape, self.max_numel)
        (view,) = byte_views(buffers, self.name, 1)
        check_length(view, n, self.name, "codes")
        wire = WireArray(view, torch.int8)
        out = alloc(n, torch.float32)
        scratch = torch.empty(min(n, CHUNK), dtype=torch.uint8)
        idx = torch.empty(min(n, CHUNK) // 2 + 1, dtype=torch.int32)
        for s, e in chunks(n, CHUNK):  # CHUNK is even: every chunk but the last has whole pairs
            codes = wire.read(s, e, scratch)
            if int(codes.numpy().min()) == -128:
                raise CodecError(f"{self.name}: code -128 is not a valid one-byte code")
            even = (e - s) // 2 * 2
            ic = idx[: even // 2]
            ic.copy_(codes[:even].view(torch.uint16))
            torch.index_select(self._pairs, 0, ic, out=out[s : s + even].view(torch.int64))
            if even < e - s:  # the odd last value
                out[e - 1] = self._table[int(codes[-1].view(torch.uint8))]
        return out.view(shape)
