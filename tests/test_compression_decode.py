"""Decoding what a peer sent: the documented layouts, malformed messages, and fuzzing.

- An independent numpy reader of each documented wire layout (module docstrings / PROTOCOL.md)
  must agree bit for bit with ``decode``, also on codes no encoder emits.
- Every malformed header or buffer raises ``CodecError``, nothing else.
- Hypothesis: whatever the header and buffers, ``decode`` returns a finite float32 tensor of the
  header's shape or raises ``CodecError``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compression.base import CodecError, codec_names, decode_any, get_codec
from compression.error_feedback import ErrorFeedbackReceiver

FLT_MAX = float(np.finfo(np.float32).max)


# ---------------------------------------------------------------------------------------------
# An independent reader of the documented layouts
# ---------------------------------------------------------------------------------------------


def reference_decode(header: dict, buffers: list[bytes]) -> np.ndarray:
    name, shape = header["codec"], tuple(header["shape"])
    n = math.prod(shape)
    if name == "fp32":
        out = np.frombuffer(buffers[0], "<f4").copy()
    elif name == "fp16":
        out = np.frombuffer(buffers[0], "<f2").astype(np.float32)
    elif name == "bf16":
        out = (np.frombuffer(buffers[0], "<u2").astype(np.uint32) << 16).view(np.float32)
    elif name in ("int8", "uint4", "e3m0", "sign1"):
        block = header["block"]
        scale = np.repeat(np.frombuffer(buffers[0], "<f4"), block)[:n]
        raw = np.frombuffer(buffers[1], np.uint8)
        if name == "int8":
            out = raw.view(np.int8).astype(np.float32) * scale
        elif name == "sign1":
            bits = np.unpackbits(raw, bitorder="little")[:n]
            out = np.where(bits == 1, -scale, scale)
        else:
            nib = np.stack([raw & 15, raw >> 4], axis=1).reshape(-1)[:n].astype(np.int64)
            if name == "uint4":
                unit = (nib - 8).astype(np.float32)
            else:
                k, sign = nib & 7, nib >> 3
                unit = np.where(k == 7, 0.0, np.where(sign == 1, -1.0, 1.0) * 2.0 ** (-k)).astype(np.float32)
            out = unit * scale
    elif name == "topk":
        out = np.zeros(n, np.float32)
        out[np.frombuffer(buffers[0], "<u4").astype(np.int64)] = np.frombuffer(buffers[1], "<f4")
    elif name == "spsa_byte":
        c = np.frombuffer(buffers[0], np.int8).astype(np.float64)
        out = np.where(c == 0, 0.0, np.sign(c) * np.exp((np.abs(c) - 64) / 16)).astype(np.float32)
    else:
        raise AssertionError(name)
    return out.astype(np.float32).reshape(shape)


def _message(name: str, n: int, seed: int) -> tuple[dict, list[bytes]]:
    options = {"ratio": 0.2} if name == "topk" else {}
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 4
    header, buffers = get_codec(name, **options).encode(x)
    return header, [bytes(b) for b in buffers]


@pytest.mark.parametrize("name", codec_names())
@pytest.mark.parametrize("n", [1, 9, 200, 1001])
def test_reference_reader_agrees_on_encoded(name: str, n: int) -> None:
    header, buffers = _message(name, n, seed=n)
    got = get_codec(name).decode(header, buffers).numpy()
    assert np.array_equal(got, reference_decode(header, buffers))


@pytest.mark.parametrize("name", ["int8", "uint4", "e3m0", "sign1", "spsa_byte"])
def test_reference_reader_agrees_on_every_code(name: str) -> None:
    """Random code bytes, including codes encoders never emit (int8 -128, uint4 0, e3m0 -0)."""
    rng = np.random.default_rng(0)
    n = 4096
    if name == "spsa_byte":
        codes = rng.integers(-127, 128, n).astype(np.int8).tobytes()
        header, buffers = {"codec": name, "shape": [n]}, [codes]
    else:
        block = 8 if name == "sign1" else 16
        bits = {"int8": 8, "uint4": 4, "e3m0": 4, "sign1": 1}[name]
        scales = rng.uniform(0, 10, n // block).astype("<f4").tobytes()
        codes = rng.integers(0, 256, n * bits // 8).astype(np.uint8).tobytes()
        header, buffers = {"codec": name, "shape": [n], "block": block}, [scales, codes]
    got = get_codec(name).decode(header, buffers).numpy()
    assert np.array_equal(got, reference_decode(header, buffers))


# ---------------------------------------------------------------------------------------------
# Malformed messages
# ---------------------------------------------------------------------------------------------

GENERIC_HEADER_BREAKS = [
    ("not a dict", lambda h: None),
    ("a list", lambda h: list(h.items())),
    ("extra field", lambda h: {**h, "extra": 1}),
    ("other codec", lambda h: {**h, "codec": "other" if h["codec"] != "other" else "x"}),
    ("codec not a str", lambda h: {**h, "codec": 5}),
    ("shape a str", lambda h: {**h, "shape": "3"}),
    ("shape negative", lambda h: {**h, "shape": [-1]}),
    ("shape float", lambda h: {**h, "shape": [float(h["shape"][0])]}),
    ("shape bool", lambda h: {**h, "shape": [True]}),
    ("shape nested", lambda h: {**h, "shape": [h["shape"]]}),
    ("shape 17-d", lambda h: {**h, "shape": [1] * 17}),
    ("shape too big", lambda h: {**h, "shape": [1 << 40]}),
    ("shape product too big", lambda h: {**h, "shape": [1 << 20, 1 << 20, 0]}),
    ("shape grows", lambda h: {**h, "shape": [h["shape"][0] + 1]}),
    ("shape shrinks", lambda h: {**h, "shape": [h["shape"][0] - 1]}),
]

SPECIFIC_BREAKS = {
    "fp32": [("dtype", lambda h, b: ({**h, "dtype": "float16"}, b)),
             ("NaN payload", lambda h, b: (h, [_set_f32(b[0], 3, float("nan"))])),
             ("inf payload", lambda h, b: (h, [_set_f32(b[0], 0, float("inf"))]))],
    "fp16": [("dtype", lambda h, b: ({**h, "dtype": "float32"}, b)),
             ("inf payload", lambda h, b: (h, [_set_bytes(b[0], 0, np.array([0x7C00], "<u2").tobytes())]))],
    "bf16": [("dtype missing", lambda h, b: ({k: v for k, v in h.items() if k != "dtype"}, b)),
             ("NaN payload", lambda h, b: (h, [_set_bytes(b[0], 2, np.array([0x7FC0], "<u2").tobytes())]))],
    "topk": [("k too big", lambda h, b: ({**h, "k": h["shape"][0] + 1}, b)),
             ("k negative", lambda h, b: ({**h, "k": -1}, b)),
             ("k bool", lambda h, b: ({**h, "k": True}, b)),
             ("k disagrees", lambda h, b: ({**h, "k": h["k"] - 1}, b)),
             ("unsorted", lambda h, b: (h, [_swap_u32(b[0]), b[1]])),
             ("duplicate", lambda h, b: (h, [_dup_u32(b[0]), b[1]])),
             ("out of range", lambda h, b: (h, [_set_bytes(b[0], len(b[0]) - 4, np.array([h["shape"][0]], "<u4").tobytes()), b[1]])),
             ("NaN value", lambda h, b: (h, [b[0], _set_f32(b[1], 0, float("nan"))]))],
    "spsa_byte": [("code -128", lambda h, b: (h, [_set_bytes(b[0], 5, b"\x80")]))],
}
for _name, _limit in [("int8", FLT_MAX / 128), ("uint4", FLT_MAX / 8), ("e3m0", None), ("sign1", None)]:
    SPECIFIC_BREAKS[_name] = [
        ("block 0", lambda h, b: ({**h, "block": 0}, b)),
        ("block huge", lambda h, b: ({**h, "block": 1 << 17}, b)),
        ("block str", lambda h, b: ({**h, "block": "64"}, b)),
        ("block float", lambda h, b: ({**h, "block": 64.0}, b)),
        ("block changed", lambda h, b: ({**h, "block": h["block"] * 2}, b)),
        ("scale NaN", lambda h, b: (h, [_set_f32(b[0], 0, float("nan")), b[1]])),
        ("scale inf", lambda h, b: (h, [_set_f32(b[0], 1, float("inf")), b[1]])),
        ("scale negative", lambda h, b: (h, [_set_f32(b[0], 0, -1.0), b[1]])),
    ]
    if _name != "int8":  # whole bytes per value: no padding
        SPECIFIC_BREAKS[_name].append(("padding bits", lambda h, b: (h, [b[0], _set_bytes(b[1], len(b[1]) - 1, b"\xff")])))
    if _limit is not None:
        SPECIFIC_BREAKS[_name].append(("scale over limit", lambda h, b, lim=_limit: (h, [_set_f32(b[0], 0, lim * 1.001), b[1]])))
SPECIFIC_BREAKS["uint4"].append(("odd block", lambda h, b: ({**h, "block": 127}, b)))
SPECIFIC_BREAKS["e3m0"].append(("odd block", lambda h, b: ({**h, "block": 127}, b)))
SPECIFIC_BREAKS["sign1"].append(("block not multiple of 8", lambda h, b: ({**h, "block": 132}, b)))


def _set_bytes(buf: bytes, at: int, value: bytes) -> bytes:
    out = bytearray(buf)
    out[at : at + len(value)] = value
    return bytes(out)


def _set_f32(buf: bytes, index: int, value: float) -> bytes:
    return _set_bytes(buf, 4 * index, np.array([value], "<f4").tobytes())


def _swap_u32(buf: bytes) -> bytes:
    a = np.frombuffer(buf, "<u4").copy()
    a[[0, 1]] = a[[1, 0]]
    return a.tobytes()


def _dup_u32(buf: bytes) -> bytes:
    a = np.frombuffer(buf, "<u4").copy()
    a[1] = a[0]
    return a.tobytes()


# 203 values: odd (a 4-bit / 1-bit padding nibble), two blocks and a short one for block 64..128.
N_MALFORMED = 203


@pytest.mark.parametrize("name", codec_names())
@pytest.mark.parametrize("what,breaker", GENERIC_HEADER_BREAKS, ids=[w for w, _ in GENERIC_HEADER_BREAKS])
def test_malformed_header_rejected(name: str, what: str, breaker) -> None:
    header, buffers = _message(name, N_MALFORMED, seed=1)
    expected = (N_MALFORMED,) if "shape" in what and ("grows" in what or "shrinks" in what) else None
    with pytest.raises(CodecError):
        get_codec(name).decode(breaker(header), buffers, expected_shape=expected)


@pytest.mark.parametrize("name", codec_names())
def test_malformed_buffers_rejected(name: str) -> None:
    header, buffers = _message(name, N_MALFORMED, seed=2)
    codec = get_codec(name)
    broken = [
        bytes(buffers[0]),              # not a list
        buffers[:-1],                   # one buffer short
        buffers + [b""],                # one too many
        [None] + buffers[1:],           # not bytes-like
        [5] + buffers[1:],
        ["text"] + buffers[1:],
        [np.frombuffer(buffers[0] * 2, np.uint8)[::2]] + buffers[1:],  # not contiguous
    ]
    for i in range(len(buffers)):
        broken.append(buffers[:i] + [buffers[i][:-1]] + buffers[i + 1 :])   # truncated
        broken.append(buffers[:i] + [buffers[i] + b"\0"] + buffers[i + 1 :])  # extended
    for b in broken:
        with pytest.raises(CodecError):
            codec.decode(header, b)
    with pytest.raises(CodecError, match="does not match the expected"):
        codec.decode(header, buffers, expected_shape=(N_MALFORMED + 1,))
    with pytest.raises(CodecError, match="max_numel"):
        get_codec(name, max_numel=N_MALFORMED - 1).decode(header, buffers)


@pytest.mark.parametrize(
    "name,what,breaker",
    [(n, w, f) for n, cases in SPECIFIC_BREAKS.items() for w, f in cases],
    ids=[f"{n}-{w}" for n, cases in SPECIFIC_BREAKS.items() for w, _ in cases],
)
def test_malformed_codec_fields_rejected(name: str, what: str, breaker) -> None:
    header, buffers = _message(name, N_MALFORMED, seed=3)
    get_codec(name).decode(header, buffers)  # the unbroken message decodes
    bad_header, bad_buffers = breaker(dict(header), list(buffers))
    with pytest.raises(CodecError):
        get_codec(name).decode(bad_header, bad_buffers)


def test_decode_any_rejects_unknown_codec() -> None:
    for header in ({"codec": "fp64", "shape": [1]}, {"shape": [1]}, "fp32", None):
        with pytest.raises(CodecError):
            decode_any(header, [b"\0\0\0\0"])


def test_huge_claims_fail_fast() -> None:
    """A header claiming 2**27 values with tiny buffers is refused before allocating anything."""
    for name in codec_names():
        header, buffers = _message(name, 16, seed=4)
        header = {**header, "shape": [1 << 27]}
        if name == "topk":
            # topk's size is not implied by its buffers: it is bounded by max_numel / expected_shape
            with pytest.raises(CodecError):
                get_codec(name, max_numel=1 << 20).decode(header, buffers)
            with pytest.raises(CodecError):
                get_codec(name).decode(header, buffers, expected_shape=(16,))
        else:
            with pytest.raises(CodecError):
                get_codec(name).decode(header, buffers)


# ---------------------------------------------------------------------------------------------
# Fuzzing
# ---------------------------------------------------------------------------------------------

_values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 300),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6), st.binary(max_size=6),
    st.lists(st.integers(-2, 2**34), max_size=4), st.lists(st.integers(0, 40), max_size=3),
)
_fields = st.sampled_from(["codec", "shape", "block", "k", "dtype", "ef21_seq", "other"])


def _assert_ok_or_codec_error(decode, header, buffers) -> None:
    try:
        out = decode(header, buffers)
    except CodecError:
        return
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert list(out.shape) == list(header["shape"])
    assert bool(torch.isfinite(out).all())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(codec_names()),
    fields=st.dictionaries(_fields, _values, max_size=5),
    buffers=st.lists(st.binary(max_size=64), max_size=3),
)
def test_fuzz_arbitrary_messages(name: str, fields: dict, buffers: list[bytes]) -> None:
    header = {"codec": name, **fields}
    _assert_ok_or_codec_error(get_codec(name).decode, header, buffers)
    _assert_ok_or_codec_error(decode_any, header, buffers)
    _assert_ok_or_codec_error(ErrorFeedbackReceiver().decode, header, buffers)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(codec_names()),
    n=st.integers(0, 300),
    field=st.one_of(st.none(), _fields),
    value=_values,
    flips=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10**6), st.integers(1, 255)), max_size=4),
    cut=st.one_of(st.none(), st.tuples(st.integers(0, 2), st.integers(-3, 3))),
)
def test_fuzz_mutated_messages(name, n, field, value, flips, cut) -> None:
    header, buffers = _message(name, n, seed=n)
    buffers = [bytearray(b) for b in buffers]
    if field is not None:
        header[field] = value
    for which, at, xor in flips:
        if which < len(buffers) and buffers[which]:
            buffers[which][at % len(buffers[which])] ^= xor
    if cut is not None and cut[0] < len(buffers):
        which, delta = cut
        buffers[which] = buffers[which][: max(0, len(buffers[which]) + delta)] if delta < 0 else buffers[which] + bytes(delta)
    _assert_ok_or_codec_error(get_codec(name).decode, header, buffers)
