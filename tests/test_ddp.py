"""The synchronous data-parallel baseline: one model with W micro-batches is exactly W replicas."""

from __future__ import annotations

import copy

import pytest
import torch

from node.ddp import DataParallel, microbatch_mean_grads, replica_mean_grads, ring_allreduce_bytes
from node.lm_task import Batcher, LMConfig, build_model, load_corpus

TINY = LMConfig(context=16, d_model=32, n_layer=2, n_head=2)
W = 4


def _batches(w: int = W, seed: int = 0):
    corpus = load_corpus(None)
    return [Batcher(corpus, 3, TINY.context, rank=r, seed=seed).next() for r in range(w)]


def test_ring_allreduce_bytes_hand_computed():
    assert ring_allreduce_bytes(1000, 8) == 2 * 7 / 8 * 1000 * 4 == 7000.0
    assert ring_allreduce_bytes(1_232_128, 8) == 8_624_896.0
    assert ring_allreduce_bytes(10, 3) == pytest.approx(2 * 2 / 3 * 10 * 4)
    assert ring_allreduce_bytes(1000, 1) == 0.0  # alone: nothing to send
    assert ring_allreduce_bytes(1000, 2, bytes_per_value=2) == 2000.0
    with pytest.raises(ValueError):
        ring_allreduce_bytes(1000, 0)


def test_replica_gradient_average_equals_mean_loss_gradient():
    batches = _batches()
    model = build_model(TINY, seed=0)
    replicas = [copy.deepcopy(model) for _ in range(W)]
    averaged = replica_mean_grads(replicas, batches)
    microbatch_mean_grads(model, batches)
    for (name, p), g in zip(model.named_parameters(), averaged):
        assert torch.allclose(p.grad, g, rtol=1e-5, atol=1e-7), name
    # Every replica ends with the all-reduced gradient.
    for rep in replicas[1:]:
        for p0, p1 in zip(replicas[0].parameters(), rep.parameters()):
            assert torch.equal(p0.grad, p1.grad)


def test_per_replica_gradients_differ_so_the_check_is_not_vacuous():
    batches = _batches()
    a, b = build_model(TINY, seed=0), build_model(TINY, seed=0)
    microbatch_mean_grads(a, batches[:1])
    microbatch_mean_grads(b, batches[1:2])
    assert not torch.allclose(a.wte.weight.grad, b.wte.weight.grad)


def test_data_parallel_step_matches_w_replicas_stepping_in_lockstep():
    corpus = load_corpus(None)
    model = build_model(TINY, seed=0)
    replicas = [copy.deepcopy(model) for _ in range(W)]
    opts = [torch.optim.AdamW(r.parameters(), lr=1e-2) for r in replicas]
    ddp = DataParallel(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        [Batcher(corpus, 3, TINY.context, rank=r, seed=1) for r in range(W)],
        clip=None,
    )
    ref_batchers = [Batcher(corpus, 3, TINY.context, rank=r, seed=1) for r in range(W)]
    for _ in range(3):
        ddp.step()
        replica_mean_grads(replicas, [b.next() for b in ref_batchers])
        for opt in opts:
            opt.step()
    for p, q in zip(model.parameters(), replicas[0].parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6)
    assert ddp.steps == 3
    assert ddp.tokens == 3 * W * 3 * TINY.context
    assert ddp.bytes_per_worker == 3 * ring_allreduce_bytes(sum(p.numel() for p in model.parameters()), W)


def test_data_parallel_reduces_loss_and_validates_arguments():
    model = build_model(TINY, seed=0)
    corpus = load_corpus(None)
    ddp = DataParallel(
        model,
        torch.optim.AdamW(model.parameters(), lr=3e-3),
        [Batcher(corpus, 4, TINY.context, rank=r, seed=0) for r in range(2)],
    )
    losses = [ddp.step() for _ in range(30)]
    assert ddp.workers == 2
    assert sum(losses[-5:]) / 5 < 0.85 * losses[0]
    with pytest.raises(ValueError, match="at least one"):
        DataParallel(model, torch.optim.SGD(model.parameters(), lr=0.1), [])
    with pytest.raises(ValueError, match="clip"):
        DataParallel(model, torch.optim.SGD(model.parameters(), lr=0.1), ddp.batchers, clip=0.0)
    with pytest.raises(ValueError, match="one batch per replica"):
        replica_mean_grads([model], _batches(2))


def test_convergence_benchmark_counts_equal_tokens_and_exact_bytes(tmp_path):
    """The benchmark harness end to end, tiny: 2 workers x 4 steps of a 2-layer model."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "bench"))
    import convergence

    out = tmp_path / "conv.json"
    argv = ["--workers", "2", "--steps", "4", "--pretrain-steps", "2", "--batch", "2", "--context", "16",
            "--d-model", "32", "--n-layer", "2", "--n-head", "2", "--warmup", "1",
            "--diloco-sync-every", "2", "--noloco-sync-every", "2", "--streaming-sync-every", "2",
            "--streaming-fragments", "2", "--streaming-delay", "0", "--eval-every", "2", "--eval-seqs", "2",
            "--diloco-codec", "fp32", "--noloco-codec", "fp32", "--json", str(out)]
    assert convergence.main(argv) == 0
    result = json.loads(out.read_text())
    methods = result["methods"]
    assert set(methods) == {"ddp", "diloco", "streaming-diloco", "noloco"}
    n = result["config"]["params"]
    assert n == sum(p.numel() for p in build_model(LMConfig(context=16, d_model=32, n_layer=2, n_head=2), 0).parameters())
    for name, m in methods.items():
        assert m["tokens"] == 2 * 4 * 2 * 16, name  # equal tokens for every method
        assert m["loss_ratio_vs_ddp"] == pytest.approx(m["eval_bpb"] / methods["ddp"]["eval_bpb"], rel=1e-3)
        assert [p["step"] for p in m["curve"]] == [0, 2, 4]
    # DDP: 4 steps of a 2-worker ring all-reduce of fp32 gradients = 4 * (2 * 1/2 * 4P) = 16P.
    assert methods["ddp"]["bytes_per_worker"] == 16 * n
    # DiLoCo, fp32, 2 workers: each of the 2 syncs sends 1/2 of 4P bytes twice = 4P; total 8P.
    assert methods["diloco"]["bytes_per_worker"] == 8 * n
    assert methods["diloco"]["bytes_ratio_vs_ddp"] == 2.0
    # NoLoCo, fp32: each of the 2 exchanges sends (phi, delta) = 8P bytes plus a msgpack header.
    assert 16 * n < methods["noloco"]["bytes_per_worker"] < 16 * n + 2 * 4096
    assert 0 < methods["streaming-diloco"]["bytes_per_worker"] < methods["diloco"]["bytes_per_worker"]
