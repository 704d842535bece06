"""The one check every tensor from a peer passes before it touches our weights.

DiLoCo and Streaming DiLoCo apply it to the averaged pseudo-gradients a `group_average` returns
(they include peers' data); NoLoCo applies it to its partner's (φ, Δ). A tensor that fails costs
that contribution, never the node: the caller drops it, counts it in `stats.rejected` and takes
its fallback (NoLoCo: solo update; DiLoCo: skip the outer step and restore, like torchft).
"""

from __future__ import annotations

from typing import Sequence

import math

import numpy as np
import torch


def check_peer_tensors(
    received: Sequence[np.ndarray],
    own: Sequence[np.ndarray],
    max_norm_ratio: float,
    norm_eps: float,
) -> str | None:
    """Return None if `received` is acceptable, else a one-line reason to log.

    Acceptable means: as many tensors as `own`; each float32 with `own`'s shape; every element
    finite; and L2 norm ≤ `max_norm_ratio`·max(‖own_i‖, s_i) + `norm_eps`, where
    s_i = ‖own‖·sqrt(n_i / n) is tensor i's share of our whole norm (its norm if every element
    of ours had moved alike). The bound compares like with like (a peer's Δ with our Δ, its φ
    with our φ): a partner whose progress is orders of magnitude larger than ours diverged or is
    hostile. The share is a floor because a small tensor's own progress is noisy: over 5 inner
    steps of the tiny test LM, a LayerNorm bias's Δ ranged from 0.017 to 1.2 of its share, so
    comparing with our own Δ alone rejected honest partners (about one exchange in 100).
    `_l2` rescales when float32 squares overflow, so large but finite values get their true
    norm, never inf.
    """
    if len(received) != len(own):
        return f"expected {len(own)} tensors, got {len(received)}"
    own_norms: list[float] = []
    if not math.isinf(max_norm_ratio):
        own_norms = [_l2(o) for o in own]
        total = math.sqrt(sum(n * n for n in own_norms))  # float64: squared float32 norms fit
        count = sum(o.size for o in own)
    for i, (r, o) in enumerate(zip(received, own)):
        if not isinstance(r, np.ndarray):
            return f"tensor {i}: expected a numpy array, got {type(r).__name__}"
        if r.dtype != np.float32:
            return f"tensor {i}: dtype {r.dtype}, expected float32"
        if r.shape != o.shape:
            return f"tensor {i}: shape {r.shape}, expected {o.shape}"
        if not np.isfinite(r).all():
            return f"tensor {i}: contains NaN or inf"
        if math.isinf(max_norm_ratio):  # the norm check is turned off
            continue
        r_norm, o_norm = _l2(r), own_norms[i]
        share = total * math.sqrt(o.size / count) if count else 0.0
        bound = max_norm_ratio * max(o_norm, share) + norm_eps
        if not r_norm <= bound:
            return (f"tensor {i}: norm {r_norm:.4g} exceeds {max_norm_ratio:g} x max(own norm {o_norm:.4g}, "
                    f"share {share:.4g}) + {norm_eps:g}")
    return None


def _l2(a: np.ndarray) -> float:
    """L2 norm of a finite array. float32 in torch (numpy's float64 dot is 400x slower here);
    if the squares overflow, the exact norm is max|a| · ‖a / max|a|‖ instead."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).reshape(-1))
    n = float(torch.linalg.vector_norm(t))
    if math.isinf(n):
        s = float(t.abs().max())
        n = s * float(torch.linalg.vector_norm(t / s))
    return n
