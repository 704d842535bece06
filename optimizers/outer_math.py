"""The outer-step math of DiLoCo, Streaming DiLoCo and NoLoCo, as pure functions on tensors.

Nothing here talks to peers, mutates its inputs or keeps state: each function takes tensors and
numbers and returns new tensors, so the hooks in `diloco.py`, `streaming.py` and `noloco.py` stay
thin and every equation is unit-tested against hand-computed numbers
(`tests/test_optimizers_math.py`). Equations and defaults: `/work/shared/ALGORITHMS.md` §1–2.

Sign conventions (they differ between the papers, so read twice):
- DiLoCo's outer gradient is `g = θ̃ − θ_m` (global copy minus local weights; Douillard et al.
  2023, Alg. 1). A worker that made progress has `θ_m` below `θ̃` along the descent direction,
  so `g` points uphill like an ordinary gradient and the outer optimizer *subtracts* it.
  With lr 1 and momentum 0 the outer step is plain model averaging: `θ̃ ← mean_m θ_m`.
- NoLoCo's `Δ = θ − φ` is the local *progress* (the opposite sign; jkolehm/noloco
  `sparse_optimizer_c.py`), so its heavy-ball update *adds* `α·Δ̄`.
"""

from __future__ import annotations

import torch


# --------------------------------------------------------------------------------------------
# DiLoCo outer optimizer: PyTorch SGD with Nesterov momentum, dampening 0.
# --------------------------------------------------------------------------------------------


def diloco_outer_grad(theta_tilde: torch.Tensor, theta_local: torch.Tensor) -> torch.Tensor:
    """The pseudo-gradient a worker contributes: `g_m = θ̃ − θ_m` (same shape as the inputs)."""
    return theta_tilde - theta_local


def nesterov_outer_step(
    theta_tilde: torch.Tensor,
    velocity: torch.Tensor,
    outer_grad: torch.Tensor,
    lr: float,
    momentum: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD-Nesterov step (dampening 0) on the outer weights; returns `(θ̃', v')`.

        v'  = μ·v + g
        θ̃' = θ̃ − η·(g + μ·v')

    This is exactly `torch.optim.SGD(lr=η, momentum=μ, nesterov=True)` with `g` as `.grad`
    (its first step initialises the buffer to `g`, which equals `μ·0 + g`).
    """
    new_velocity = momentum * velocity + outer_grad
    new_theta = theta_tilde - lr * (outer_grad + momentum * new_velocity)
    return new_theta, new_velocity


# --------------------------------------------------------------------------------------------
# NoLoCo: heavy-ball modified Nesterov with a pairwise averaging term.
# --------------------------------------------------------------------------------------------


def noloco_outer_step(
    phi: torch.Tensor,
    momentum_buf: torch.Tensor,
    delta_mean: torch.Tensor,
    phi_mean: torch.Tensor,
    lr: float,
    momentum: float,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One NoLoCo outer step; returns `(φ', m')`, and the caller sets `θ ← φ'`.

        m' = β·m + α·Δ̄ + γ·(φ̄ − φ)
        φ' = φ + m'

    `Δ̄ = (Δ_i + Δ_j)/2` and `φ̄ = (φ_i + φ_j)/2` over the pair. For a solo update (no partner)
    pass `delta_mean = Δ_i` and `phi_mean = φ_i`, which gives `m' = β·m + α·Δ_i`.
    """
    new_m = momentum * momentum_buf + lr * delta_mean + gamma * (phi_mean - phi)
    return phi + new_m, new_m


# --------------------------------------------------------------------------------------------
# Streaming DiLoCo: fragments, schedule, merge.
# --------------------------------------------------------------------------------------------


def lerp_merge(local: torch.Tensor, global_: torch.Tensor, alpha: float) -> torch.Tensor:
    """Merge after an overlapped fragment sync: `α·θ_local + (1−α)·θ̃`.

    α = 0 overwrites the local fragment with the new outer weights (torchft's default);
    α = 0.5 keeps half of the τ inner steps taken while the sync was in flight.
    """
    return alpha * local + (1.0 - alpha) * global_


def fragment_due(step: int, sync_every: int, num_fragments: int) -> int | None:
    """Which fragment starts syncing after inner step `step` (1-based), or None.

    One fragment syncs every `H/P` inner steps, cycling 0, 1, …, P−1, so each fragment syncs once
    every `H = sync_every` steps at staggered offsets (torchft `local_sgd.py` schedule):
        1. `step` not a multiple of H/P  -> None
        2. otherwise                     -> (step / (H/P) − 1) mod P
    E.g. H=6, P=3: step 2 -> 0, step 4 -> 1, step 6 -> 2, step 8 -> 0.
    """
    if step <= 0:
        return None
    stride = sync_every // num_fragments
    if step % stride != 0:
        return None
    return (step // stride - 1) % num_fragments


def assign_fragments(block_of: list[int | None], num_fragments: int) -> list[int]:
    """Fragment index for each parameter, given its block index (None: not in any block).

    Strided assignment, which the Streaming DiLoCo paper mildly prefers (Fig. 6):
        1. one fragment                      -> everything in fragment 0
        2. no non-block parameters           -> block b in fragment b mod P
        3. some non-block parameters         -> those (embeddings, final norm, head) in their own
                                                fragment 0, block b in fragment 1 + b mod (P−1)
                                                (MaxText's placement)
    Raises ValueError, saying how to fix it, when some fragment would be empty.
    """
    if num_fragments < 1:
        raise ValueError(f"num_fragments must be >= 1, got {num_fragments}")
    if num_fragments == 1:
        return [0] * len(block_of)
    blocks = sorted({b for b in block_of if b is not None})
    has_nonblock = any(b is None for b in block_of)
    block_slots = num_fragments - 1 if has_nonblock else num_fragments
    if len(blocks) < block_slots:
        raise ValueError(
            f"cannot split {len(blocks)} block(s)"
            f"{' plus the non-block parameters' if has_nonblock else ''} into {num_fragments} "
            f"fragments: use at most {len(blocks) + (1 if has_nonblock else 0)} fragments"
        )
    # Blocks are renumbered densely so gaps in the caller's numbering cannot empty a fragment.
    rank = {b: i for i, b in enumerate(blocks)}
    out: list[int] = []
    for b in block_of:
        if b is None:
            out.append(0)
        elif has_nonblock:
            out.append(1 + rank[b] % block_slots)
        else:
            out.append(rank[b] % block_slots)
    return out
