"""Error feedback: the sums of what receivers decode track the sums of the inputs.

For both modes, after every message: sum(inputs) - sum(receiver estimates) == residual (up to
float32 rounding), and the residual stays bounded over many steps when it is fed back.
"""

from __future__ import annotations

import msgpack
import pytest
import torch

from compression.base import CodecError, get_codec
from compression.error_feedback import ErrorFeedback, ErrorFeedbackReceiver

SHAPE = (40, 25)


def _inputs(steps: int, seed: int = 0, drift: float = 0.0) -> list[torch.Tensor]:
    """g_t = mu + noise: the sum grows linearly, so "tracks" means the gap stays O(1)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(SHAPE, generator=g)
    return [mu * (1 + drift * t) + 0.5 * torch.randn(SHAPE, generator=g) for t in range(steps)]


def _wire(header: dict, buffers: list) -> tuple[dict, list[bytes]]:
    """What the receiver actually gets: msgpack-ed header, copied bytes."""
    return msgpack.unpackb(msgpack.packb(header), raw=False), [bytes(b) for b in buffers]


def _run(ef: ErrorFeedback, inputs: list[torch.Tensor]) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    """Feed all inputs; returns (residual norm per step, sum of inputs, sum of receiver estimates)."""
    rx = ErrorFeedbackReceiver()
    sum_in = torch.zeros(SHAPE, dtype=torch.float64)
    sum_est = torch.zeros(SHAPE, dtype=torch.float64)
    norms = []
    for g in inputs:
        est = rx.decode(*_wire(*ef.encode(g)), expected_shape=SHAPE)
        assert torch.equal(est, ef.estimate)  # sender and receiver agree bit for bit
        sum_in += g.double()
        sum_est += est.double()
        # the identity behind "tracks": sum of inputs - sum of estimates = residual
        assert torch.allclose(sum_in - sum_est, ef.residual.double(), atol=1e-3 * (1 + len(norms)) ** 0.5)
        norms.append(float(ef.residual.norm()))
    return norms, sum_in, sum_est


EF21_CASES = [
    (codec, {}, eta) for codec in ("int8", "uint4", "e3m0", "sign1") for eta in (0.1, 0.5, 1.0)
] + [("topk", {"ratio": 0.1}, eta) for eta in (0.02, 0.05)]  # eta below ~ratio / 2, see the module


@pytest.mark.parametrize("codec,options,eta", EF21_CASES)
def test_ef21_eta_sum_tracks_with_bounded_residual(codec: str, options: dict, eta: float) -> None:
    inputs = _inputs(300, seed=1)
    norms, sum_in, sum_est = _run(ErrorFeedback(get_codec(codec, **options), eta=eta), inputs)
    scale = float(inputs[0].norm())
    # bounded: the residual late in the run is no bigger than early on (no drift), and small
    assert max(norms[200:]) <= 2 * max(norms[:100]) + 1e-6
    assert max(norms) <= 20 * scale
    # tracks: the relative gap of the sums shrinks like 1/T
    assert float((sum_in - sum_est).norm() / sum_in.norm()) <= max(norms) / float(sum_in.norm()) + 1e-6
    assert float((sum_in - sum_est).norm() / sum_in.norm()) < 0.05


@pytest.mark.parametrize("codec,options", [("int8", {}), ("sign1", {}), ("topk", {"ratio": 0.05}), ("e3m0", {})])
def test_classic_ef_sum_tracks_with_bounded_residual(codec: str, options: dict) -> None:
    inputs = _inputs(300, seed=2)
    ef = ErrorFeedback(get_codec(codec, **options), mode="ef")
    norms, sum_in, sum_est = _run(ef, inputs)
    assert max(norms[200:]) <= 2 * max(norms[:100]) + 1e-6
    assert float((sum_in - sum_est).norm() / sum_in.norm()) < 0.05


def test_classic_ef_messages_are_plain_codec_messages() -> None:
    codec = get_codec("int8")
    ef = ErrorFeedback(codec, mode="ef")
    x = torch.randn(SHAPE)
    header, buffers = ef.encode(x)
    assert header["codec"] == "int8" and "ef21_seq" not in header
    assert torch.equal(codec.decode(header, buffers), ef.estimate)
    # the first message is C(x), its residual exactly x - C(x)
    assert torch.equal(ef.residual, x - ef.estimate)


def test_ef21_first_message_is_full_precision_then_increments() -> None:
    ef = ErrorFeedback(get_codec("sign1"), eta=0.0)
    g0, g1 = torch.randn(SHAPE), torch.randn(SHAPE)
    h0, b0 = ef.encode(g0)
    assert h0["codec"] == "fp32" and h0["ef21_seq"] == 0
    assert torch.equal(ef.estimate, g0) and torch.equal(ef.residual, torch.zeros(SHAPE))
    h1, b1 = ef.encode(g1)
    assert h1["codec"] == "sign1" and h1["ef21_seq"] == 1
    delta = get_codec("sign1").decode({k: v for k, v in h1.items() if k != "ef21_seq"}, b1)
    # EF21 (eta = 0): delta = C(g1 - h0), h1 = h0 + delta, e1 = (g1 - h0) - delta
    assert torch.equal(delta, get_codec("sign1").decode(*get_codec("sign1").encode(g1 - g0)))
    assert torch.allclose(ef.estimate, g0 + delta)
    assert torch.allclose(ef.residual, g1 - g0 - delta, atol=1e-6)


def test_ef21_with_eta_feeds_the_residual_back() -> None:
    codec = get_codec("topk", ratio=0.1)
    ef = ErrorFeedback(codec, eta=0.5)
    g = _inputs(3, seed=3)
    ef.encode(g[0])
    ef.encode(g[1])
    e, h = ef.residual.clone(), ef.estimate.clone()
    header, buffers = ef.encode(g[2])
    delta = codec.decode({k: v for k, v in header.items() if k != "ef21_seq"}, buffers)
    assert torch.equal(delta, codec.decode(*codec.encode(0.5 * e + (g[2] - h))))
    assert torch.allclose(ef.residual, e + (g[2] - h) - delta, atol=1e-6)


def test_ef21_eta_too_large_for_the_codec_diverges() -> None:
    """The documented limit: top-k 10% contracts by ~0.1, so eta = 1 lets the residual grow."""
    norms, _, _ = _run(ErrorFeedback(get_codec("topk", ratio=0.1), eta=1.0), _inputs(60, seed=1))
    assert norms[-1] > 100 * norms[5]


def test_ef21_without_eta_tracks_a_constant_input() -> None:
    """EF21's own guarantee: with a contractive C, h converges to a fixed g."""
    g = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    ef = ErrorFeedback(get_codec("topk", ratio=0.1), eta=0.0, first_full=False)
    for _ in range(60):
        ef.encode(g)
    assert float((ef.estimate - g).norm()) <= 1e-6 * float(g.norm())


def test_ef21_first_full_false_starts_from_zero() -> None:
    codec = get_codec("int8")
    ef = ErrorFeedback(codec, first_full=False)
    g = torch.randn(SHAPE)
    header, buffers = ef.encode(g)
    assert header["codec"] == "int8" and header["ef21_seq"] == 0
    assert torch.equal(ef.estimate, codec.decode(*codec.encode(g)))


def test_receiver_needs_every_message_and_resyncs_on_restart() -> None:
    ef = ErrorFeedback(get_codec("int8"), eta=0.1)
    inputs = _inputs(6, seed=5)
    msgs = [_wire(*ef.encode(g)) for g in inputs[:4]]
    rx = ErrorFeedbackReceiver()
    with pytest.raises(CodecError, match="out of step"):
        rx.decode(*msgs[1])  # joined mid-stream
    rx.decode(*msgs[0])
    with pytest.raises(CodecError, match="expected message 1, got 2"):
        rx.decode(*msgs[2])  # missed one
    with pytest.raises(CodecError):
        rx.decode(*msgs[1], expected_shape=(3,))
    ef.reset()
    restart = _wire(*ef.encode(inputs[4]))
    assert restart[0]["ef21_seq"] == 0
    assert torch.equal(rx.decode(*restart), inputs[4])
    assert torch.equal(rx.decode(*_wire(*ef.encode(inputs[5]))), ef.estimate)
    for bad in (-1, True, "1", 2**40):
        with pytest.raises(CodecError):
            rx.decode({**msgs[1][0], "ef21_seq": bad}, msgs[1][1])


def test_receiver_rejects_malformed_inner_message_without_losing_state() -> None:
    ef = ErrorFeedback(get_codec("uint4"))
    rx = ErrorFeedbackReceiver()
    g = _inputs(3, seed=6)
    rx.decode(*_wire(*ef.encode(g[0])))
    header, buffers = _wire(*ef.encode(g[1]))
    with pytest.raises(CodecError):
        rx.decode(header, [buffers[0], buffers[1][:-1]])
    assert torch.equal(rx.decode(header, buffers), ef.estimate)  # the intact copy still applies


def test_constructor_and_shape_checks() -> None:
    with pytest.raises(ValueError, match="Codec"):
        ErrorFeedback("int8")
    with pytest.raises(ValueError, match="mode"):
        ErrorFeedback(get_codec("int8"), mode="ef14")
    for eta in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="eta"):
            ErrorFeedback(get_codec("int8"), eta=eta)
    with pytest.raises(ValueError, match="ef21' only"):
        ErrorFeedback(get_codec("int8"), eta=0.5, mode="ef")
    ef = ErrorFeedback(get_codec("int8"))
    assert ef.residual is None and ef.estimate is None
    ef.encode(torch.randn(SHAPE))
    with pytest.raises(ValueError, match="shape changed"):
        ef.encode(torch.randn(3, 3))
    ef.reset()
    ef.encode(torch.randn(3, 3))


def test_state_dict_round_trip_continues_the_stream() -> None:
    inputs = _inputs(5, seed=7)
    a = ErrorFeedback(get_codec("e3m0"), eta=0.5)
    for g in inputs[:3]:
        a.encode(g)
    state = a.state_dict()
    assert set(state) == {"residual", "estimate", "seq"} and state["seq"] == 3
    b = ErrorFeedback(get_codec("e3m0"), eta=0.5)
    b.load_state_dict(state)
    ha, ba = a.encode(inputs[3])
    hb, bb = b.encode(inputs[3])
    assert ha == hb and [bytes(x) for x in ba] == [bytes(x) for x in bb]
    fresh = ErrorFeedback(get_codec("e3m0"))
    fresh.load_state_dict(ErrorFeedback(get_codec("e3m0")).state_dict())
    assert fresh.residual is None
