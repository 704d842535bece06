"""Streaming DiLoCo: DiLoCo one fragment at a time, overlapped with τ inner steps, 4-bit payloads.

Douillard et al., "Streaming DiLoCo with overlapping communication" (arXiv 2501.18512), §2
(fragments, overlap, merge) and Table 1 (FP4 payloads); schedule and merge as in torchft's
`local_sgd.DiLoCo` / `_StreamingDiLoCoFragment`. ALGORITHMS.md §2.

- Fragments: `outer_math.assign_fragments` (block b -> fragment b mod P, or 1 + b mod (P−1) with
  the non-block parameters in their own fragment 0). Blocks are the children of the model's
  largest `nn.ModuleList` (a transformer's layers), or the modules passed as `blocks=`; a model
  without one treats each parameter tensor as a block.
- Schedule: `outer_math.fragment_due`: fragment p starts syncing every H/P inner steps in turn, so
  each fragment syncs once per H steps.
- Sync of fragment p launched after step t_s: g = θ̃^(p) − θ^(p)(t_s) goes to `group_average`
  (key `streaming/<p>/<k>`, k = that fragment's sync count). Training continues; after step
  t_s + τ the result is applied: Nesterov step on θ̃^(p), then the merge
  θ^(p) ← α·θ^(p)(t_s+τ) + (1−α)·θ̃^(p). With τ = 0 it lands before the next forward pass.
  P = 1, τ = 0, α = 0 is exactly DiLoCo.
- Failures per fragment as in `diloco.py` (solo outer step + merge; rejected: restore θ^(p) ← θ̃^(p)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from optimizers.base import check_common_config
from optimizers.diloco import NesterovOuter
from optimizers.outer_math import assign_fragments, fragment_due, lerp_merge

if TYPE_CHECKING:
    from optimizers.comm import Comm


@dataclass(frozen=True)
class StreamingConfig:
    """Streaming DiLoCo hyper-parameters (ALGORITHMS.md §2; PROPOSED = ours, in no source)."""

    sync_every: int = 100  # H: each fragment syncs once per H inner steps (paper: 100)
    fragments: int = 4  # P: fragments, synced in turn every H/P steps; must divide H
    delay: int = 1  # τ: inner steps between launching a fragment's sync and applying it
    #                 (paper headline τ=1; must be < H/P so one sync finishes before the next starts)
    merge_alpha: float = 0.5  # α in θ ← α·θ_local + (1−α)·θ̃ (PROPOSED 0.5; 0 = overwrite, torchft)
    outer_lr: float = 0.7  # outer Nesterov lr (PROPOSED, from DiLoCo; not retrieved for streaming)
    outer_momentum: float = 0.9  # outer Nesterov momentum (PROPOSED, from DiLoCo)
    codec: str = "e3m0"  # 4-bit log codec, ~4.25 bits/value (PROPOSED layout of the paper's FP4)
    timeout: float = 120.0  # seconds a fragment sync may take before we step alone
    weight: float = 1.0  # this node's weight in the group mean
    max_norm_ratio: float = 10.0  # reject an averaged g with norm > this × our own g's ...
    norm_eps: float = 1e-6  # ... plus this

    def __post_init__(self) -> None:
        check_common_config(self)
        if not isinstance(self.fragments, int) or self.fragments < 1:
            raise ValueError(f"fragments must be an int >= 1, got {self.fragments!r}")
        if self.sync_every % self.fragments != 0:
            raise ValueError(
                f"fragments ({self.fragments}) must divide sync_every ({self.sync_every}): "
                f"e.g. sync_every={self.fragments * max(1, round(self.sync_every / self.fragments))}"
            )
        stride = self.sync_every // self.fragments
        if not isinstance(self.delay, int) or not 0 <= self.delay < stride:
            raise ValueError(
                f"delay must be an int in [0, sync_every/fragments) = [0, {stride}) so a fragment's "
                f"sync lands before the next one starts, got {self.delay!r}"
            )
        if not (isinstance(self.merge_alpha, (int, float)) and 0 <= self.merge_alpha <= 1):
            raise ValueError(f"merge_alpha must be in [0, 1] (0 = overwrite with θ̃), got {self.merge_alpha!r}")


def find_blocks(
    model: torch.nn.Module, params: Sequence[torch.nn.Parameter], blocks: Sequence[torch.nn.Module] | None = None
) -> list[int | None]:
    """Block index of each of `params` (None: not in a block).

    Blocks are `blocks` if given, else the children of the `nn.ModuleList` holding the most
    parameter values (e.g. nanoGPT's `transformer.h`). With neither, each parameter is a block.
    """
    if blocks is None:
        best, best_size = None, 0
        for mod in model.modules():
            if isinstance(mod, torch.nn.ModuleList) and len(mod) >= 2:
                size = sum(p.numel() for p in mod.parameters())
                if size > best_size:
                    best, best_size = mod, size
        if best is None:
            return list(range(len(params)))
        blocks = list(best)
    owner: dict[int, int] = {}
    for b, mod in enumerate(blocks):
        if not isinstance(mod, torch.nn.Module):
            raise ValueError(f"blocks[{b}] must be an nn.Module, got {type(mod).__name__}")
        for p in mod.parameters():
            if id(p) in owner and owner[id(p)] != b:
                raise ValueError(f"a parameter belongs to blocks {owner[id(p)]} and {b}: blocks must be disjoint")
            owner[id(p)] = b
    return [owner.get(id(p)) for p in params]


class StreamingDiLoCo(NesterovOuter):
    """`with StreamingDiLoCo(model, opt, comm, StreamingConfig(...)) as outer:` then `opt.step()`.

    `fragment_of[i]` is the fragment of the i-th synced parameter (`model.named_parameters()`
    order, restricted to what `inner_opt` updates).
    """

    algorithm = "streaming-diloco"

    def __init__(
        self,
        model: torch.nn.Module,
        inner_opt: torch.optim.Optimizer,
        comm: "Comm",
        config: StreamingConfig | None = None,
        blocks: Sequence[torch.nn.Module] | None = None,
    ):
        config = StreamingConfig() if config is None else config
        if not isinstance(config, StreamingConfig):
            raise ValueError(f"config must be a StreamingConfig, got {type(config).__name__}")
        super().__init__(model, inner_opt, comm, config)
        block_of = find_blocks(model, [p for _, p in self._named], blocks)
        self.fragment_of = assign_fragments(block_of, config.fragments)
        self.fragments = [[i for i, f in enumerate(self.fragment_of) if f == p] for p in range(config.fragments)]

    def _on_step(self, step: int) -> None:
        cfg = self.config
        p = fragment_due(step, cfg.sync_every, cfg.fragments)
        if p is None:
            return
        k = (step // (cfg.sync_every // cfg.fragments) - 1) // cfg.fragments
        due = step + cfg.delay if cfg.delay > 0 else None
        self._start_sync(f"streaming/{p}/{k}", step, self.fragments[p], due)

    def _write_back(self, idxs: list[int]) -> None:
        if self.config.merge_alpha == 0.0:  # overwrite; also keeps a non-finite local value out
            super()._write_back(idxs)
            return
        for i in idxs:
            self._write_param(i, lerp_merge(self._local(i), self._outer[i], self.config.merge_alpha))
