"""The node's training side over an in-process group: syncs happen, snapshots restore exactly."""

import pytest
import torch

from node.checkpoint import CheckpointError, deserialize
from node.config import NodeConfig
from node.trainer import LMTrainer, data_rank
from optimizers.comm import LocalGroup

TINY = dict(d_model=16, n_layer=1, n_head=2, context=16, batch_size=2, eval_seqs=4, warmup=2, sync_timeout=5.0)


def make(group, rank, **kw):
    cfg = NodeConfig(**{**TINY, "sync_every": 5, **kw})
    return LMTrainer(cfg, group.comm(rank), peer_id=bytes([rank + 1]) * 32)


@pytest.mark.parametrize("algorithm", ["noloco", "diloco", "streaming-diloco"])
def test_two_trainers_sync_on_schedule(algorithm):
    extra = {"fragments": 1, "delay": 0} if algorithm == "streaming-diloco" else {}
    group = LocalGroup(2)
    a, b = make(group, 0, algorithm=algorithm, **extra), make(group, 1, algorithm=algorithm, **extra)
    a.attach(), b.attach()
    for _ in range(10):
        a.train_one()
        b.train_one()
    a.detach(), b.detach()
    assert a.counters.step == b.counters.step == 10
    assert a.counters.tokens == 10 * 2 * 16
    assert a.outer.stats.syncs_done == 2 and a.outer.stats.syncs_missed == 0
    assert b.outer.stats.syncs_done == 2


def test_snapshot_restores_and_continues_identically():
    group = LocalGroup(1)
    a = make(group, 0)
    a.attach()
    for _ in range(7):
        a.train_one()
    snap = deserialize(a.snapshot(peer="a").to_bytes())
    assert snap.meta["step"] == 7 and snap.meta["peer"] == "a"
    b = make(LocalGroup(1), 0)
    with torch.no_grad():
        for p in b.model.parameters():
            p.add_(1.0)  # the restore must overwrite every weight
    b.restore(snap, from_peer=False)
    b.attach()
    assert b.model_hash() == a.model_hash() and b.counters == a.counters
    assert b.outer.stats.syncs_missed == a.outer.stats.syncs_missed
    for _ in range(4):
        la, lb = a.train_one(), b.train_one()
        assert la == lb
    assert b.model_hash() == a.model_hash()


def test_state_from_a_peer_resets_our_sync_counters():
    a = make(LocalGroup(1), 0)
    a.attach()
    for _ in range(6):
        a.train_one()
    assert a.outer.stats.syncs_missed == 1  # alone in its group: a solo update
    joiner = make(LocalGroup(1), 0)
    joiner.restore(a.snapshot(), from_peer=True)
    assert joiner.model_hash() == a.model_hash()
    assert joiner.counters.step == 6
    assert joiner.outer.stats.syncs_missed == 0 and joiner.outer.stats.last_sync_step == -1


def test_restore_refuses_mismatched_state():
    a = make(LocalGroup(1), 0)
    snap = a.snapshot()
    with pytest.raises(CheckpointError, match="trained with 'noloco', this node runs 'diloco'"):
        make(LocalGroup(1), 0, algorithm="diloco").restore(snap, from_peer=True)
    with pytest.raises(CheckpointError, match="model of shape"):
        make(LocalGroup(1), 0, d_model=32).restore(snap, from_peer=True)
    snap.state["model"]["wte.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="not finite"):
        make(LocalGroup(1), 0).restore(snap, from_peer=True)


def test_lr_schedule_and_data_rank():
    t = make(LocalGroup(1), 0, lr=1e-3, warmup=4)
    assert t.lr_at(0) == pytest.approx(2.5e-4) and t.lr_at(3) == pytest.approx(1e-3) and t.lr_at(100) == 1e-3
    t2 = make(LocalGroup(1), 0, lr=1e-3, warmup=0, steps=10)
    assert t2.lr_at(0) == pytest.approx(1e-3) and t2.lr_at(10) == pytest.approx(1e-4)
    assert data_rank(b"\x01" * 32) != data_rank(b"\x02" * 32)
    assert data_rank(b"\x01" * 32) == data_rank(b"\x01" * 32)
