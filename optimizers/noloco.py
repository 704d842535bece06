"""NoLoCo as a hook on the user's inner optimizer: gossip with one random partner, no all-reduce.

Kolehmainen et al., "NoLoCo: No-all-reduce Low Communication Training Method for Large Models"
(arXiv 2506.10911); equations read from the authors' code, `jkolehm/noloco`
`src/noloco/sparse_optimizer_c.py` (ALGORITHMS.md §1).

Every H inner steps node i, with slow weights φ_i and fast weights θ_i:
1. Δ_i = θ_i − φ_i (its progress since the last outer step);
2. `pair_exchange` of (φ_i, Δ_i), compressed by `codec`, with a partner j for this round;
3. m_i ← β·m_i + α·Δ̄ + γ·(φ̄ − φ_i), φ_i ← φ_i + m_i, θ_i ← φ_i (`outer_math.noloco_outer_step`),
   with Δ̄, φ̄ the pair means. The inner optimizer state is kept, as in the reference code.

No partner (timeout, odd one out, error) -> solo update φ̄ = φ_i, Δ̄ = Δ_i (syncs_missed).
A partner payload that is malformed or fails `check_peer_tensors` -> the same solo update
(rejected). Our own Δ not finite (local divergence) -> θ ← φ and we send Δ = 0 (rejected). Each side uses only its own state plus what it received, so one side succeeding and
the other not breaks no invariant.

Wire body (msgpack), buffers per `optimizers.payload`:
    {"alg": "noloco", "v": 1, "round": <int>, "codec": <name>,
     "phi": <meta>, "delta": <meta>}          buffers = φ's buffers then Δ's buffers
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
import torch

from gossip.errors import RemoteProtocolError
from optimizers.base import OuterOptimizer, check_common_config, resolve_codec
from optimizers.checks import check_peer_tensors
from optimizers.outer_math import noloco_outer_step
from optimizers.payload import decode_tensors, encode_tensors

if TYPE_CHECKING:
    from optimizers.comm import Comm

WIRE_VERSION = 1


@dataclass(frozen=True)
class NoLoCoConfig:
    """NoLoCo hyper-parameters; defaults from the authors' `noloco_mean` configs (ALGORITHMS.md §1)."""

    sync_every: int = 50  # H: inner steps between outer steps
    outer_lr: float = 0.7  # α: weight of the pair-mean progress Δ̄
    outer_momentum: float = 0.5  # β: heavy-ball momentum of the outer update
    gamma: float | None = None  # γ: weight of the pull towards the pair mean φ̄; None = α (as the code)
    codec: str = "bf16"  # payload codec for φ and Δ (PROPOSED bf16: 4P bytes each way instead of 8P)
    timeout: float = 120.0  # seconds to find a partner and swap before updating alone
    max_norm_ratio: float = 10.0  # reject a partner φ_j (Δ_j) with norm > this × our φ (Δ) ...
    norm_eps: float = 1e-6  # ... plus this

    def __post_init__(self) -> None:
        check_common_config(self)
        if self.gamma is not None and not (
            isinstance(self.gamma, (int, float)) and math.isfinite(self.gamma) and self.gamma >= 0
        ):
            raise ValueError(f"gamma must be None (use outer_lr) or a finite number >= 0, got {self.gamma!r}")

    @property
    def gamma_value(self) -> float:
        return self.outer_lr if self.gamma is None else self.gamma


class NoLoCo(OuterOptimizer):
    """`outer = NoLoCo(model, opt, comm, NoLoCoConfig(...)); outer.attach(); ...; outer.detach()`.

    φ (slow weights) starts as a copy of the model's parameters at construction; m at zero.
    The exchange after step t uses round `t // H`.
    """

    algorithm = "noloco"

    def __init__(
        self,
        model: torch.nn.Module,
        inner_opt: torch.optim.Optimizer,
        comm: "Comm",
        config: NoLoCoConfig | None = None,
    ):
        config = NoLoCoConfig() if config is None else config
        if not isinstance(config, NoLoCoConfig):
            raise ValueError(f"config must be a NoLoCoConfig, got {type(config).__name__}")
        super().__init__(model, inner_opt, comm, config.timeout)
        self.config = config
        self.codec = resolve_codec(config.codec)
        self._phi = [self._local(i) for i in range(len(self._named))]  # φ, param shapes
        self._m = [torch.zeros_like(t) for t in self._phi]  # outer momentum

    def _state_tensors(self) -> dict[str, list[torch.Tensor]]:
        return {"slow_params": self._phi, "outer_momentum": self._m}

    def _on_step(self, step: int) -> None:
        if step % self.config.sync_every != 0:
            return
        rnd = step // self.config.sync_every
        deltas = [self._local(i) - self._phi[i] for i in range(len(self._named))]
        if not all(torch.isfinite(d).all() for d in deltas):
            # Our own training diverged: drop its progress (θ ← φ) and send Δ = 0, so we stay
            # in the protocol (the partner is not left waiting) without poisoning anyone.
            self.stats.rejected += 1
            for i in range(len(self._named)):
                self._write_param(i, self._phi[i])
            self._log_outcome(f"exchange of round {rnd}", "own update not finite, restored φ and sent Δ = 0", "local divergence")
            deltas = [torch.zeros_like(d) for d in deltas]
        meta_phi, bufs_phi = encode_tensors(self.codec, [self._flat(t) for t in self._phi])
        meta_delta, bufs_delta = encode_tensors(self.codec, [self._flat(d) for d in deltas])
        body = {"alg": "noloco", "v": WIRE_VERSION, "round": rnd, "codec": self.codec.name,
                "phi": meta_phi, "delta": meta_delta}
        buffers = bufs_phi + bufs_delta
        sent = len(msgpack.packb(body, use_bin_type=True)) + sum(memoryview(b).nbytes for b in buffers)
        cfg = self.config
        self._launch(
            lambda: self.comm.pair_exchange(rnd, body, buffers, timeout=cfg.timeout),
            None,
            lambda result, err: self._apply(step, rnd, deltas, sent, result, err),
        )

    def _apply(self, step: int, rnd: int, deltas: list[torch.Tensor], sent: int, result: Any,
               err: BaseException | None) -> None:
        what = f"exchange of round {rnd} (step {step})"
        phi_mean, delta_mean = self._phi, deltas  # solo unless a partner checks out
        if err is not None or result is None:
            self.stats.syncs_missed += 1
            if err is not None:
                self._log_outcome(what, "solo update", f"{type(err).__name__}: {err}")
            else:
                self._log_outcome(what, "solo update", "no partner", logging.INFO)
        else:
            try:
                phi_j, delta_j = self._read_partner(rnd, result)
                reason = check_peer_tensors(phi_j, [self._flat(t) for t in self._phi],
                                            self.config.max_norm_ratio, self.config.norm_eps)
                reason = reason or check_peer_tensors(delta_j, [self._flat(d) for d in deltas],
                                                      self.config.max_norm_ratio, self.config.norm_eps)
                if reason is not None:
                    raise RemoteProtocolError(reason)
            except RemoteProtocolError as e:
                self.stats.rejected += 1
                self._log_outcome(what, f"partner {bytes(result.peer_id).hex()[:16]} rejected, solo update", str(e))
            else:
                self.stats.syncs_done += 1
                self.stats.bytes_sent += sent
                self.stats.bytes_received += self._received_bytes(result)
                self.stats.last_sync_step = step
                phi_mean = [(p + torch.from_numpy(q).view_as(p)) / 2 for p, q in zip(self._phi, phi_j)]
                delta_mean = [(d + torch.from_numpy(q).view_as(d)) / 2 for d, q in zip(deltas, delta_j)]
        cfg = self.config
        for i in range(len(self._named)):
            self._phi[i], self._m[i] = noloco_outer_step(
                self._phi[i], self._m[i], delta_mean[i], phi_mean[i], cfg.outer_lr, cfg.outer_momentum, cfg.gamma_value
            )
            self._write_param(i, self._phi[i])

    def _read_partner(self, rnd: int, result: Any) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The partner's (φ_j, Δ_j) as flat float32 arrays; RemoteProtocolError if malformed."""
        body = result.body
        if not isinstance(body, dict):
            raise RemoteProtocolError(f"body must be a map, got {type(body).__name__}")
        if body.get("alg") != "noloco" or body.get("v") != WIRE_VERSION:
            raise RemoteProtocolError(f"not a NoLoCo v{WIRE_VERSION} payload: alg={body.get('alg')!r} v={body.get('v')!r}")
        if body.get("round") != rnd:
            raise RemoteProtocolError(f"partner is at round {body.get('round')!r}, we are at {rnd}")
        if body.get("codec") != self.codec.name:
            raise RemoteProtocolError(f"partner used codec {body.get('codec')!r}, we use {self.codec.name!r}")
        meta_phi, meta_delta = body.get("phi"), body.get("delta")
        if not isinstance(meta_phi, list) or not isinstance(meta_delta, list):
            raise RemoteProtocolError("'phi' and 'delta' must be lists of tensor metadata")
        shapes = [(p.numel(),) for _, p in self._named]
        if len(meta_phi) != len(shapes) or len(meta_delta) != len(shapes):
            raise RemoteProtocolError(f"expected metadata for {len(shapes)} tensors, got {len(meta_phi)} and {len(meta_delta)}")
        n_phi = sum(m.get("n", 0) if isinstance(m, dict) and isinstance(m.get("n", 0), int) else 0 for m in meta_phi)
        buffers = list(result.buffers)
        phi_j = decode_tensors(self.codec, meta_phi, buffers[:n_phi], shapes)
        delta_j = decode_tensors(self.codec, meta_delta, buffers[n_phi:], shapes)
        return phi_j, delta_j

    @staticmethod
    def _received_bytes(result: Any) -> int:
        return len(msgpack.packb(result.body, use_bin_type=True)) + sum(memoryview(b).nbytes for b in result.buffers)
