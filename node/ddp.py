"""Fully synchronous data-parallel training: the baseline every low-bandwidth method is judged by.

W workers hold identical weights; every step each computes the gradient of its own batch, the
gradients are averaged (an all-reduce), and every worker applies the same optimizer step, so the
replicas never diverge. Because they never diverge, one process can simulate W workers with one
model: the gradient of the mean of the W per-batch losses *is* the mean of the W per-replica
gradients (linearity of the gradient). `replica_mean_grads` computes the latter with real
replicas and `microbatch_mean_grads` the former; tests/test_ddp.py checks they agree.

Bytes are counted as a bandwidth-optimal ring all-reduce (reduce-scatter then all-gather) of fp32
gradients would send, per worker per step: 2 * (W - 1) / W * P * 4 bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import torch
import torch.nn as nn

from node.lm_task import Batcher, lm_loss


def ring_allreduce_bytes(n_params: int, workers: int, bytes_per_value: int = 4) -> float:
    """Bytes one worker sends in a ring all-reduce of `n_params` values among `workers`.

    Reduce-scatter and all-gather each send (W - 1) chunks of P / W values. One worker alone
    sends nothing.
    """
    if n_params < 0 or workers < 1 or bytes_per_value < 1:
        raise ValueError(
            f"need n_params >= 0, workers >= 1, bytes_per_value >= 1; got {n_params}, {workers}, {bytes_per_value}"
        )
    return float(Fraction(2 * (workers - 1) * n_params * bytes_per_value, workers))


def microbatch_mean_grads(
    model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> list[float]:
    """Leave in `.grad` the gradient of mean_w loss(batch_w), accumulated one batch at a time.

    Each backward adds grad(loss_w) / W, so peak memory is one batch's activations. Returns the
    per-batch losses (nats).
    """
    if not batches:
        raise ValueError("need at least one batch")
    model.zero_grad(set_to_none=True)
    losses = []
    for x, y in batches:
        loss = lm_loss(model, x, y)
        (loss / len(batches)).backward()
        losses.append(float(loss.detach()))
    return losses


def replica_mean_grads(
    replicas: Sequence[nn.Module], batches: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> list[torch.Tensor]:
    """What real DDP computes: each replica's own gradient on its own batch, then the mean.

    Returns one averaged tensor per parameter (in `parameters()` order) and leaves every
    replica's `.grad` set to it, as an all-reduce would.
    """
    if len(replicas) != len(batches) or not replicas:
        raise ValueError(f"need one batch per replica, got {len(replicas)} replicas and {len(batches)} batches")
    per_replica: list[list[torch.Tensor]] = []
    for model, (x, y) in zip(replicas, batches):
        model.zero_grad(set_to_none=True)
        lm_loss(model, x, y).backward()
        per_replica.append([p.grad.detach().clone() for p in model.parameters()])
    mean = [torch.stack(gs).mean(dim=0) for gs in zip(*per_replica)]
    for model in replicas:
        for p, g in zip(model.parameters(), mean):
            p.grad = g.clone()
    return mean


class DataParallel:
    """W simulated workers in lockstep on one model; one `step()` = one synchronous DDP step.

    `batchers[w]` is worker w's data stream, so the tokens match those the same workers would
    read under any other algorithm. `scheduler`, if given, is stepped after every optimizer step.
    """

    def __init__(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        batchers: Sequence[Batcher],
        clip: float | None = 1.0,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ) -> None:
        if not batchers:
            raise ValueError("DataParallel needs at least one worker's Batcher")
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be > 0 or None, got {clip}")
        self.model = model
        self.opt = opt
        self.batchers = list(batchers)
        self.clip = clip
        self.scheduler = scheduler
        self.n_params = sum(p.numel() for p in model.parameters())
        self.steps = 0  # synchronous steps taken
        self.tokens = 0  # tokens consumed, summed over workers
        self.bytes_per_worker = 0.0  # what each worker would have sent so far (ring, fp32)

    @property
    def workers(self) -> int:
        return len(self.batchers)

    def step(self) -> float:
        """One synchronous step over every worker's next batch; returns the mean loss (nats)."""
        self.model.train()
        batches = [b.next() for b in self.batchers]
        losses = microbatch_mean_grads(self.model, batches)
        if self.clip is not None:
            # Clipping the averaged gradient is what every DDP worker does after the all-reduce.
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps += 1
        self.tokens += sum(x.numel() for x, _ in batches)
        self.bytes_per_worker += ring_allreduce_bytes(self.n_params, self.workers)
        return sum(losses) / len(losses)
