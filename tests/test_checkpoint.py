"""Checkpoints: round trip of model + optimizer state, atomic files, corruption refused, fallback."""

import json
import os
import stat

import numpy as np
import pytest
import torch

from node.checkpoint import (
    CheckpointError,
    CheckpointStore,
    Snapshot,
    content_hash,
    deserialize,
    flatten_state,
    load_checkpoint,
    model_hash,
    serialize,
    unflatten_state,
    write_atomic,
)
from node.lm_task import LMConfig, build_model, train_step

TINY = LMConfig(context=16, d_model=16, n_layer=1, n_head=2)


def trained(steps: int = 2):
    model = build_model(TINY, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randint(0, 256, (2, 16), generator=g)
        train_step(model, opt, x, x)
    return model, opt


def test_flatten_keeps_int_keys_tuples_and_numpy():
    state = {"state": {0: {"step": torch.tensor(3.0), "m": torch.ones(2)}}, "groups": [{"betas": (0.9, 0.95), "lr": 1e-3, "params": [0]}],
             "outer": np.arange(3, dtype=np.float32), "n": np.int64(4), "flag": True, "none": None}
    tensors, skeleton = flatten_state(state)
    assert sorted(tensors) == ["outer", "state.0.m", "state.0.step"]
    back = unflatten_state(tensors, json.loads(json.dumps(skeleton)))
    assert list(back["state"].keys()) == [0]  # an int key stays an int through JSON
    assert back["groups"] == [{"betas": [0.9, 0.95], "lr": 1e-3, "params": [0]}]
    assert torch.equal(back["outer"], torch.tensor([0.0, 1.0, 2.0]))
    assert back["n"] == 4 and back["flag"] is True and back["none"] is None
    with pytest.raises(CheckpointError, match="type object"):
        flatten_state({"bad": object()})


def test_round_trip_restores_model_and_both_optimizers_exactly():
    model, opt = trained()
    data = serialize({"model": model.state_dict(), "inner": opt.state_dict(), "counters": {"step": 2}}, {"step": 2, "peer": "abc"})
    snap = deserialize(data)
    assert snap.meta == {"step": 2, "peer": "abc"} and snap.step == 2
    model2 = build_model(TINY, 1)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    model2.load_state_dict(snap.state["model"])
    opt2.load_state_dict(snap.state["inner"])
    assert model_hash(model2) == model_hash(model)
    # The restored optimizer continues exactly like the original.
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(9))
    train_step(model, opt, x, x)
    train_step(model2, opt2, x, x)
    assert model_hash(model2) == model_hash(model)


def test_tied_weights_are_saved_under_both_names():
    model = build_model(TINY, 0)
    tensors, _ = flatten_state(model.state_dict())
    assert torch.equal(tensors["wte.weight"], tensors["head.weight"])
    assert tensors["wte.weight"].data_ptr() != tensors["head.weight"].data_ptr()


def test_content_hash_covers_names_dtypes_shapes_values_and_meta():
    t = {"a": torch.zeros(4)}
    base = content_hash(t, None, {})
    assert content_hash({"b": torch.zeros(4)}, None, {}) != base
    assert content_hash({"a": torch.zeros(4, dtype=torch.float64)}, None, {}) != base
    assert content_hash({"a": torch.zeros(2, 2)}, None, {}) != base
    assert content_hash({"a": torch.tensor([0.0, 0, 0, 1e-30])}, None, {}) != base
    assert content_hash(t, None, {"step": 1}) != base
    assert content_hash({"a": torch.zeros(4)}, None, {}) == base


@pytest.mark.parametrize("where", ["tensor", "tail", "truncate"])
def test_corruption_is_refused_with_a_clear_error(where):
    model, opt = trained(1)
    data = bytearray(serialize({"model": model.state_dict()}, {"step": 1}))
    if where == "tensor":
        data[len(data) // 2] ^= 0x01
        match = "content hash mismatch"
    elif where == "tail":
        data[-1] ^= 0x80
        match = "content hash mismatch"
    else:
        data = data[: len(data) // 2]
        match = "truncated"
    with pytest.raises(CheckpointError, match=match):
        deserialize(bytes(data))


def test_not_a_checkpoint():
    with pytest.raises(CheckpointError, match="too short"):
        deserialize(b"abc")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        deserialize((5).to_bytes(8, "little") + b"{{{{{")


def test_write_atomic_replaces_whole_file(tmp_path):
    p = tmp_path / "f.bin"
    write_atomic(p, b"one")
    write_atomic(p, b"two")
    assert p.read_bytes() == b"two"
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert [q.name for q in tmp_path.iterdir()] == ["f.bin"]  # no temp file left


def test_store_keeps_newest_and_falls_back_past_a_corrupt_file(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    model, _ = trained(1)
    hashes = {}
    for step in (10, 20, 30):
        with torch.no_grad():
            model.wte.weight.add_(1.0)
        hashes[step] = model_hash(model)
        store.save(Snapshot({"model": model.state_dict()}, {"step": step}))
    assert [s for s, _ in store.paths()] == [30, 20]  # step 10 pruned
    newest = tmp_path / "ckpt-000000030.safetensors"
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    newest.write_bytes(bytes(raw))
    snap = CheckpointStore(tmp_path).load_latest()
    assert snap.step == 20
    model2 = build_model(TINY, 5)
    model2.load_state_dict(snap.state["model"])
    assert model_hash(model2) == hashes[20]
    assert (tmp_path / "ckpt-000000030.safetensors.corrupt").exists()  # kept for inspection, out of the way
    assert [s for s, _ in CheckpointStore(tmp_path).paths()] == [20]


def test_store_with_nothing_and_load_errors(tmp_path):
    assert CheckpointStore(tmp_path / "none").load_latest() is None
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
    (tmp_path / "ckpt-000000001.safetensors").write_bytes(b"garbage!garbage!")
    store = CheckpointStore(tmp_path)
    assert store.load_latest() is None
    assert len(store.refused) == 1 and "refusing" in store.refused[0][1]
    with pytest.raises(ValueError, match="keep must be >= 1"):
        CheckpointStore(tmp_path, keep=0)
