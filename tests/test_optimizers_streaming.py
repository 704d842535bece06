"""Streaming DiLoCo: fragment schedule, τ-overlap and α-merge step by step, fragment assignment."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
import torch

from gossip.collective_types import AverageResult
from optimizers.comm import LocalGroup
from optimizers.diloco import DiLoCo, DiLoCoConfig
from optimizers.payload import payload_nbytes, ring_allreduce_bytes
from optimizers.streaming import StreamingConfig, StreamingDiLoCo


class Blocks(torch.nn.Module):
    """n one-weight blocks in a ModuleList, all starting at 0; forward sums them."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.h = torch.nn.ModuleList(torch.nn.Linear(1, 1, bias=False) for _ in range(n))
        with torch.no_grad():
            for b in self.h:
                b.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(b(x) for b in self.h)


class HalfComm:
    """Answers every group_average at once with ḡ = 0.5·g, as if the partner's g were 0."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[list[float]]]] = []

    def group_average(self, key, tensors, codec, weight=1.0, timeout=1.0):
        self.calls.append((key, [t.tolist() for t in tensors]))
        f: concurrent.futures.Future = concurrent.futures.Future()
        f.set_result(AverageResult(tensors=[t * 0.5 for t in tensors], group=(b"a", b"b"),
                                   contributors=(b"a", b"b"), fractions=(1.0,) * len(tensors)))
        return f

    def pair_exchange(self, round, body, buffers, timeout=1.0):
        raise AssertionError("streaming DiLoCo never pairs")


def weights(model: Blocks) -> tuple[float, ...]:
    return tuple(b.weight.item() for b in model.h)


def streaming_run(delay: int, steps: int, forward_between: bool = True):
    model = Blocks(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.25)  # loss = Σ weights: each step −0.25 each
    comm = HalfComm()
    cfg = StreamingConfig(sync_every=6, fragments=3, delay=delay, merge_alpha=0.5, outer_lr=1.0,
                          outer_momentum=0.0, codec="fp32")
    outer = StreamingDiLoCo(model, opt, comm, cfg)
    seen = []
    with outer:
        for _ in range(steps):
            opt.zero_grad()
            model(torch.ones(1, 1)).sum().backward()
            opt.step()
            seen.append((weights(model), len(comm.calls)))
            if forward_between:
                model(torch.ones(1, 1))  # a τ ≥ 1 sync must not land early on a forward pass
    return outer, comm, seen


def test_schedule_overlap_and_merge_step_by_step() -> None:
    # H=6, P=3 (block b = fragment b), τ=1, α=0.5, outer lr 1, momentum 0; the "group" halves g.
    # Fragment p launches at steps 2, 4, 6, 8 (p = 0, 1, 2, 0) with g = θ̃ − θ, and lands one step
    # later: θ̃ ← θ̃ − 0.5·g, θ ← 0.5·θ + 0.5·θ̃. E.g. fragment 0: step 2 g = 0.5; step 3
    # θ = −0.75, θ̃ = −0.25 -> θ = −0.5. Step 8: g = −0.25 − (−1.75) = 1.5; step 9: θ = −2,
    # θ̃ = −1 -> −1.5.
    outer, comm, seen = streaming_run(delay=1, steps=9)
    assert seen == [
        ((-0.25, -0.25, -0.25), 0),
        ((-0.5, -0.5, -0.5), 1),  # fragment 0 launched, not merged yet
        ((-0.5, -0.75, -0.75), 1),  # fragment 0 merged τ=1 step later
        ((-0.75, -1.0, -1.0), 2),
        ((-1.0, -0.875, -1.25), 2),
        ((-1.25, -1.125, -1.5), 3),
        ((-1.5, -1.375, -1.25), 3),
        ((-1.75, -1.625, -1.5), 4),
        ((-1.5, -1.875, -1.75), 4),
    ]
    assert comm.calls == [("streaming/0/0", [[0.5]]), ("streaming/1/0", [[1.0]]),
                          ("streaming/2/0", [[1.5]]), ("streaming/0/1", [[1.5]])]
    assert outer.fragment_of == [0, 1, 2] and outer.stats.syncs_done == 4
    assert outer.stats.last_sync_step == 8


def test_delay_zero_lands_before_the_next_forward() -> None:
    # Step 2 launches fragment 0 (g = 0.5); the forward pass right after applies it:
    # θ̃ = −0.25, θ = 0.5·(−0.5) + 0.5·(−0.25) = −0.375.
    outer, _, seen = streaming_run(delay=0, steps=2)
    assert seen[1] == ((-0.5, -0.5, -0.5), 1)
    assert weights(outer.model) == (-0.375, -0.5, -0.5)


def test_one_fragment_no_delay_overwrite_is_exactly_diloco() -> None:
    def run(make):
        group = LocalGroup(2)
        models, outers = [], []
        for r in range(2):
            torch.manual_seed(0)
            m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
            o = torch.optim.Adam(m.parameters(), lr=0.01)
            models.append((m, o, torch.randn(16, 3, generator=torch.Generator().manual_seed(r))))
            outers.append(make(m, o, group.comm(r)).attach())
        for _ in range(12):
            for m, o, x in models:
                o.zero_grad()
                (m(x) - x.sum(1, keepdim=True)).pow(2).mean().backward()
                o.step()
        for outer in outers:
            outer.detach()
        return [torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m, _, _ in models]

    common = dict(sync_every=4, outer_lr=0.7, outer_momentum=0.9, codec="fp32")
    a = run(lambda m, o, c: StreamingDiLoCo(m, o, c, StreamingConfig(fragments=1, delay=0, merge_alpha=0.0, **common)))
    b = run(lambda m, o, c: DiLoCo(m, o, c, DiLoCoConfig(**common)))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


class TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.Linear(4, 4)) for _ in range(4))
        self.head = torch.nn.Linear(4, 10)


def fragment_names(outer: StreamingDiLoCo) -> list[list[str]]:
    return [[outer._named[i][0] for i in frag] for frag in outer.fragments]


def test_fragments_of_a_transformer_are_strided_blocks_plus_nonblock_fragment() -> None:
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    outer = StreamingDiLoCo(model, opt, HalfComm(), StreamingConfig(fragments=3, sync_every=6, codec="fp32"))
    blk = lambda b: [f"blocks.{b}.0.weight", f"blocks.{b}.0.bias", f"blocks.{b}.1.weight", f"blocks.{b}.1.bias"]
    assert fragment_names(outer) == [
        ["emb.weight", "head.weight", "head.bias"],
        blk(0) + blk(2),
        blk(1) + blk(3),
    ]
    # explicit blocks override the ModuleList search
    outer = StreamingDiLoCo(model, opt, HalfComm(), StreamingConfig(fragments=2, sync_every=6, codec="fp32"),
                            blocks=[model.head])
    assert fragment_names(outer)[1] == ["head.weight", "head.bias"]
    with pytest.raises(ValueError, match="use at most 5 fragments"):
        StreamingDiLoCo(model, opt, HalfComm(), StreamingConfig(fragments=6, sync_every=12, delay=1, codec="fp32"))


def test_e3m0_streaming_on_a_local_group_stays_in_step() -> None:
    group = LocalGroup(2)
    cfg = StreamingConfig(sync_every=4, fragments=2, delay=1)  # default codec: e3m0
    runs = []
    for r in range(2):
        torch.manual_seed(0)
        m = torch.nn.Linear(3, 2)
        o = torch.optim.SGD(m.parameters(), lr=0.05)
        x = torch.randn(32, 3, generator=torch.Generator().manual_seed(r))
        runs.append((m, o, x, StreamingDiLoCo(m, o, group.comm(r), cfg).attach()))
    losses = []
    for _ in range(40):
        for m, o, x, _ in runs:
            o.zero_grad()
            loss = (m(x) - x[:, :2] * 2).pow(2).mean()
            loss.backward()
            o.step()
        losses.append(loss.item())
    sds = [outer.state_dict() for *_, outer in runs]
    for k in sds[0]:  # both workers applied the same averaged outer gradients
        assert torch.equal(sds[0][k], sds[1][k]) if isinstance(sds[0][k], torch.Tensor) else sds[0][k] == sds[1][k]
    s = runs[0][3].stats
    assert (s.syncs_done, s.syncs_missed, s.rejected) == (20, 0, 0)  # a fragment every 2 steps
    codec = runs[0][3].codec
    per_round = ring_allreduce_bytes(payload_nbytes(codec, 6), 2) + ring_allreduce_bytes(payload_nbytes(codec, 2), 2)
    assert s.bytes_sent == 10 * per_round == group.bytes_sent[0]
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"sync_every": 10, "fragments": 3}, "must divide sync_every"),
        ({"sync_every": 8, "fragments": 2, "delay": 4}, r"delay must be an int in \[0, sync_every/fragments\) = \[0, 4\)"),
        ({"merge_alpha": 1.5}, "merge_alpha must be in"),
        ({"fragments": 0}, "fragments must be an int >= 1"),
    ],
)
def test_bad_streaming_config(kw, msg) -> None:
    with pytest.raises(ValueError, match=msg):
        StreamingConfig(**kw)


def test_defaults() -> None:
    c = StreamingConfig()
    assert (c.sync_every, c.fragments, c.delay, c.merge_alpha, c.codec) == (100, 4, 1, 0.5, "e3m0")
    assert np.isclose(c.outer_lr, 0.7) and np.isclose(c.outer_momentum, 0.9)
