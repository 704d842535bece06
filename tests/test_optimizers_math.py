"""The outer-step math, peer checks and pairing, against numbers worked out by hand.

Inputs are dyadic fractions so float32 arithmetic is exact and equality can be asserted exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optimizers.checks import check_peer_tensors
from optimizers.outer_math import (
    assign_fragments,
    diloco_outer_grad,
    fragment_due,
    lerp_merge,
    nesterov_outer_step,
    noloco_outer_step,
)
from optimizers.pairing import pair_matching


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


# ---- DiLoCo ---------------------------------------------------------------------------------


def test_outer_grad_sign_is_global_minus_local() -> None:
    # θ̃ = [1, 1], θ = [0.5, 2]  ->  g = θ̃ − θ = [0.5, −1]
    assert torch.equal(diloco_outer_grad(t(1, 1), t(0.5, 2)), t(0.5, -1))


def test_nesterov_step_hand_computed() -> None:
    # θ̃ = [1, −2], v = [0.5, 0], g = [0.25, −0.5], η = 0.5, μ = 0.5
    # v' = 0.5·[0.5, 0] + [0.25, −0.5] = [0.5, −0.5]
    # θ̃' = [1, −2] − 0.5·([0.25, −0.5] + 0.5·[0.5, −0.5]) = [1 − 0.25, −2 + 0.375] = [0.75, −1.625]
    theta, v = nesterov_outer_step(t(1, -2), t(0.5, 0), t(0.25, -0.5), lr=0.5, momentum=0.5)
    assert torch.equal(v, t(0.5, -0.5))
    assert torch.equal(theta, t(0.75, -1.625))


def test_nesterov_lr1_mom0_is_model_averaging() -> None:
    # Two workers at θ1 = [0, 4], θ2 = [2, 0] from θ̃ = [1, 1]: ḡ = θ̃ − mean(θ) = [0, −1]
    # θ̃' = θ̃ − ḡ = [1, 2] = mean(θ1, θ2)
    g = (diloco_outer_grad(t(1, 1), t(0, 4)) + diloco_outer_grad(t(1, 1), t(2, 0))) / 2
    theta, _ = nesterov_outer_step(t(1, 1), t(0, 0), g, lr=1.0, momentum=0.0)
    assert torch.equal(theta, t(1, 2))


def test_nesterov_matches_torch_sgd_nesterov() -> None:
    # Three outer steps with the paper's η = 0.7, μ = 0.9 against torch.optim.SGD(nesterov=True).
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, generator=gen))
    sgd = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True)
    theta, v = p.detach().clone(), torch.zeros(5)
    for _ in range(3):
        g = torch.randn(5, generator=gen)
        p.grad = g.clone()
        sgd.step()
        theta, v = nesterov_outer_step(theta, v, g, lr=0.7, momentum=0.9)
    torch.testing.assert_close(theta, p.detach(), rtol=0, atol=1e-6)


# ---- NoLoCo ---------------------------------------------------------------------------------


def test_noloco_step_with_partner_hand_computed() -> None:
    # φ = [1, 2], m = [0.25, −0.5], Δ̄ = [0.5, 0.25], φ̄ = [1.5, 1], α = β = γ = 0.5
    # m' = 0.5·[0.25, −0.5] + 0.5·[0.5, 0.25] + 0.5·([1.5, 1] − [1, 2])
    #    = [0.125, −0.25] + [0.25, 0.125] + [0.25, −0.5] = [0.625, −0.625]
    # φ' = [1, 2] + m' = [1.625, 1.375]
    phi, m = noloco_outer_step(t(1, 2), t(0.25, -0.5), t(0.5, 0.25), t(1.5, 1), lr=0.5, momentum=0.5, gamma=0.5)
    assert torch.equal(m, t(0.625, -0.625))
    assert torch.equal(phi, t(1.625, 1.375))


def test_noloco_solo_step_hand_computed() -> None:
    # Solo: φ̄ = φ, Δ̄ = Δ = [0.5, 0.25]: m' = 0.5·[0.25, −0.5] + 0.5·[0.5, 0.25] = [0.375, −0.125]
    # φ' = [1.375, 1.875]; the γ term vanishes whatever γ is.
    for gamma in (0.0, 0.5, 3.0):
        phi, m = noloco_outer_step(t(1, 2), t(0.25, -0.5), t(0.5, 0.25), t(1, 2), lr=0.5, momentum=0.5, gamma=gamma)
        assert torch.equal(m, t(0.375, -0.125))
        assert torch.equal(phi, t(1.375, 1.875))


# ---- Streaming ------------------------------------------------------------------------------


def test_lerp_merge_hand_computed() -> None:
    # α = 0.25: 0.25·[1, 3] + 0.75·[3, −1] = [2.5, 0]
    assert torch.equal(lerp_merge(t(1, 3), t(3, -1), 0.25), t(2.5, 0))
    assert torch.equal(lerp_merge(t(1, 3), t(3, -1), 0.0), t(3, -1))  # α = 0 overwrites
    assert torch.equal(lerp_merge(t(1, 3), t(3, -1), 1.0), t(1, 3))  # α = 1 keeps local


def test_fragment_schedule_cycles_every_h_over_p() -> None:
    # H = 6, P = 3: a fragment every 2 steps, cycling 0, 1, 2.
    assert [fragment_due(s, 6, 3) for s in range(0, 14)] == [
        None, None, 0, None, 1, None, 2, None, 0, None, 1, None, 2, None
    ]
    # P = 1: the whole model every H steps (plain DiLoCo's schedule).
    assert [s for s in range(1, 13) if fragment_due(s, 4, 1) == 0] == [4, 8, 12]


def test_assign_fragments_strided_with_own_nonblock_fragment() -> None:
    # params: emb (None), 4 blocks' params (block 0 has two), head (None); P = 3
    # non-block -> 0; block b -> 1 + b mod 2: b0 -> 1, b1 -> 2, b2 -> 1, b3 -> 2
    assert assign_fragments([None, 0, 0, 1, 2, 3, None], 3) == [0, 1, 1, 2, 1, 2, 0]


def test_assign_fragments_without_nonblock_params() -> None:
    assert assign_fragments([0, 1, 2, 3, 4], 2) == [0, 1, 0, 1, 0]
    # gaps in block numbering are renumbered densely: blocks 3, 7, 9 -> 0, 1, 2
    assert assign_fragments([3, 7, 9], 3) == [0, 1, 2]
    assert assign_fragments([None, 0, 1], 1) == [0, 0, 0]


def test_assign_fragments_rejects_empty_fragments() -> None:
    with pytest.raises(ValueError, match="use at most 3 fragments"):
        assign_fragments([None, 0, 1], 4)
    with pytest.raises(ValueError, match="use at most 2 fragments"):
        assign_fragments([0, 1], 3)
    with pytest.raises(ValueError, match="num_fragments must be >= 1"):
        assign_fragments([0], 0)


# ---- Peer checks ----------------------------------------------------------------------------


def own() -> list[np.ndarray]:
    return [np.array([3.0, 4.0], dtype=np.float32), np.array([1.0], dtype=np.float32)]  # norms 5, 1


def test_check_accepts_good_tensors_at_the_bound() -> None:
    # ratio 2: bounds 2·5 = 10 and 2·1 = 2 (eps 0); [6, 8] has norm exactly 10.
    good = [np.array([6.0, 8.0], dtype=np.float32), np.array([-2.0], dtype=np.float32)]
    assert check_peer_tensors(good, own(), max_norm_ratio=2.0, norm_eps=0.0) is None


def test_infinite_ratio_turns_the_norm_check_off() -> None:
    huge = [np.array([3e38, 3e38], np.float32), np.array([1e30], np.float32)]
    assert check_peer_tensors(huge, own(), max_norm_ratio=float("inf"), norm_eps=0.0) is None
    nan = [np.array([3.0, np.nan], np.float32), np.array([1.0], np.float32)]
    assert check_peer_tensors(nan, own(), max_norm_ratio=float("inf"), norm_eps=0.0) == "tensor 0: contains NaN or inf"


@pytest.mark.parametrize(
    "received, reason",
    [
        ([np.array([3.0, np.nan], np.float32), np.array([1.0], np.float32)], "tensor 0: contains NaN or inf"),
        ([np.array([3.0, 4.0], np.float32), np.array([np.inf], np.float32)], "tensor 1: contains NaN or inf"),
        ([np.array([3.0, 4.0, 5.0], np.float32), np.array([1.0], np.float32)], "tensor 0: shape (3,), expected (2,)"),
        ([np.array([3.0, 4.0], np.float32)], "expected 2 tensors, got 1"),
        ([np.array([3.0, 4.0], np.float64), np.array([1.0], np.float32)], "tensor 0: dtype float64, expected float32"),
        # Tensor 1's own norm is 1, its share of our whole norm √26 is √26·√(1/3) = 2.944: bound 5.889.
        ([np.array([6.0, 8.0], np.float32), np.array([6.0], np.float32)],
         "tensor 1: norm 6 exceeds 2 x max(own norm 1, share 2.944) + 0"),
        ([np.array([3e38, 3e38], np.float32), np.array([1.0], np.float32)], "tensor 0: norm 4.243e+38 exceeds"),
    ],
)
def test_check_rejects_bad_tensors(received: list, reason: str) -> None:
    got = check_peer_tensors(received, own(), max_norm_ratio=2.0, norm_eps=0.0)
    assert got is not None and got.startswith(reason), got


def test_a_small_tensor_is_bounded_by_its_share_of_the_whole_norm() -> None:
    # Our Δ: a big tensor of 99 values 0.1 (norm 0.995) and a 1-value tensor that barely moved
    # (1e-4). Whole norm √(0.99 + 1e-8) = 0.99499; tensor 1's share 0.99499·√(1/100) = 0.099499.
    own = [np.full(99, 0.1, np.float32), np.array([1e-4], np.float32)]
    honest = [np.full(99, 0.1, np.float32), np.array([0.05], np.float32)]  # 500x our own, half its share
    assert check_peer_tensors(honest, own, max_norm_ratio=10.0, norm_eps=0.0) is None
    at_bound = [np.full(99, 0.1, np.float32), np.array([0.99], np.float32)]  # 10 x share = 0.99499
    assert check_peer_tensors(at_bound, own, max_norm_ratio=10.0, norm_eps=0.0) is None
    blown_up = [np.full(99, 0.1, np.float32), np.array([1.0], np.float32)]
    got = check_peer_tensors(blown_up, own, max_norm_ratio=10.0, norm_eps=0.0)
    assert got == "tensor 1: norm 1 exceeds 10 x max(own norm 0.0001, share 0.0995) + 0"
    # Our own Δ all zero (we diverged and sent zeros): only norm_eps is left as the bound.
    zeros = [np.zeros(99, np.float32), np.zeros(1, np.float32)]
    assert check_peer_tensors(honest, zeros, max_norm_ratio=10.0, norm_eps=1e-6).startswith("tensor 0: norm 0.995 exceeds")


# ---- Pairing --------------------------------------------------------------------------------


@pytest.mark.parametrize("w", [2, 7, 8])
def test_pairing_is_a_matching_every_round(w: int) -> None:
    seen = set()
    for rnd in range(40):
        pairs, unpaired = pair_matching(rnd, list(range(w)), seed=3)
        flat = [r for p in pairs for r in p] + ([unpaired] if unpaired is not None else [])
        assert sorted(flat) == list(range(w))  # everyone exactly once: never twice in a round
        assert len(pairs) == w // 2 and (unpaired is None) == (w % 2 == 0)
        seen.add(frozenset(frozenset(p) for p in pairs))
    assert len(seen) == 1 if w == 2 else len(seen) > 10  # fresh matchings (w=2 has only one)


def test_pairing_is_shared_seed_and_order_independent() -> None:
    # The same (seed, round, member set) gives the same matching in any member order ...
    assert pair_matching(5, [0, 1, 2, 3], seed=1) == pair_matching(5, [3, 1, 0, 2], seed=1)
    # ... built as {perm[k], perm[k + W/2]} from numpy's generator keyed by [seed, round].
    perm = np.random.default_rng([1, 5]).permutation(4)
    assert pair_matching(5, [0, 1, 2, 3], seed=1) == ([(perm[0], perm[2]), (perm[1], perm[3])], None)
    # members need not be 0..W-1
    pairs, unpaired = pair_matching(0, [10, 20, 30], seed=0)
    assert len(pairs) == 1 and {*pairs[0], unpaired} == {10, 20, 30}
    with pytest.raises(ValueError, match="distinct"):
        pair_matching(0, [1, 1], seed=0)
