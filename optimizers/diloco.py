"""DiLoCo as a hook on the user's inner optimizer.

Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models" (arXiv
2311.08455), Algorithm 1; the hook form follows torchft's `local_sgd.DiLoCo`. ALGORITHMS.md §2.

Every H inner steps each worker m computes its pseudo-gradient `g_m = θ̃ − θ_m` (see
`outer_math` for the sign), the group averages it (`group_average`, compressed by `codec`), and
each worker applies the same SGD-Nesterov step to its own copy of the outer weights θ̃ and sets
`θ_m ← θ̃`. There is no shared global model: copies stay equal because every member applies the
same averaged pseudo-gradient.

Failures (each logged and counted in `stats`, training continues):
- nobody else joined, timeout, collective error  -> solo outer step with our own g (syncs_missed)
- some members or elements missing               -> apply what was averaged (syncs_partial)
- averaged tensors fail `check_peer_tensors`     -> skip the outer step and restore θ ← θ̃,
                                                    as torchft does when a commit fails (rejected)
- our own g is not finite (local divergence)      -> restore θ ← θ̃ and contribute g = 0 (rejected)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from optimizers.base import OuterOptimizer, check_common_config, resolve_codec
from optimizers.checks import check_peer_tensors
from optimizers.outer_math import diloco_outer_grad, nesterov_outer_step

if TYPE_CHECKING:
    from optimizers.comm import Comm


@dataclass(frozen=True)
class DiLoCoConfig:
    """DiLoCo hyper-parameters; defaults from the paper (ALGORITHMS.md §2) unless marked."""

    sync_every: int = 500  # H: inner steps between outer steps (paper: 500)
    outer_lr: float = 0.7  # η_out of the outer SGD-Nesterov (paper: 0.7)
    outer_momentum: float = 0.9  # μ, Nesterov momentum of the outer step (paper: 0.9)
    codec: str = "bf16"  # pseudo-gradient codec: bf16 halves the bytes of fp32; OpenDiLoCo found
    #                      16-bit all-reduce harmless. Use "fp32" for bit-exact reference runs.
    timeout: float = 120.0  # seconds a sync may take before we give up and step alone
    weight: float = 1.0  # this node's weight in the group mean (e.g. its share of the tokens)
    max_norm_ratio: float = 10.0  # reject an averaged g whose norm exceeds this × our own g's ...
    norm_eps: float = 1e-6  # ... plus this (so a zero own g does not reject everything)

    def __post_init__(self) -> None:
        check_common_config(self)


class NesterovOuter(OuterOptimizer):
    """What DiLoCo and Streaming DiLoCo share: the outer weights θ̃ and Nesterov buffers v (float32
    on CPU, like torchft's `original_parameters`), and applying one `group_average` outcome to a
    set of parameters. Subclasses decide the schedule and how θ̃ is written back."""

    def __init__(self, model: torch.nn.Module, inner_opt: torch.optim.Optimizer, comm: "Comm", config: Any):
        super().__init__(model, inner_opt, comm, config.timeout)
        self.config = config
        self.codec = resolve_codec(config.codec)
        self._outer = [self._local(i) for i in range(len(self._named))]  # θ̃, param shapes
        self._velocity = [torch.zeros_like(t) for t in self._outer]  # v, Nesterov buffer

    def _state_tensors(self) -> dict[str, list[torch.Tensor]]:
        return {"outer_params": self._outer, "outer_momentum": self._velocity}

    def _start_sync(self, key: str, step: int, idxs: list[int], due_step: int | None) -> None:
        """Launch the average of `g = θ̃ − θ` over parameters `idxs`."""
        grads = [diloco_outer_grad(self._outer[i], self._local(i)) for i in idxs]
        if not all(torch.isfinite(g).all() for g in grads):
            # Our own training diverged: drop its progress (θ ← θ̃) and contribute g = 0, so the
            # group is not poisoned, nobody waits for us, and we still take the group's step.
            self.stats.rejected += 1
            self._restore(idxs)
            self._log_outcome(f"sync {key}", "own update not finite, restored θ̃ and sent zeros", "local divergence")
            grads = [torch.zeros_like(g) for g in grads]
        flat = [self._flat(g) for g in grads]
        cfg = self.config
        self._launch(
            lambda: self.comm.group_average(key, flat, self.codec, weight=cfg.weight, timeout=cfg.timeout),
            due_step,
            lambda result, err: self._apply(key, step, idxs, grads, result, err),
        )

    def _apply(self, key: str, step: int, idxs: list[int], grads: list[torch.Tensor], result: Any,
               err: BaseException | None) -> None:
        what = f"sync {key} (launched at step {step})"
        own = [self._flat(g) for g in grads]
        if err is not None or result is None or result.alone:
            why = f"{type(err).__name__}: {err}" if err is not None else "no peer joined"
            self.stats.syncs_missed += 1
            self._log_outcome(what, "solo outer step", why, logging.WARNING if err is not None else logging.INFO)
            self._outer_step(idxs, grads)
            return
        reason = check_peer_tensors(result.tensors, own, self.config.max_norm_ratio, self.config.norm_eps)
        if reason is not None:
            self.stats.rejected += 1
            self._restore(idxs)
            self._log_outcome(what, "averaged pseudo-gradient rejected, restored θ̃", reason)
            return
        self.stats.syncs_done += 1
        if not result.complete:
            self.stats.syncs_partial += 1
            self._log_outcome(
                what, "partial average applied",
                f"{len(result.contributors)}/{len(result.group)} members, min fraction {min(result.fractions, default=1.0):.3f}",
                logging.INFO,
            )
        nbytes = self._group_bytes(self.codec, idxs, len(result.contributors))
        self.stats.bytes_sent += nbytes
        self.stats.bytes_received += nbytes
        self.stats.last_sync_step = step
        avg = [torch.from_numpy(np.ascontiguousarray(t)).view_as(g) for t, g in zip(result.tensors, grads)]
        self._outer_step(idxs, avg)

    def _outer_step(self, idxs: list[int], grads: list[torch.Tensor]) -> None:
        for i, g in zip(idxs, grads):
            self._outer[i], self._velocity[i] = nesterov_outer_step(
                self._outer[i], self._velocity[i], g, self.config.outer_lr, self.config.outer_momentum
            )
        self._write_back(idxs)

    def _write_back(self, idxs: list[int]) -> None:
        """After an outer step: θ ← θ̃ (Streaming DiLoCo overrides this with its α-merge)."""
        for i in idxs:
            self._write_param(i, self._outer[i])

    def _restore(self, idxs: list[int]) -> None:
        """Skip the outer step and drop local progress: θ ← θ̃ (torchft's failed-commit path)."""
        for i in idxs:
            self._write_param(i, self._outer[i])


class DiLoCo(NesterovOuter):
    """`with DiLoCo(model, opt, comm, DiLoCoConfig(...)) as outer:` then call `opt.step()` as usual.

    θ̃ starts as a copy of the model's parameters at construction. Parameters synced: those of
    `model` that `inner_opt` updates, in `model.named_parameters()` order (the same on every
    worker). The average for the sync after step t uses key `diloco/<t // H>`.
    """

    algorithm = "diloco"

    def __init__(
        self,
        model: torch.nn.Module,
        inner_opt: torch.optim.Optimizer,
        comm: "Comm",
        config: DiLoCoConfig | None = None,
    ):
        config = DiLoCoConfig() if config is None else config
        if not isinstance(config, DiLoCoConfig):
            raise ValueError(f"config must be a DiLoCoConfig, got {type(config).__name__}")
        super().__init__(model, inner_opt, comm, config)

    def _on_step(self, step: int) -> None:
        if step % self.config.sync_every == 0:
            rnd = step // self.config.sync_every
            self._start_sync(f"diloco/{rnd}", step, list(range(len(self._named))), None)
