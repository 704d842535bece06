"""The codec interface, its error, and the registry of built-in codecs.

A codec turns a float tensor into a wire message and back:

    header, buffers = codec.encode(x)            # header: msgpack-able dict; buffers: memoryviews
    y = codec.decode(header, buffers, expected_shape=x.shape)   # float32 tensor, x's shape

The header holds only str keys and int/float/str/list values, so it can be msgpack-ed as is;
buffers are flat byte views (``memoryview`` of format ``"B"``) that a transport can send without
copying. Every header carries ``"codec"`` (the codec's name) and ``"shape"`` (list of ints); the
other fields and the buffer layout of each codec are documented in its module and collected in
PROTOCOL.md ("Tensor encodings"). All multi-byte numbers on the wire are little-endian.

Built-in codecs (``codec_names()``), with their nominal bits per value including scales:

    name       module                     bits/value  what it is
    fp32       compression.floats         32          identity (zero-copy for contiguous float32 input)
    fp16       compression.floats         16          IEEE half, saturating at +-65504
    bf16       compression.floats         16          bfloat16, round-to-nearest-even
    int8       compression.blockwise      8.5         absmax int8 per block of 64, fp32 scale
    uint4      compression.blockwise      4.25        absmax 4-bit uniform per block of 128, fp32 scale
    e3m0       compression.e3m0           4.25        sign + 3-bit power-of-two exponent, block 128
    sign1      compression.blockwise      1.25        sign bit with a per-block mean-|x| scale, block 128
    topk       compression.topk           64*ratio    the k largest |x|: uint32 indices + fp32 values
    spsa_byte  compression.spsa_byte      8           one signed log-byte per scalar (ALGORITHMS.md §4)

Decoding is the one place where peer bytes meet tensors, so ``decode`` checks everything (header
keys and types, shape against ``expected_shape`` and ``max_numel``, buffer count and lengths, scale
values) before it allocates, and raises ``CodecError`` on anything wrong. A successful decode
always returns a new, finite float32 tensor. Encoding refuses non-finite input with ``ValueError``
(a NaN must never reach a peer) and non-float input with ``TypeError``.

Codecs are stateless and thread-safe; run large encodes/decodes in a worker thread. They work
over cache-sized chunks on one core: ``encode``/``decode`` pin the calling thread to one torch
intra-op thread for the call (``layout.one_thread``), because intra-op threads competing with
training for the same cores stall the codec tenfold.
"""

from __future__ import annotations

import abc
import functools
import sys
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from compression.layout import one_thread
from gossip.errors import RemoteProtocolError

if sys.byteorder != "little":  # the kernels reinterpret native memory as little-endian wire bytes
    raise ImportError("compression/ supports little-endian hosts only")

# Default ceiling on the element count a decode may allocate, when the caller passes no
# expected_shape: 2**28 values = 1 GiB of float32. Override per codec with get_codec(max_numel=).
DEFAULT_MAX_NUMEL = 1 << 28
# Hard ceiling for max_numel: indices on the wire are uint32.
MAX_NUMEL_LIMIT = (1 << 32) - 1
# The most dimensions a shape on the wire may have.
MAX_NDIM = 16

Header = dict[str, Any]


class CodecError(RemoteProtocolError):
    """A received tensor message is malformed: bad header, wrong shape, short buffer, bad scale.

    It is a ``RemoteProtocolError`` because the bytes came from a peer; the message is dropped
    and nothing of it is used.
    """


class Codec(abc.ABC):
    """A tensor codec. Subclasses set ``name`` and ``lossless`` and implement the two methods.

    ``bits_per_value`` is the nominal wire size per value including per-block scales but not
    the msgpack header (a few dozen bytes per message).
    """

    name: ClassVar[str]
    lossless: ClassVar[bool]
    bits_per_value: float
    max_numel: int

    def __init__(self, *, max_numel: int = DEFAULT_MAX_NUMEL) -> None:
        if isinstance(max_numel, bool) or not isinstance(max_numel, int):
            raise ValueError(f"max_numel must be an int, got {max_numel!r}")
        if not 1 <= max_numel <= MAX_NUMEL_LIMIT:
            raise ValueError(f"max_numel must be in [1, 2**32 - 1], got {max_numel}")
        self.max_numel = max_numel

    def encode(self, x: torch.Tensor | np.ndarray) -> tuple[Header, list[memoryview]]:
        """Encode ``x`` (any float dtype, any shape, any strides, CPU or accelerator)."""
        with one_thread():
            return self._encode(x)

    def decode(
        self,
        header: Header,
        buffers: Sequence[Any],
        expected_shape: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Decode a message into a new float32 CPU tensor; ``CodecError`` if it is malformed."""
        with one_thread():
            return self._decode(header, buffers, expected_shape)

    @abc.abstractmethod
    def _encode(self, x: torch.Tensor | np.ndarray) -> tuple[Header, list[memoryview]]:
        """The codec's encoder (called on one intra-op thread)."""

    @abc.abstractmethod
    def _decode(self, header: Header, buffers: Sequence[Any], expected_shape: Sequence[int] | None) -> torch.Tensor:
        """The codec's decoder (called on one intra-op thread)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bits_per_value={self.bits_per_value:g})"


@functools.cache
def _builtin_codecs() -> dict[str, type[Codec]]:
    # Imported here, not at module top, because those modules import this one.
    from compression.blockwise import Int8Codec, Sign1Codec, Uint4Codec
    from compression.e3m0 import E3M0Codec
    from compression.floats import Bf16Codec, Fp16Codec, Fp32Codec
    from compression.spsa_byte import SpsaByteCodec
    from compression.topk import TopKCodec

    classes: list[type[Codec]] = [
        Fp32Codec, Fp16Codec, Bf16Codec, Int8Codec, Uint4Codec, E3M0Codec, Sign1Codec,
        TopKCodec, SpsaByteCodec,
    ]
    return {cls.name: cls for cls in classes}


def codec_names() -> list[str]:
    """Names accepted by ``get_codec``, in the order of the table above."""
    return list(_builtin_codecs())


def get_codec(name: str, **options: Any) -> Codec:
    """A new codec by name; ``options`` go to its constructor (e.g. ``block=``, ``ratio=``)."""
    registry = _builtin_codecs()
    cls = registry.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown codec {name!r}; valid names: {', '.join(registry)}")
    return cls(**options)


def decode_any(
    header: Header,
    buffers: Sequence[Any],
    expected_shape: Sequence[int] | None = None,
    *,
    max_numel: int = DEFAULT_MAX_NUMEL,
) -> torch.Tensor:
    """Decode a message with whichever built-in codec its header names (default options).

    For receivers that accept any codec: the block size and k travel in the header, so the
    default-constructed codec decodes what any configuration of it encoded.
    """
    if not isinstance(header, dict):
        raise CodecError(f"header must be a dict, got {type(header).__name__}")
    name = header.get("codec")
    registry = _builtin_codecs()
    if not isinstance(name, str) or name not in registry:
        raise CodecError(f"unknown codec {name!r} in header; valid names: {', '.join(registry)}")
    return registry[name](max_numel=max_numel).decode(header, buffers, expected_shape)
