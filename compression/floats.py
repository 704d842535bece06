"""Plain float codecs: fp32 (identity), fp16 and bf16.

Wire format (all three):

    header  {"codec": "fp32" | "fp16" | "bf16", "shape": [d0, d1, ...],
             "dtype": "float32" | "float16" | "bfloat16"}
    buffers [data]   data: numel little-endian values of that dtype, row-major (C order)

Encoding rounds to nearest-even and saturates values beyond the wire type's largest finite value
(fp16: +-65504, bf16: +-3.3895e38, fp32 from float64: +-3.4028e38) instead of sending infinity;
NaN or infinite input is refused with ValueError. Decoding always returns float32 (a new tensor)
and rejects a payload that holds NaN or infinity.

fp32 encoding of a contiguous float32 CPU tensor or array is zero-copy: the data buffer aliases
the input, so do not modify the input until the buffers have been sent.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from compression.base import DEFAULT_MAX_NUMEL, Codec, CodecError, Header
from compression.checks import WireArray, byte_views, check_keys, check_length, check_shape, check_str
from compression.layout import CHUNK, alloc, as_flat_input, check_finite_input, chunks, is_finite_range, minmax, wire_view


class _FloatCodec(Codec):
    wire_dtype: ClassVar[torch.dtype]
    dtype_name: ClassVar[str]

    def __init__(self, *, max_numel: int = DEFAULT_MAX_NUMEL) -> None:
        super().__init__(max_numel=max_numel)
        info = torch.finfo(self.wire_dtype)
        self.bits_per_value = float(info.bits)
        self._max = float(info.max)  # saturation bound

    def _encode(self, x: torch.Tensor | np.ndarray) -> tuple[Header, list[memoryview]]:
        flat, shape = as_flat_input(x)
        n = flat.numel()
        if flat.dtype == self.wire_dtype:
            data = flat  # zero-copy: only check that every value is finite
            for a, b in chunks(n, CHUNK):
                check_finite_input(*minmax(flat[a:b]), self.name)
        else:
            data = alloc(n, self.wire_dtype)
            for a, b in chunks(n, CHUNK):
                src = flat[a:b]
                lo, hi = minmax(src)
                check_finite_input(lo, hi, self.name)
                if hi > self._max or lo < -self._max:
                    src = src.clamp(-self._max, self._max)
                data[a:b].copy_(src)
        header = {"codec": self.name, "shape": list(shape), "dtype": self.dtype_name}
        return header, [wire_view(data)]

    def _decode(
        self,
        header: Header,
        buffers: Sequence[Any],
        expected_shape: Sequence[int] | None = None,
    ) -> torch.Tensor:
        check_keys(header, self.name, ("dtype",))
        check_str(header, "dtype", self.name, (self.dtype_name,))
        shape, n = check_shape(header, self.name, expected_shape, self.max_numel)
        (view,) = byte_views(buffers, self.name, 1)
        itemsize = torch.empty((), dtype=self.wire_dtype).element_size()
        check_length(view, n * itemsize, self.name, "data")
        wire = WireArray(view, self.wire_dtype)
        out = alloc(n, torch.float32)
        scratch = torch.empty(min(n, CHUNK) * itemsize, dtype=torch.uint8)
        for a, b in chunks(n, CHUNK):
            chunk = out[a:b]
            wire.read_into(a, b, chunk, scratch)
            if not is_finite_range(*minmax(chunk)):
                raise CodecError(f"{self.name}: payload contains NaN or infinity")
        return out.view(shape)


class Fp32Codec(_FloatCodec):
    """Identity: float32 values as they are."""

    name = "fp32"
    lossless = True
    wire_dtype = torch.float32
    dtype_name = "float32"


class Fp16Codec(_FloatCodec):
    """IEEE binary16: relative error <= 2**-11 for |x| in [6.1e-5, 65504]; saturates above."""

    name = "fp16"
    lossless = False
    wire_dtype = torch.float16
    dtype_name = "float16"


class Bf16Codec(_FloatCodec):
    """bfloat16 (float32's range, 8-bit significand): relative error <= 2**-8 for normal values."""

    name = "bf16"
    lossless = False
    wire_dtype = torch.bfloat16
    dtype_name = "bfloat16"
