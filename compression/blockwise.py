"""Blockwise quantisers: int8 and 4-bit uniform (absmax scale), 1-bit sign (mean-|x| scale).

The flattened tensor (row-major) is cut into blocks of ``block`` consecutive values; the last
block may be shorter. Each block has one float32 scale ``s``. Wire format:

    header  {"codec": "int8" | "uint4" | "sign1", "shape": [d0, ...], "block": B}
    buffers [scales, codes]
        scales: ceil(numel / B) float32, little-endian, block order
        codes:  int8   numel bytes, two's complement q; value = q * s            (q in -127..127)
                uint4  ceil(numel / 2) bytes; value i is the low nibble of byte i // 2 when i is
                       even, the high nibble when odd; value = (q - 8) * s      (q in 1..15)
                sign1  ceil(numel / 8) bytes; value i is bit i % 8 (LSB first) of byte i // 8;
                       value = -s if the bit is 1 else +s                     (sign(0) = +1)
        Unused bits of the last byte are zero.

Scales and rounding (encoder side; the decoder only needs the formulas above):
    int8   s = max|x| / 127, q = round(x / s)        |error| <= s / 2 = max|x| / 254
    uint4  s = max|x| / 7,   q = round(x / s) + 8    |error| <= s / 2 = max|x| / 14 (half to even)
    sign1  s = mean|x| over the block (the L2-optimal scale for a sign vector)
A block whose max|x| is below 2**-126 * levels (1.5e-36 for int8) is sent as zeros with s = 0.
Decoders accept 0 <= s <= FLT_MAX / 128 (int8), FLT_MAX / 8 (uint4), FLT_MAX (sign1), so every
decoded value is finite; encoders clamp the scale to that bound (only blocks with values beyond
3.37e38 for int8, 2.98e38 for uint4 are affected). Defaults: int8 B=64 (8.5 bits/value), uint4 and sign1 B=128 (4.25 and
1.25 bits/value). The block travels in the header, so any block size in range decodes.
"""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from compression.base import DEFAULT_MAX_NUMEL, Codec, CodecError, Header
from compression.checks import (
    FLT_MAX, WireArray, byte_views, check_int, check_keys, check_length, check_scales, check_shape,
)
from compression.layout import CHUNK, alloc, as_flat_input, check_finite_input, chunks, load_f32, minmax, wire_view

# Largest block a codec accepts, locally or from a peer.
MAX_BLOCK = 1 << 16
# Smallest positive normal float32: scales below it would overflow their reciprocal.
FLT_MIN = float(np.finfo(np.float32).tiny)


class Work:
    """Scratch tensors reused from chunk to chunk (one set per encode/decode call)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, key: str, dtype: torch.dtype, n: int) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = self._buffers[key] = torch.empty(n, dtype=dtype)
        return buf[:n]


def absmax_to_scales(absmax: torch.Tensor, levels: float, limit: float, what: str) -> tuple[torch.Tensor, bool]:
    """Turn per-block max|x| into scales in place; return (1/scale as a column, whether clamped).

    scale = absmax / levels, clamped to ``limit``; a scale below FLT_MIN becomes 0 (the block is
    sent as zeros) so that its reciprocal cannot overflow. Raises ValueError on NaN/inf input.
    numpy, not torch: on a few thousand scales per chunk torch's per-op overhead dominates.
    """
    s = absmax.numpy()
    lo, hi = float(s.min()), float(s.max())
    check_finite_input(lo, hi, what)
    np.divide(s, np.float32(levels), out=s)
    clamped = hi / levels > limit
    if clamped:
        np.minimum(s, np.float32(limit), out=s)
    if lo / levels < FLT_MIN:  # rare: all-zero or denormal blocks
        tiny = s < FLT_MIN
        s[tiny] = 0.0
        inv = np.reciprocal(np.where(tiny, np.float32(1.0), s))
        inv[tiny] = 0.0
    else:
        inv = np.reciprocal(s)
    return torch.from_numpy(inv).unsqueeze(1), clamped


class BlockCodec(Codec):
    """The chunked encode/decode loop shared by codecs with one float32 scale per block."""

    lossless = False
    default_block: ClassVar[int]
    block_multiple: ClassVar[int]  # blocks must be a multiple of this (whole bytes per chunk)
    code_bits: ClassVar[int]       # bits per value in the codes buffer
    scale_limit: ClassVar[float]   # largest scale a decoder accepts

    def __init__(self, block: int | None = None, *, max_numel: int = DEFAULT_MAX_NUMEL) -> None:
        super().__init__(max_numel=max_numel)
        block = self.default_block if block is None else block
        m = self.block_multiple
        if isinstance(block, bool) or not isinstance(block, int) or not m <= block <= MAX_BLOCK or block % m:
            raise ValueError(f"{self.name}: block must be a multiple of {m} in [{m}, {MAX_BLOCK}], got {block!r}")
        self.block = block
        self.bits_per_value = self.code_bits + 32 / block

    def __repr__(self) -> str:
        return f"{type(self).__name__}(block={self.block}, bits_per_value={self.bits_per_value:g})"

    def code_bytes(self, n: int) -> int:
        return (n * self.code_bits + 7) // 8

    def _blocks_per_chunk(self, block: int) -> int:
        # A multiple of 8 blocks, so every chunk starts on a whole byte of codes.
        return max(8, CHUNK // block // 8 * 8)

    # -- kernels: v / out are (nb, B) float32 views; codes a uint8 slice of the codes buffer --

    @abc.abstractmethod
    def _encode_blocks(self, v: torch.Tensor, scales: torch.Tensor, codes: torch.Tensor, work: Work) -> None:
        """Fill ``scales`` (nb,) and ``codes`` for the (nb, B) float32 blocks ``v``."""

    @abc.abstractmethod
    def _decode_blocks(self, codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, work: Work) -> None:
        """Write the (nb, B) float32 values of ``codes`` and (checked) ``scales`` into ``out``."""

    def _encode_tail(self, v: torch.Tensor, used: int, scales: torch.Tensor, codes: torch.Tensor, work: Work) -> None:
        """The last, short block, zero-padded to a whole block in ``v``; ``used`` values are real."""
        self._encode_blocks(v, scales, codes, work)

    # -- the loops --

    def _encode(self, x: torch.Tensor | np.ndarray) -> tuple[Header, list[memoryview]]:
        flat, shape = as_flat_input(x)
        n, B = flat.numel(), self.block
        nfull, rest = divmod(n, B)
        scales = torch.empty(nfull + (rest > 0), dtype=torch.float32)
        codes = alloc(self.code_bytes(n), torch.uint8)
        per = self._blocks_per_chunk(B)
        work = Work()
        convert = torch.empty(min(nfull, per) * B) if flat.dtype != torch.float32 else None
        for b0, b1 in chunks(nfull, per):
            v = load_f32(flat, b0 * B, b1 * B, convert).view(-1, B)
            self._encode_blocks(v, scales[b0:b1], codes[self.code_bytes(b0 * B) : self.code_bytes(b1 * B)], work)
        if rest:
            tail = torch.zeros(1, B)
            tail[0, :rest].copy_(flat[nfull * B :])
            tail_codes = torch.empty(self.code_bytes(B), dtype=torch.uint8)
            self._encode_tail(tail, rest, scales[nfull:], tail_codes, work)
            start = self.code_bytes(nfull * B)
            codes[start:].copy_(tail_codes[: codes.numel() - start])
            used_bits = (n * self.code_bits) % 8
            if used_bits:  # zero the padding bits of the last byte (canonical form)
                codes[-1:].bitwise_and_((1 << used_bits) - 1)
        header = {"codec": self.name, "shape": list(shape), "block": B}
        return header, [wire_view(scales), wire_view(codes)]

    def _decode(
        self,
        header: Header,
        buffers: Sequence[Any],
        expected_shape: Sequence[int] | None = None,
    ) -> torch.Tensor:
        check_keys(header, self.name, ("block",))
        m = self.block_multiple
        B = check_int(header, "block", self.name, m, MAX_BLOCK)
        if B % m:
            raise CodecError(f"{self.name}: block {B} is not a multiple of {m}")
        shape, n = check_shape(header, self.name, expected_shape, self.max_numel)
        scale_view, code_view = byte_views(buffers, self.name, 2)
        nfull, rest = divmod(n, B)
        nblocks = nfull + (rest > 0)
        check_length(scale_view, 4 * nblocks, self.name, "scales")
        check_length(code_view, self.code_bytes(n), self.name, "codes")
        scales = WireArray(scale_view, torch.float32).read(0, nblocks)
        check_scales(scales, self.name, self.scale_limit)
        wire = WireArray(code_view, torch.uint8)
        used_bits = (n * self.code_bits) % 8
        if used_bits and int(wire.read(len(code_view) - 1, len(code_view))[0]) >> used_bits:
            raise CodecError(f"{self.name}: padding bits of the last code byte are not zero")

        out = alloc(n, torch.float32)
        per = self._blocks_per_chunk(B)
        work = Work()
        copy_scratch = torch.empty(self.code_bytes(min(nfull, per) * B), dtype=torch.uint8)
        for b0, b1 in chunks(nfull, per):
            c0, c1 = self.code_bytes(b0 * B), self.code_bytes(b1 * B)
            part = wire.read(c0, c1, copy_scratch)
            self._decode_blocks(part, scales[b0:b1], out[b0 * B : b1 * B].view(-1, B), work)
        if rest:
            start = self.code_bytes(nfull * B)
            tail_codes = torch.zeros(self.code_bytes(B), dtype=torch.uint8)
            tail_codes[: len(code_view) - start].copy_(wire.read(start, len(code_view)))
            tail = torch.empty(1, B)
            self._decode_blocks(tail_codes, scales[nfull:], tail, work)
            out[nfull * B :].copy_(tail[0, :rest])
        return out.view(shape)


def _nibble_table(values: list[float]) -> torch.Tensor:
    """Decode table: byte -> (value of low nibble, value of high nibble) as one int64 per byte.

    Gathering one 8-byte entry per code byte writes two float32 outputs at once, which is much
    faster than gathering rows of a (256, 2) float table.
    """
    v = torch.tensor(values, dtype=torch.float32)
    b = torch.arange(256)
    pairs = torch.stack([v[b & 15], v[b >> 4]], dim=1).contiguous()  # (256, 2)
    return pairs.view(torch.int64).reshape(256)


class Int8Codec(BlockCodec):
    """Blockwise absmax int8: |x - x_hat| <= max|x_block| / 254."""

    name = "int8"
    default_block = 64
    block_multiple = 1
    code_bits = 8
    scale_limit = FLT_MAX / 128

    def _blocks_per_chunk(self, block: int) -> int:
        return max(1, CHUNK // block)

    def _encode_blocks(self, v: torch.Tensor, scales: torch.Tensor, codes: torch.Tensor, work: Work) -> None:
        nb, B = v.shape
        a = work.get("a", torch.float32, nb * B).view(nb, B)
        torch.abs(v, out=a)
        torch.amax(a, dim=1, out=scales)
        inv, clamped = absmax_to_scales(scales, 127.0, self.scale_limit, self.name)
        torch.mul(v, inv, out=a)
        a.round_()
        if clamped:
            a.clamp_(-127, 127)
        codes.view(torch.int8).view(nb, B).copy_(a)

    def _decode_blocks(self, codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, work: Work) -> None:
        out.view(-1).copy_(codes.view(torch.int8))
        out.mul_(scales.unsqueeze(1))


class Uint4Codec(BlockCodec):
    """Blockwise absmax 4-bit uniform (15 levels, zero exact): |x - x_hat| <= max|x_block| / 14."""

    name = "uint4"
    default_block = 128
    block_multiple = 2
    code_bits = 4
    scale_limit = FLT_MAX / 8
    _table = _nibble_table([float(q - 8) for q in range(16)])

    def _encode_blocks(self, v: torch.Tensor, scales: torch.Tensor, codes: torch.Tensor, work: Work) -> None:
        nb, B = v.shape
        a = work.get("a", torch.float32, nb * B).view(nb, B)
        torch.abs(v, out=a)
        torch.amax(a, dim=1, out=scales)
        inv, clamped = absmax_to_scales(scales, 7.0, self.scale_limit, self.name)
        torch.mul(v, inv, out=a)
        if clamped:
            a.clamp_(-7, 7)
        # Adding 2**23 rounds to an integer (half to even) and leaves it in the low mantissa
        # bits: bits(x/s + 8 + 2**23) = 0x4B000000 + q with q = round(x/s) + 8 in 1..15. The
        # exponent part is 0 mod 256, so the low byte of bits_lo + 16 * bits_hi is the packed pair.
        a.add_(8.0 + 2.0**23)
        pairs = a.view(torch.int32).view(-1, 2)
        packed = work.get("h", torch.int32, nb * B // 2)
        torch.add(pairs[:, 0], pairs[:, 1], alpha=16, out=packed)
        codes.copy_(packed)  # int32 -> uint8 keeps the low byte

    def _decode_blocks(self, codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, work: Work) -> None:
        idx = work.get("i", torch.int32, codes.numel())
        idx.copy_(codes)
        torch.index_select(self._table, 0, idx, out=out.view(-1).view(torch.int64))
        out.mul_(scales.unsqueeze(1))


class Sign1Codec(BlockCodec):
    """1-bit sign with the per-block mean |x| as scale (signSGD / 1-bit Adam style)."""

    name = "sign1"
    default_block = 128
    block_multiple = 8
    code_bits = 1
    scale_limit = FLT_MAX
    # byte -> its 8 values (bit j, LSB first): -1 for a set bit, +1 for a clear one
    _table = 1.0 - 2.0 * ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).to(torch.float32)

    def _encode_blocks(self, v: torch.Tensor, scales: torch.Tensor, codes: torch.Tensor, work: Work) -> None:
        nb, B = v.shape
        a = work.get("a", torch.float32, nb * B).view(nb, B)
        torch.abs(v, out=a)
        torch.sum(a, dim=1, out=scales)
        scales.div_(B)
        if not math.isfinite(float(scales.numpy().max())):
            # Either NaN/inf input, or a sum of finite values near FLT_MAX that overflowed.
            check_finite_input(*minmax(a.view(-1)), self.name)
            torch.sum(a.div_(B), dim=1, out=scales)
        negative = work.get("n", torch.bool, nb * B).numpy()
        np.less(v.numpy().reshape(-1), 0.0, out=negative)  # numpy: ~10x torch.lt into bool
        codes.numpy()[:] = np.packbits(negative, bitorder="little")

    def _encode_tail(self, v: torch.Tensor, used: int, scales: torch.Tensor, codes: torch.Tensor, work: Work) -> None:
        self._encode_blocks(v, scales, codes, work)
        # The mean over the real values, not the zero padding (clamped: rounding must not overflow).
        scales.mul_(v.shape[1] / used).clamp_(max=FLT_MAX)

    def _decode_blocks(self, codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, work: Work) -> None:
        idx = work.get("i", torch.int32, codes.numel())
        idx.copy_(codes)
        torch.index_select(self._table, 0, idx, out=out.view(-1, 8))
        out.mul_(scales.unsqueeze(1))
