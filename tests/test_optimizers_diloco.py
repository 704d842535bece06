"""DiLoCo as a hook: golden trajectory, failure paths, hooks, checkpoints, factory.

The golden fixture `tests/fixtures/diloco_golden.json` is the trajectory of `reference_diloco()`
below: an independent single-process DiLoCo written with plain loops and
`torch.optim.SGD(nesterov=True)` as the outer optimizer. Regenerate it on purpose only:

    PYTHONPATH=. .venv/bin/python tests/test_optimizers_diloco.py --regenerate-golden
"""

from __future__ import annotations

import concurrent.futures
import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from gossip.collective_types import AverageResult
from gossip.errors import PeerTimeout
from optimizers.comm import LocalGroup
from optimizers.diloco import DiLoCo, DiLoCoConfig
from optimizers.factory import make_outer
from optimizers.payload import payload_nbytes

GOLDEN = Path(__file__).parent / "fixtures" / "diloco_golden.json"
W, H, ROUNDS, OUTER_LR, OUTER_MOM, INNER_LR = 2, 3, 4, 0.7, 0.9, 0.05


def make_model() -> torch.nn.Linear:
    gen = torch.Generator().manual_seed(1234)
    m = torch.nn.Linear(3, 2)
    with torch.no_grad():
        m.weight.copy_(torch.randn(2, 3, generator=gen) * 0.5)
        m.bias.copy_(torch.randn(2, generator=gen) * 0.5)
    return m


def worker_data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(8, 3, generator=gen)
    true_w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.5, -1.0]])
    y = x @ true_w.T + 0.1 * rank  # workers see different data
    return x, y


def inner_step(model: torch.nn.Module, opt: torch.optim.Optimizer, data: tuple) -> None:
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(data[0]), data[1]).backward()
    opt.step()


def flat_params(model: torch.nn.Module) -> list[float]:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()


def reference_diloco() -> list[list[float]]:
    """Plain-loop DiLoCo: W workers, H inner Adam steps, fp32 mean of θ̃ − θ_m, SGD-Nesterov outer."""
    models = [make_model() for _ in range(W)]
    inners = [torch.optim.Adam(m.parameters(), lr=INNER_LR) for m in models]
    data = [worker_data(r) for r in range(W)]
    outer_params = [p.detach().clone().requires_grad_(True) for p in make_model().parameters()]
    outer_opt = torch.optim.SGD(outer_params, lr=OUTER_LR, momentum=OUTER_MOM, nesterov=True)
    out = []
    for _ in range(ROUNDS):
        for _ in range(H):
            for m, o, d in zip(models, inners, data):
                inner_step(m, o, d)
        for k, gp in enumerate(outer_params):
            gp.grad = torch.stack([gp.detach() - list(m.parameters())[k].detach() for m in models]).mean(0)
        outer_opt.step()
        for m in models:
            with torch.no_grad():
                for p, gp in zip(m.parameters(), outer_params):
                    p.copy_(gp)
        out.append(torch.cat([gp.detach().reshape(-1) for gp in outer_params]).tolist())
    return out


def config(**kw) -> DiLoCoConfig:
    base = dict(sync_every=H, outer_lr=OUTER_LR, outer_momentum=OUTER_MOM, codec="fp32")
    return DiLoCoConfig(**(base | kw))


def hooked_run_round_robin() -> tuple[list[list[list[float]]], list[DiLoCo], LocalGroup]:
    group = LocalGroup(W)
    models = [make_model() for _ in range(W)]
    inners = [torch.optim.Adam(m.parameters(), lr=INNER_LR) for m in models]
    outers = [DiLoCo(m, o, group.comm(r), config()).attach() for r, (m, o) in enumerate(zip(models, inners))]
    data = [worker_data(r) for r in range(W)]
    traj: list[list[list[float]]] = []
    for _ in range(ROUNDS):
        for _ in range(H):  # one thread steps the workers round-robin
            for m, o, d in zip(models, inners, data):
                inner_step(m, o, d)
        for outer in outers:
            outer.finish_pending()  # already resolved: every worker took the launching step
        traj.append([flat_params(m) for m in models])
    for outer in outers:
        outer.detach()
    return traj, outers, group


def test_golden_fixture_matches_the_reference() -> None:
    golden = json.loads(GOLDEN.read_text())
    assert golden["config"] == {"workers": W, "sync_every": H, "rounds": ROUNDS, "outer_lr": OUTER_LR,
                                "outer_momentum": OUTER_MOM, "inner": f"Adam(lr={INNER_LR})", "codec": "fp32"}
    np.testing.assert_allclose(reference_diloco(), golden["trajectory"], rtol=0, atol=1e-6)


def test_hooked_diloco_on_local_group_matches_golden() -> None:
    golden = json.loads(GOLDEN.read_text())["trajectory"]
    traj, outers, group = hooked_run_round_robin()
    for r in range(ROUNDS):
        for w in range(W):  # every worker holds θ̃ after each outer step
            np.testing.assert_allclose(traj[r][w], golden[r], rtol=0, atol=1e-6)
    for w, outer in enumerate(outers):
        s = outer.stats
        assert (s.syncs_done, s.syncs_partial, s.syncs_missed, s.rejected) == (ROUNDS, 0, 0, 0)
        assert s.last_sync_step == ROUNDS * H and outer.step == ROUNDS * H
        # fp32: 4 bytes/value; 8 values (weight 6 + bias 2), W=2: 2·(1/2)·(24 + 8) = 32 bytes per round
        assert s.bytes_sent == s.bytes_received == ROUNDS * 32 == group.bytes_sent[w]


def test_threaded_workers_match_round_robin() -> None:
    """One thread per worker, syncs finished lazily by the next forward pass: same trajectory."""
    group = LocalGroup(W)
    models = [make_model() for _ in range(W)]

    def run(rank: int) -> None:
        opt = torch.optim.Adam(models[rank].parameters(), lr=INNER_LR)
        with DiLoCo(models[rank], opt, group.comm(rank), config()):
            for _ in range(ROUNDS * H):
                inner_step(models[rank], opt, worker_data(rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(W)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    golden = json.loads(GOLDEN.read_text())["trajectory"]
    for m in models:
        np.testing.assert_allclose(flat_params(m), golden[-1], rtol=0, atol=1e-6)


# ---- failure paths with a scripted comm -----------------------------------------------------


class ScriptedComm:
    """Answers each group_average with `respond(tensors)` (a result, or an exception to raise)."""

    def __init__(self, respond) -> None:
        self.respond = respond
        self.calls: list[tuple[str, list[np.ndarray]]] = []

    def group_average(self, key, tensors, codec, weight=1.0, timeout=1.0):
        self.calls.append((key, [t.copy() for t in tensors]))
        f: concurrent.futures.Future = concurrent.futures.Future()
        out = self.respond([t.copy() for t in tensors])
        f.set_exception(out) if isinstance(out, BaseException) else f.set_result(out)
        return f

    def pair_exchange(self, round, body, buffers, timeout=1.0):
        raise AssertionError("DiLoCo never pairs")


def result(tensors, complete=True, alone=False) -> AverageResult:
    me, other = b"a", b"b"
    contributors = (me,) if alone else (me, other)
    group = contributors if complete else (me, other, b"c")
    return AverageResult(tensors=tensors, group=group, contributors=contributors, fractions=(1.0,) * len(tensors))


def one_round(respond, **cfg):
    """A linear model, inner SGD(lr=0.25) on loss = sum(params): each step moves every value by −0.25."""
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.fill_(0.5)
    init = flat_params(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.25)
    comm = ScriptedComm(respond)
    outer = DiLoCo(model, opt, comm, config(sync_every=2, outer_lr=0.5, outer_momentum=0.5, **cfg))
    with outer:
        for _ in range(2):
            opt.zero_grad()
            sum(p.sum() for p in model.parameters()).backward()
            opt.step()
    return outer, model, comm, init


def test_full_sync_hand_computed() -> None:
    # θ after 2 steps = init − 0.5, so g = [0.5, 0.5] and [0.5]; the "group" returns 0.5·g = 0.25.
    # v = 0.25, θ̃ = init − 0.5·(0.25 + 0.5·0.25) = init − 0.1875
    outer, model, comm, init = one_round(lambda ts: result([t * 0.5 for t in ts]))
    assert [k for k, _ in comm.calls] == ["diloco/1"]
    assert [t.tolist() for t in comm.calls[0][1]] == [[0.5, 0.5], [0.5]]
    assert flat_params(model) == [v - 0.1875 for v in init]
    assert (outer.stats.syncs_done, outer.stats.syncs_missed, outer.stats.rejected) == (1, 0, 0)


def test_partial_sync_is_applied_and_counted() -> None:
    outer, model, _, init = one_round(lambda ts: result([t * 0.5 for t in ts], complete=False))
    assert flat_params(model) == [v - 0.1875 for v in init]
    assert (outer.stats.syncs_done, outer.stats.syncs_partial) == (1, 1)


@pytest.mark.parametrize("outcome", ["alone", "timeout"])
def test_missed_sync_takes_the_solo_outer_step(outcome: str) -> None:
    # solo: ḡ = own g = 0.5; v = 0.5; θ̃ = init − 0.5·(0.5 + 0.25) = init − 0.375
    respond = (lambda ts: result(ts, alone=True)) if outcome == "alone" else (lambda ts: PeerTimeout("nobody"))
    outer, model, _, init = one_round(respond)
    assert flat_params(model) == [v - 0.375 for v in init]
    assert (outer.stats.syncs_done, outer.stats.syncs_missed, outer.stats.bytes_sent) == (0, 1, 0)


@pytest.mark.parametrize(
    "bad",
    [
        lambda ts: [np.full_like(t, np.nan) for t in ts],  # NaN
        lambda ts: [np.zeros(t.size + 1, np.float32) for t in ts],  # wrong shape
        lambda ts: [t * 1e6 for t in ts],  # absurd norm
    ],
    ids=["nan", "shape", "norm"],
)
def test_bad_average_is_rejected_and_restores(bad) -> None:
    outer, model, _, init = one_round(lambda ts: result(bad(ts)))
    assert flat_params(model) == init  # θ ← θ̃ (unchanged), no outer step
    assert (outer.stats.rejected, outer.stats.syncs_done, outer.stats.syncs_missed) == (1, 0, 0)
    sd = outer.state_dict()
    assert torch.equal(sd["outer_momentum.weight"], torch.zeros(1, 2))
    assert sd["outer_params.weight"].tolist() == [[1.0, 2.0]]


def test_bf16_parameters_keep_their_dtype_and_a_float32_outer_copy() -> None:
    # θ = bf16 [1, 2] and [0.5]; after 2 steps θ = init − 0.5 (exact in bf16); solo (alone) step:
    # θ̃ = init − 0.375 in float32, written back as bf16 (exact here too).
    model = torch.nn.Linear(2, 1).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.fill_(0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.25)
    with DiLoCo(model, opt, ScriptedComm(lambda ts: result(ts, alone=True)),
                config(sync_every=2, outer_lr=0.5, outer_momentum=0.5)) as outer:
        for _ in range(2):
            opt.zero_grad()
            sum(p.sum() for p in model.parameters()).backward()
            opt.step()
    assert model.weight.dtype == torch.bfloat16 and flat_params(model) == [0.625, 1.625, 0.125]
    sd = outer.state_dict()
    assert sd["outer_params.weight"].dtype == torch.float32 and sd["outer_params.weight"].tolist() == [[0.625, 1.625]]


def test_own_divergence_sends_zeros_and_restores() -> None:
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    init = flat_params(model)
    comm = ScriptedComm(lambda ts: result(ts))
    with DiLoCo(model, opt, comm, config(sync_every=1)) as outer:
        with torch.no_grad():
            model.bias.fill_(float("nan"))
        opt.step()  # no grads: SGD leaves params alone; the hook sees the NaN
    assert [t.tolist() for t in comm.calls[0][1]] == [[0.0, 0.0], [0.0]]
    assert flat_params(model) == init and outer.stats.rejected == 1


# ---- hooks, config, checkpoints, factory ------------------------------------------------------


def test_detach_really_removes_the_hooks() -> None:
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    comm = ScriptedComm(lambda ts: result(ts))
    outer = DiLoCo(model, opt, comm, config(sync_every=1))
    with outer:
        assert len(opt._optimizer_step_post_hooks) == 1 and len(model._forward_pre_hooks) == 1
        opt.step()
        with pytest.raises(RuntimeError, match="already attached"):
            outer.attach()
    assert not outer.attached
    assert len(opt._optimizer_step_post_hooks) == 0 and len(opt._optimizer_step_pre_hooks) == 0
    assert len(model._forward_pre_hooks) == 0
    before = flat_params(model)
    opt.step()
    model(torch.zeros(1, 2))
    assert outer.step == 1 and len(comm.calls) == 1 and flat_params(model) == before
    outer.attach()  # usable again without `with`
    opt.step()
    outer.detach()
    outer.detach()
    assert outer.step == 2 and len(comm.calls) == 2


def test_exception_in_the_loop_drops_syncs_in_flight() -> None:
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    comm = ScriptedComm(lambda ts: result([t * 0.5 for t in ts]))
    before = flat_params(model)
    with pytest.raises(KeyError):
        with DiLoCo(model, opt, comm, config(sync_every=1)) as outer:
            opt.step()  # launches a sync (no grads: the inner step changes nothing)
            raise KeyError("crash in the training loop")
    assert not outer.attached and outer.stats.syncs_missed == 1 and outer.stats.syncs_done == 0
    assert flat_params(model) == before and len(comm.calls) == 1


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"sync_every": 0}, "sync_every must be an int >= 1"),
        ({"outer_lr": -1.0}, "outer_lr must be"),
        ({"outer_momentum": 1.0}, r"outer_momentum must be in \[0, 1\)"),
        ({"timeout": 0.0}, "timeout must be"),
        ({"max_norm_ratio": 0.5}, "max_norm_ratio must be"),
        ({"weight": float("nan")}, "weight must be"),
        ({"outer_lr": "0.7"}, "outer_lr must be"),
        ({"codec": "zip"}, "unknown codec"),
    ],
)
def test_bad_config_is_a_value_error(kw, msg) -> None:
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match=msg):
        DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), LocalGroup(1).comm(0), DiLoCoConfig(**kw))


def test_bad_constructor_arguments_are_value_errors() -> None:
    model, other = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    comm = LocalGroup(1).comm(0)
    with pytest.raises(ValueError, match="not in the model"):
        DiLoCo(model, torch.optim.SGD(list(model.parameters()) + list(other.parameters()), lr=0.1), comm)
    with pytest.raises(ValueError, match="none of the model's parameters"):
        DiLoCo(model, torch.optim.SGD(other.parameters(), lr=0.1), comm)
    with pytest.raises(ValueError, match="Comm interface"):
        DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), object())
    with pytest.raises(ValueError, match="must be a DiLoCoConfig"):
        DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), comm, {"sync_every": 3})


def test_state_dict_round_trip_and_validation() -> None:
    traj, outers, _ = hooked_run_round_robin()
    sd = outers[0].state_dict()
    assert sd["step"] == ROUNDS * H and sd["stats.syncs_done"] == ROUNDS
    assert all(isinstance(v, (int, torch.Tensor)) for v in sd.values())
    fresh_model = make_model()
    fresh = DiLoCo(fresh_model, torch.optim.Adam(fresh_model.parameters()), LocalGroup(1).comm(0), config())
    for bad, msg in [
        ({k: v for k, v in sd.items() if k != "step"}, "missing"),
        (sd | {"outer_params.bias": torch.zeros(3)}, "shape"),
        (sd | {"outer_momentum.weight": torch.full((2, 3), float("nan"))}, "NaN"),
        (sd | {"step": -1}, "step"),
    ]:
        with pytest.raises(ValueError, match=msg):
            fresh.load_state_dict(bad)
        assert fresh.step == 0  # untouched
    fresh.load_state_dict({k: (torch.tensor(v) if isinstance(v, int) else v) for k, v in sd.items()})
    sd2 = fresh.state_dict()
    assert sd2.keys() == sd.keys()
    assert all(torch.equal(sd[k], sd2[k]) if isinstance(sd[k], torch.Tensor) else sd[k] == sd2[k] for k in sd)


def test_factory_builds_each_algorithm() -> None:
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    comm = LocalGroup(1).comm(0)
    d = make_outer("diloco", model, opt, comm, sync_every=7, codec="fp32")
    assert isinstance(d, DiLoCo) and d.config.sync_every == 7 and not d.attached
    assert type(make_outer("noloco", model, opt, comm)).__name__ == "NoLoCo"
    s = make_outer("streaming-diloco", model, opt, comm, fragments=2, sync_every=4)
    assert type(s).__name__ == "StreamingDiLoCo" and s.config.codec == "e3m0"
    with pytest.raises(ValueError, match="choose one of"):
        make_outer("adam", model, opt, comm)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['H'\]"):
        make_outer("diloco", model, opt, comm, H=3)


def test_default_codec_and_byte_estimate() -> None:
    model = torch.nn.Linear(2, 1)
    outer = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), LocalGroup(1).comm(0))
    assert outer.config.codec == "bf16" and outer.config.sync_every == 500
    assert payload_nbytes(outer.codec, 10) == 20  # bf16: 2 bytes per value


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate-golden"]:
        sys.exit("usage: PYTHONPATH=. python tests/test_optimizers_diloco.py --regenerate-golden")
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps({
        "description": "reference_diloco() in tests/test_optimizers_diloco.py: outer params after each round",
        "config": {"workers": W, "sync_every": H, "rounds": ROUNDS, "outer_lr": OUTER_LR,
                   "outer_momentum": OUTER_MOM, "inner": f"Adam(lr={INNER_LR})", "codec": "fp32"},
        "trajectory": reference_diloco(),
    }, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
