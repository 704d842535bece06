"""Every codec through one conformance function, plus golden bytes and bounds per codec.

The conformance checks: 0-d and empty tensors, sizes not divisible by the block, sizes that
cross chunk boundaries, non-contiguous / numpy / fp16 / bf16 / float64 input, all zeros, huge
values, the round-trip error bound each codec states, msgpack-able headers, and that decode
reads every kind of bytes-like buffer the same way.
"""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
import torch

from compression.base import Codec, codec_names, decode_any, get_codec
from compression.layout import CHUNK

FLT_MAX = float(np.finfo(np.float32).max)
EPS32 = 2.0**-24

# (name, options): every built-in codec with its defaults, plus non-default blocks / ratios.
CODEC_SPECS = [(name, {}) for name in codec_names()] + [
    ("int8", {"block": 7}),
    ("uint4", {"block": 6}),
    ("e3m0", {"block": 32}),
    ("sign1", {"block": 8}),
    ("topk", {"ratio": 0.3}),
]
IDS = [f"{n}{'-' + '-'.join(f'{k}{v}' for k, v in o.items()) if o else ''}" for n, o in CODEC_SPECS]

SHAPES = [(), (0,), (3, 0, 2), (1,), (7,), (63,), (65,), (129,), (5, 13), (2, 3, 4, 5), (3001,)]


# ---------------------------------------------------------------------------------------------
# Per-codec error bounds (float64 reference x, float32 decoded y): True where y is acceptable.
# ---------------------------------------------------------------------------------------------


def _block_stat(x: torch.Tensor, block: int, stat: str) -> torch.Tensor:
    """Per-element max|x| or mean|x| of its block (float64; the last block may be short)."""
    n = x.numel()
    a = x.abs().reshape(-1)
    nfull = n // block
    full = a[: nfull * block].view(nfull, block)
    parts = [full.amax(1) if stat == "max" else full.mean(1)]
    if n % block:
        tail = a[nfull * block :]
        parts.append((tail.max() if stat == "max" else tail.mean()).reshape(1))
    per_block = torch.cat(parts)
    return per_block.repeat_interleave(block)[:n]


def within_bound(codec: Codec, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.double().reshape(-1)
    y = y.double().reshape(-1)
    err = (y - x).abs()
    slack = 4 * EPS32 * x.abs()
    name = codec.name
    if name == "fp32":
        return y == x
    if name in ("fp16", "bf16"):
        info = torch.finfo(torch.float16 if name == "fp16" else torch.bfloat16)
        rel, tiny = (2.0**-11, 2.0**-25) if name == "fp16" else (2.0**-8, 2.0**-134)
        inside = x.abs() <= info.max
        return torch.where(inside, err <= rel * x.abs() + tiny, y == x.sign() * info.max)
    if name in ("int8", "uint4", "e3m0"):
        amax = _block_stat(x, codec.block, "max")
        if name == "int8":
            bound = amax / 254 * (1 + 1e-6) + 127 * 2.0**-126
        elif name == "uint4":
            bound = amax / 14 * (1 + 1e-6) + 7 * 2.0**-126
        else:
            bound = torch.maximum(x.abs() / 3, 0.0118 * amax) * (1 + 1e-6) + 2.0**-126
        return err <= bound + slack + 4 * EPS32 * amax
    if name == "sign1":
        mean = _block_stat(x, codec.block, "mean")
        expected = torch.where(x < 0, -mean, mean)
        return (y - expected).abs() <= 1e-5 * mean + 1e-38
    if name == "topk":
        kept = y != 0
        return torch.where(kept, y == x.float().double(), torch.ones_like(kept))
    if name == "spsa_byte":
        lo, hi = math.exp(-63.5 / 16), math.exp(63.5 / 16)
        inside = (x.abs() >= lo) & (x.abs() <= hi)
        small = (x != 0) & (x.abs() < lo)
        ok_in = (err <= (math.exp(1 / 32) - 1) * x.abs() * (1 + 1e-6)) & (y.sign() == x.sign())
        ok_small = (y - x.sign() * math.exp(-63 / 16)).abs() <= 1e-6
        ok_big = (y - x.sign() * math.exp(63 / 16)).abs() <= 1e-5
        ok_zero = y == 0
        return torch.where(inside, ok_in, torch.where(small, ok_small, torch.where(x == 0, ok_zero, ok_big)))
    raise AssertionError(f"no bound for {name}")


def check_topk_selection(codec: Codec, x: torch.Tensor, y: torch.Tensor) -> None:
    """The kept entries are the largest |x| (ties aside), exactly k of them unless zeros ran out."""
    x, y = x.reshape(-1).float(), y.reshape(-1)
    kept = y != 0
    nonzero = int((x != 0).sum())
    assert int(kept.sum()) == min(codec.k_for(x.numel()), nonzero)
    if bool(kept.any()) and bool((~kept).any()):
        assert float(x[kept].abs().min()) >= float(x[~kept].abs().max())


# ---------------------------------------------------------------------------------------------
# The conformance function
# ---------------------------------------------------------------------------------------------


def roundtrip(codec: Codec, x, expected_shape=None):
    header, buffers = codec.encode(x)
    # The header goes on the wire as msgpack: only str keys and plain values.
    assert msgpack.unpackb(msgpack.packb(header), raw=False) == header
    assert all(isinstance(k, str) for k in header)
    assert header["codec"] == codec.name
    for b in buffers:
        assert isinstance(b, memoryview) and b.format == "B" and b.ndim == 1
    y = codec.decode(header, buffers, expected_shape=expected_shape)
    assert y.dtype == torch.float32
    assert bool(torch.isfinite(y).all())
    return header, buffers, y


def assert_conforms(codec: Codec, x: torch.Tensor) -> None:
    """Round trip of x in several input forms; all within the codec's bound, all identical."""
    header, buffers, y = roundtrip(codec, x, expected_shape=x.shape)
    assert tuple(y.shape) == tuple(x.shape)
    assert bool(within_bound(codec, x, y).all()), f"{codec.name}: error bound violated"
    if codec.name == "topk":
        check_topk_selection(codec, x, y)
    wire = [bytes(b) for b in buffers]

    # The same values given as numpy, as a non-contiguous view, and as float64 encode identically.
    variants = [x.numpy(), x.double()]
    if x.dim() >= 2:
        variants.append(x.transpose(0, 1).contiguous().transpose(0, 1))
    if x.numel() > 1:
        wide = torch.zeros(x.numel(), 2)
        wide[:, 0] = x.reshape(-1)
        variants.append(wide[:, 0].view(x.shape))  # stride 2
    for v in variants:
        h2, b2 = codec.encode(v)
        assert h2 == header and [bytes(b) for b in b2] == wire

    # Decoding from bytes, bytearray, numpy and unaligned memoryview slices gives the same tensor.
    for make in (bytes, bytearray, lambda b: np.frombuffer(bytes(b), np.uint8), _unaligned):
        y2 = codec.decode(header, [make(b) for b in wire], expected_shape=x.shape)
        assert torch.equal(y2, y)
    # decode_any picks the codec from the header.
    assert torch.equal(decode_any(header, wire, x.shape), y)

    # fp16 / bf16 input: bounded against the values it actually holds.
    for dt in (torch.float16, torch.bfloat16):
        xs = x.clamp(-60000, 60000).to(dt)
        _, _, ys = roundtrip(codec, xs, expected_shape=x.shape)
        assert bool(within_bound(codec, xs, ys).all()), f"{codec.name}: {dt} input"


def _unaligned(b: bytes) -> memoryview:
    """The bytes at an odd address inside a larger writable buffer."""
    store = bytearray(len(b) + 1)
    store[1:] = b
    return memoryview(store)[1:]


@pytest.fixture(params=CODEC_SPECS, ids=IDS)
def codec(request) -> Codec:
    name, options = request.param
    return get_codec(name, **options)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_conformance_random(codec: Codec, shape) -> None:
    g = torch.Generator().manual_seed(sum(shape) + 1)
    x = torch.randn(shape, generator=g) * 3
    if x.numel() > 4:
        x.view(-1)[:: 5] = 0.0  # exact zeros among the values
    assert_conforms(codec, x)


def test_conformance_all_zeros(codec: Codec) -> None:
    x = torch.zeros(3, 100)
    _, _, y = roundtrip(codec, x, expected_shape=x.shape)
    assert torch.equal(y, x)
    assert_conforms(codec, x)


def test_conformance_scales(codec: Codec) -> None:
    """Tiny, huge, mixed-magnitude and heavy-tailed values stay within the bound."""
    g = torch.Generator().manual_seed(7)
    for scale in (1e-30, 1e-3, 1e30):
        assert_conforms(codec, torch.randn(300, generator=g) * scale)
    mixed = torch.randn(257, generator=g) * torch.logspace(-20, 20, 257)
    assert_conforms(codec, mixed)
    heavy = torch.randn(1000, generator=g) / torch.empty(1000).exponential_(generator=g).sqrt()
    assert_conforms(codec, heavy)


def test_conformance_extremes(codec: Codec) -> None:
    """Values at float32's limits: decode stays finite and keeps the signs of the largest."""
    x = torch.tensor([FLT_MAX, -FLT_MAX, 3.0e38, 1.0, -2.0**-149, 0.0, 1e-40] * 10)
    header, buffers, y = roundtrip(codec, x)
    big = x.abs() >= 3.0e38
    if codec.name == "topk":
        big &= y != 0  # topk drops all but k of them
        check_topk_selection(codec, x, y)
    assert bool((y[big].sign() == x[big].sign()).all())
    if codec.name in ("int8", "uint4"):
        # The scale is clamped so that every code decodes finite (int8: FLT_MAX / 128, uint4:
        # FLT_MAX / 8), which costs up to 1/128 and 1/8 of the value at the very top of the range.
        rel = ((y[big].double() - x[big].double()).abs() / x[big].double().abs()).max()
        assert float(rel) <= (1 / 128 if codec.name == "int8" else 1 / 8) + 1e-6
    else:
        assert bool(within_bound(codec, x, y).all())


def test_conformance_crosses_chunks(codec: Codec) -> None:
    """A tensor of two chunks and a bit: chunk seams and the short last block decode right."""
    x = torch.randn(2 * CHUNK + 9, generator=torch.Generator().manual_seed(5))
    header, buffers, y = roundtrip(codec, x, expected_shape=x.shape)
    assert bool(within_bound(codec, x, y).all())
    if codec.name == "topk":
        check_topk_selection(codec, x, y)
    assert torch.equal(codec.decode(header, [bytes(b) for b in buffers]), y)


def test_bits_per_value_matches_buffers(codec: Codec) -> None:
    n = 64 * 1024
    x = torch.randn(n, generator=torch.Generator().manual_seed(3))
    header, buffers = codec.encode(x)
    bits = 8 * sum(len(b) for b in buffers) / n
    if codec.name == "topk":
        assert bits == pytest.approx(64 * codec.k_for(n) / n)
    else:
        assert bits == pytest.approx(codec.bits_per_value, rel=1e-3)


def test_encode_refuses_bad_input(codec: Codec) -> None:
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.ones(300)
        x[123] = bad
        with pytest.raises(ValueError, match="NaN or infinity"):
            codec.encode(x)
    with pytest.raises(TypeError):
        codec.encode(torch.arange(10))
    with pytest.raises(TypeError):
        codec.encode(np.arange(10))
    with pytest.raises(TypeError):
        codec.encode([1.0, 2.0])


def test_numpy_inputs_any_layout(codec: Codec) -> None:
    x = np.random.default_rng(0).standard_normal((40, 30)).astype(np.float32)
    ref = codec.encode(x)
    readonly = x.copy()
    readonly.flags.writeable = False
    big_endian = x.astype(">f4")
    fortran = np.asfortranarray(x)
    reversed_rows = x[::-1].copy()[::-1]  # negative strides, same values
    for v in (readonly, big_endian, fortran, x.astype(np.float64), x.astype(np.longdouble), reversed_rows):
        h, b = codec.encode(v)
        assert h == ref[0] and [bytes(m) for m in b] == [bytes(m) for m in ref[1]]


def test_decode_returns_a_new_tensor(codec: Codec) -> None:
    x = torch.randn(500, generator=torch.Generator().manual_seed(1))
    header, buffers = codec.encode(x)
    store = [bytearray(b) for b in buffers]
    y = codec.decode(header, store)
    before = y.clone()
    for s in store:
        s[:] = bytes(len(s))  # the receive buffers are reused
    assert torch.equal(y, before)


# ---------------------------------------------------------------------------------------------
# Golden messages, worked out by hand
# ---------------------------------------------------------------------------------------------


def _f32(*v) -> bytes:
    return np.array(v, dtype="<f4").tobytes()


def test_golden_int8() -> None:
    # block 4: absmax 1 -> s = 1/127; q = round(127 x): 127, -63.5 -> -64 (half to even), 31.75 -> 32, 0
    h, b = get_codec("int8", block=4).encode(torch.tensor([1.0, -0.5, 0.25, 0.0]))
    assert h == {"codec": "int8", "shape": [4], "block": 4}
    assert bytes(b[0]) == _f32(np.float32(1.0) / np.float32(127.0))
    assert bytes(b[1]) == bytes([127, 256 - 64, 32, 0])


def test_golden_uint4() -> None:
    # block 4: [7, -3.5, 1, 0] s = 1 -> q = round-half-even(x) + 8 = 15, 4, 9, 8; block [2]: s = 2/7, q = 15
    h, b = get_codec("uint4", block=4).encode(torch.tensor([7.0, -3.5, 1.0, 0.0, 2.0]))
    assert h == {"codec": "uint4", "shape": [5], "block": 4}
    assert bytes(b[0]) == _f32(1.0, np.float32(2.0) / np.float32(7.0))
    assert bytes(b[1]) == bytes([15 | 4 << 4, 9 | 8 << 4, 15])  # last high nibble: zero padding


def test_golden_e3m0() -> None:
    # s = 1: 1 -> k0 (code 0); -0.5 -> sign, k1 (code 9); 0.3 is nearer 0.25 than 0.5 -> k2 (code 2);
    # 0.01 < 0.75 * 2**-6 -> zero (code 7)
    h, b = get_codec("e3m0", block=4).encode(torch.tensor([1.0, -0.5, 0.3, 0.01]))
    assert bytes(b[0]) == _f32(1.0)
    assert bytes(b[1]) == bytes([0 | 9 << 4, 2 | 7 << 4])
    y = get_codec("e3m0").decode(h, b)
    assert y.tolist() == [1.0, -0.5, 0.25, 0.0]


def test_golden_sign1() -> None:
    # block 8: mean |x| = 10 / 8 = 1.25; negatives at positions 1 and 3 -> bits 0b00001010
    x = torch.tensor([1.0, -2.0, 3.0, -4.0, 0.0, 0.0, 0.0, 0.0])
    h, b = get_codec("sign1", block=8).encode(x)
    assert bytes(b[0]) == _f32(1.25) and bytes(b[1]) == bytes([0b00001010])
    assert get_codec("sign1").decode(h, b).tolist() == [1.25, -1.25, 1.25, -1.25, 1.25, 1.25, 1.25, 1.25]
    # a short last block: mean over its 3 real values, padding bits zero
    h, b = get_codec("sign1", block=8).encode(torch.tensor([-3.0, 0.0, 6.0]))
    assert bytes(b[0]) == _f32(3.0) and bytes(b[1]) == bytes([0b001])


def test_golden_topk() -> None:
    h, b = get_codec("topk", ratio=0.5).encode(torch.tensor([0.1, -5.0, 3.0, 0.2]))
    assert h == {"codec": "topk", "shape": [4], "k": 2}
    assert bytes(b[0]) == np.array([1, 2], "<u4").tobytes() and bytes(b[1]) == _f32(-5.0, 3.0)
    assert get_codec("topk").decode(h, b).tolist() == [0.0, -5.0, 3.0, 0.0]
    # zeros are never sent: k shrinks
    h, b = get_codec("topk", ratio=1.0).encode(torch.tensor([0.0, 2.0, 0.0]))
    assert h["k"] == 1 and bytes(b[0]) == np.array([1], "<u4").tobytes()


def test_golden_spsa_byte() -> None:
    # c = sign(g) * clamp(round(16 ln|g|) + 64, 1, 127): 1 -> 64; -e -> -80; 0 -> 0; tiny -> 1; huge -> 127
    g = torch.tensor([1.0, -math.e, 0.0, 1e-9, 1e9, -1e-9], dtype=torch.float64)
    h, b = get_codec("spsa_byte").encode(g)
    assert h == {"codec": "spsa_byte", "shape": [6]}
    assert np.frombuffer(bytes(b[0]), np.int8).tolist() == [64, -80, 0, 1, 127, -1]
    y = get_codec("spsa_byte").decode(h, b)
    assert y[0].item() == 1.0 and y[1].item() == pytest.approx(-math.e, rel=1e-6)
    assert y[3].item() == pytest.approx(math.exp(-63 / 16), rel=1e-6)


def test_golden_floats() -> None:
    h, b = get_codec("fp16").encode(torch.tensor([1.0, -2.0, 1e6]))
    assert h == {"codec": "fp16", "shape": [3], "dtype": "float16"}
    assert bytes(b[0]) == np.array([0x3C00, 0xC000, 0x7BFF], "<u2").tobytes()  # 1e6 saturates to 65504
    h, b = get_codec("bf16").encode(torch.tensor([1.0, -3.0]))
    assert bytes(b[0]) == np.array([0x3F80, 0xC040], "<u2").tobytes()
    x = torch.tensor([1.5, -2.25])
    h, b = get_codec("fp32").encode(x)
    assert bytes(b[0]) == _f32(1.5, -2.25)


def test_fp32_encode_is_zero_copy() -> None:
    x = np.arange(1000, dtype=np.float32)
    _, (buf,) = get_codec("fp32").encode(x)
    assert np.shares_memory(np.frombuffer(buf, np.float32), x)


def test_e3m0_linear_rounding_thresholds() -> None:
    # r just below / above 0.75 * 2**-k rounds down / up; r below 0.75 * 2**-6 becomes zero.
    c = get_codec("e3m0", block=8)
    r = torch.tensor([1.0, 0.7499, 0.7501, 0.3749, 0.3751, 0.75 * 2**-6 * 1.001, 0.75 * 2**-6 * 0.999, 0.0])
    y = c.decode(*c.encode(r))
    assert y.tolist() == [1.0, 0.5, 1.0, 0.25, 0.5, 2**-6, 0.0, 0.0]


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------


def test_registry_names_and_options() -> None:
    assert codec_names() == ["fp32", "fp16", "bf16", "int8", "uint4", "e3m0", "sign1", "topk", "spsa_byte"]
    with pytest.raises(ValueError, match="valid names: fp32, fp16"):
        get_codec("fp8")
    assert get_codec("int8").bits_per_value == 8.5
    assert get_codec("uint4").bits_per_value == 4.25 and get_codec("e3m0").bits_per_value == 4.25
    assert get_codec("sign1").bits_per_value == 1.25 and get_codec("topk", ratio=0.25).bits_per_value == 16
    assert get_codec("fp32").lossless and not get_codec("bf16").lossless
    for name, bad in [("int8", {"block": 0}), ("uint4", {"block": 7}), ("sign1", {"block": 12}),
                      ("e3m0", {"block": 1 << 17}), ("int8", {"block": 2.0}), ("topk", {"ratio": 0}),
                      ("topk", {"ratio": 1.5}), ("fp32", {"max_numel": 0}), ("fp16", {"block": 4})]:
        with pytest.raises((ValueError, TypeError)):
            get_codec(name, **bad)


def test_concurrent_calls_match_serial_and_restore_thread_count() -> None:
    """Codecs are stateless: threads encoding and decoding at once get the serial results."""
    import concurrent.futures

    inputs = [torch.randn(20_000, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    codecs = [get_codec(name) for name in codec_names()]

    def work(x: torch.Tensor) -> list[torch.Tensor]:
        return [c.decode(*c.encode(x)) for c in codecs]

    serial = [work(x) for x in inputs]
    before = torch.get_num_threads()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(work, inputs * 2))
    for got, want in zip(parallel, serial * 2):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.get_num_threads() == before


def test_one_thread_pins_only_the_calling_thread() -> None:
    """Inside a codec call torch runs on one thread, and only in the calling thread."""
    import threading

    from compression import layout
    from compression.layout import one_thread

    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen: dict[str, int] = {}
        started, release = threading.Event(), threading.Event()

        def caller() -> None:
            with one_thread():
                seen["inside"] = torch.get_num_threads()
                started.set()
                release.wait(10)
            seen["after"] = torch.get_num_threads()

        def newcomer() -> None:  # first uses torch while the other thread is inside one_thread
            started.wait(10)
            seen["newcomer"] = torch.get_num_threads()
            release.set()

        threads = [threading.Thread(target=caller), threading.Thread(target=newcomer)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        # without an OpenMP backend one_thread is documented to do nothing
        inside = 1 if layout._omp_set_num_threads is not None else 2
        assert seen == {"inside": inside, "newcomer": 2, "after": 2}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)
