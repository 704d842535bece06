"""NoLoCo as a hook: hand-computed updates, solo fallbacks, partner checks, pairing on a LocalGroup."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
import torch

from compression.base import get_codec
from gossip.collective_types import PairResult
from gossip.errors import PeerTimeout
from optimizers.comm import LocalGroup
from optimizers.noloco import NoLoCo, NoLoCoConfig
from optimizers.pairing import pair_matching
from optimizers.payload import encode_tensors

FP32 = get_codec("fp32")


class ScriptedPairs:
    """Answers pair_exchange with `respond(round, body, buffers)`: a PairResult, None or an exception."""

    def __init__(self, respond) -> None:
        self.respond = respond
        self.sent: list[tuple[int, dict, list[bytes]]] = []

    def pair_exchange(self, round, body, buffers, timeout=1.0):
        self.sent.append((round, body, [bytes(memoryview(b)) for b in buffers]))
        out = self.respond(round, body, buffers)
        f: concurrent.futures.Future = concurrent.futures.Future()
        f.set_exception(out) if isinstance(out, BaseException) else f.set_result(out)
        return f

    def group_average(self, *a, **k):
        raise AssertionError("NoLoCo never all-reduces")


def partner(phi_values: list[float], delta_values: list[float], rnd: int = 1, **override) -> PairResult:
    meta_p, bufs_p = encode_tensors(FP32, [np.array(phi_values, np.float32)])
    meta_d, bufs_d = encode_tensors(FP32, [np.array(delta_values, np.float32)])
    body = {"alg": "noloco", "v": 1, "round": rnd, "codec": "fp32", "phi": meta_p, "delta": meta_d} | override
    return PairResult(peer_id=b"partner!", body=body, buffers=[bytes(b) for b in bufs_p + bufs_d])


def run(respond, rounds: int = 1, nan_at: int | None = None):
    """One weight starting at 1.0, inner SGD(lr=0.25) on loss = weight: each step −0.25.
    H = 2, α = β = 0.5, γ = α. Returns (outer, weight after each round, comm)."""
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.25)
    comm = ScriptedPairs(respond)
    outer = NoLoCo(model, opt, comm, NoLoCoConfig(sync_every=2, outer_lr=0.5, outer_momentum=0.5, codec="fp32"))
    outer.attach()
    after = []
    for step in range(1, 2 * rounds + 1):
        opt.zero_grad()
        model.weight.sum().backward()
        if step == nan_at:
            with torch.no_grad():
                model.weight.fill_(float("nan"))
            opt.zero_grad(set_to_none=True)
        opt.step()
        if step % 2 == 0:
            outer.finish_pending()
            after.append(model.weight.item())
    outer.detach()
    return outer, after, comm


def test_solo_updates_hand_computed() -> None:
    # Round 1: θ = 0.5, Δ = −0.5, m = 0.5·(−0.5) = −0.25, φ = θ = 0.75.
    # Round 2: θ = 0.25, Δ = −0.5, m = 0.5·(−0.25) + 0.5·(−0.5) = −0.375, φ = θ = 0.375.
    outer, after, comm = run(lambda r, b, bufs: None, rounds=2)
    assert after == [0.75, 0.375]
    assert [r for r, _, _ in comm.sent] == [1, 2]
    assert (outer.stats.syncs_missed, outer.stats.syncs_done, outer.stats.bytes_sent) == (2, 0, 0)
    sd = outer.state_dict()
    assert sd["slow_params.weight"].item() == 0.375 and sd["outer_momentum.weight"].item() == -0.375


def test_partner_timeout_gives_exactly_the_solo_update() -> None:
    for respond in (lambda r, b, bufs: None, lambda r, b, bufs: PeerTimeout("partner vanished")):
        outer, after, _ = run(respond)
        assert after == [0.75] and outer.stats.syncs_missed == 1


def test_update_with_partner_hand_computed() -> None:
    # φ = 1, Δ = −0.5; partner φ_j = 3, Δ_j = −1.5: φ̄ = 2, Δ̄ = −1
    # m = 0.5·(−1) + 0.5·(2 − 1) = 0, φ = θ = 1.
    outer, after, comm = run(lambda r, b, bufs: partner([3.0], [-1.5]))
    assert after == [1.0]
    assert (outer.stats.syncs_done, outer.stats.syncs_missed, outer.stats.rejected) == (1, 0, 0)
    rnd, body, bufs = comm.sent[0]
    assert (rnd, body["alg"], body["round"], body["codec"]) == (1, "noloco", 1, "fp32")
    assert [np.frombuffer(b, np.float32).tolist() for b in bufs] == [[1.0], [-0.5]]  # φ then Δ
    assert outer.stats.bytes_sent > 8 and outer.stats.bytes_received > 8 and outer.stats.last_sync_step == 2


def nan_payload(r, b, bufs) -> PairResult:
    res = partner([3.0], [-1.5])
    return PairResult(res.peer_id, res.body, [np.array([np.nan], np.float32).tobytes(), res.buffers[1]])


@pytest.mark.parametrize(
    "respond",
    [
        nan_payload,
        lambda r, b, bufs: partner([3.0, 1.0], [-1.5, 0.0]),  # wrong shape
        lambda r, b, bufs: partner([100.0], [-1.5]),  # φ_j norm > 10·‖φ‖
        lambda r, b, bufs: partner([3.0], [-50.0]),  # Δ_j norm > 10·‖Δ‖
        lambda r, b, bufs: partner([3.0], [-1.5], rnd=7),  # another round
        lambda r, b, bufs: partner([3.0], [-1.5], alg="diloco"),
        lambda r, b, bufs: partner([3.0], [-1.5], codec="bf16"),
        lambda r, b, bufs: partner([3.0], [-1.5], phi="garbage"),
        lambda r, b, bufs: PairResult(b"x", partner([3.0], [-1.5]).body, []),  # buffers missing
        lambda r, b, bufs: PairResult(b"x", ["not", "a", "map"], []),
    ],
    ids=["nan", "shape", "huge-phi", "huge-delta", "round", "alg", "codec", "meta", "buffers", "body"],
)
def test_bad_partner_payload_is_rejected_with_exactly_the_solo_update(respond) -> None:
    outer, after, _ = run(respond)
    assert after == [0.75]  # the solo value
    assert (outer.stats.rejected, outer.stats.syncs_done, outer.stats.syncs_missed) == (1, 0, 0)


def test_own_divergence_restores_phi_and_sends_zero_delta() -> None:
    outer, after, comm = run(lambda r, b, bufs: None, nan_at=2)
    _, _, bufs = comm.sent[0]
    assert [np.frombuffer(b, np.float32).tolist() for b in bufs] == [[1.0], [0.0]]
    assert after == [1.0] and outer.stats.rejected == 1  # θ ← φ, then Δ = 0 leaves φ at 1


def test_pairs_on_a_local_group_never_twice_per_round() -> None:
    w, h, rounds = 5, 2, 6
    group = LocalGroup(w, seed=11)
    partners: dict[tuple[int, int], bytes | None] = {}
    workers = []
    for r in range(w):
        torch.manual_seed(0)
        m = torch.nn.Linear(2, 1)
        o = torch.optim.SGD(m.parameters(), lr=0.05)
        inner = group.comm(r)

        class Recorder:
            def __init__(self, rank, c):
                self.rank, self.c = rank, c

            def pair_exchange(self, round, body, buffers, timeout=1.0):
                f = self.c.pair_exchange(round, body, buffers, timeout)
                f.add_done_callback(lambda f, k=(self.rank, round): partners.__setitem__(k, f.result() and f.result().peer_id))
                return f

            def group_average(self, *a, **k):
                raise AssertionError

        outer = NoLoCo(m, o, Recorder(r, inner), NoLoCoConfig(sync_every=h, codec="fp32")).attach()
        workers.append((m, o, torch.randn(8, 2, generator=torch.Generator().manual_seed(r)), outer))
    for _ in range(h * rounds):
        for m, o, x, _ in workers:  # round-robin in one thread
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    for *_, outer in workers:
        outer.detach()
    pid = lambda r: b"rank" + r.to_bytes(4, "big")
    for rnd in range(1, rounds + 1):
        got = {r: partners[(r, rnd)] for r in range(w)}
        pairs, unpaired = pair_matching(rnd, list(range(w)), seed=11)
        assert got[unpaired] is None
        for a, b in pairs:
            assert got[a] == pid(b) and got[b] == pid(a)  # symmetric: nobody in two pairs
    for r, (*_, outer) in enumerate(workers):
        s = outer.stats
        assert s.syncs_done + s.syncs_missed == rounds and s.rejected == 0
        assert s.bytes_sent == group.bytes_sent[r] and s.bytes_received == group.bytes_received[r]
    assert sum(outer.stats.syncs_missed for *_, outer in workers) == rounds  # one odd node out per round


def test_config_defaults_and_errors() -> None:
    c = NoLoCoConfig()
    assert (c.sync_every, c.outer_lr, c.outer_momentum, c.gamma, c.gamma_value, c.codec) == (50, 0.7, 0.5, None, 0.7, "bf16")
    assert NoLoCoConfig(gamma=0.25).gamma_value == 0.25
    with pytest.raises(ValueError, match="gamma must be None"):
        NoLoCoConfig(gamma=-1.0)
    with pytest.raises(ValueError, match="outer_momentum must be in"):
        NoLoCoConfig(outer_momentum=1.5)
