"""The training side of a node: model, inner optimizer, outer algorithm and data for the LM task.

Everything here is synchronous torch code. The runtime calls it from worker threads
(`trio.to_thread.run_sync`), one call at a time, so the node's trio loop keeps gossiping while a
step computes; the outer algorithm reaches the network only through its `Comm`.

The state a checkpoint or a late joiner needs is `snapshot()`: the model, the inner AdamW state,
the outer algorithm's state and the counters, as a `node.checkpoint.Snapshot`.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from node.checkpoint import CheckpointError, Snapshot, model_hash
from node.config import NodeConfig
from node.lm_task import Batcher, LMConfig, build_model, evaluate_bpb, load_corpus, train_step, warmup_cosine
from optimizers.factory import make_outer

LN2 = math.log(2.0)


def check_algorithm(cfg: NodeConfig) -> None:
    """Build the model and the outer algorithm once, offline, so a setting they refuse (e.g. more
    fragments than the model has blocks) is a ValueError before any socket opens."""
    from optimizers.comm import LocalGroup

    lm = LMConfig(context=cfg.context, d_model=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head)
    model = build_model(lm, cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    make_outer(cfg.algorithm, model, opt, LocalGroup(1).comm(0), **cfg.algorithm_options())


def data_rank(peer_id: bytes) -> int:
    """Which data stream a node reads: a pure function of its peer id, so a restart continues it."""
    return int.from_bytes(hashlib.sha256(b"murmur/v1 data rank\x00" + peer_id).digest()[:4], "big")


@dataclass
class Counters:
    step: int = 0  # inner steps taken (over every run of this node)
    tokens: int = 0  # tokens trained on (over every run)


class LMTrainer:
    """One node's LM task: `train_one()` takes an inner step (and the outer algorithm rides on it)."""

    def __init__(self, cfg: NodeConfig, comm: Any, peer_id: bytes) -> None:
        torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.peer_id = peer_id
        self.lm = LMConfig(context=cfg.context, d_model=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head)
        self.corpus = load_corpus(cfg.data)
        self.model = build_model(self.lm, cfg.seed)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
        self.outer = make_outer(cfg.algorithm, self.model, self.opt, comm, **cfg.algorithm_options())
        self.counters = Counters()
        self.rank = data_rank(peer_id)
        self.batcher = Batcher(self.corpus, cfg.batch_size, cfg.context, self.rank, cfg.seed)
        self.last_loss_bpb: float | None = None

    # -- training -------------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        """Warm-up then cosine to 10% over the step budget; warm-up then flat without a budget."""
        cfg = self.cfg
        if cfg.steps is not None:
            return cfg.lr * warmup_cosine(step, cfg.warmup, cfg.steps)
        return cfg.lr * ((step + 1) / cfg.warmup if step < cfg.warmup else 1.0)

    def train_one(self) -> float:
        """One inner step; returns its loss in bits per byte."""
        lr = self.lr_at(self.counters.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.batcher.position = self.counters.step  # batch k of this node is fixed by (seed, rank, k)
        x, y = self.batcher.next()
        loss = train_step(self.model, self.opt, x, y) / LN2
        self.counters.step += 1
        self.counters.tokens += x.numel()
        self.last_loss_bpb = loss
        return loss

    def evaluate(self) -> float:
        return evaluate_bpb(self.model, self.corpus, self.lm, n_seqs=self.cfg.eval_seqs)

    def attach(self) -> None:
        self.outer.attach()

    def detach(self, finish: bool = True) -> None:
        if self.outer.attached:
            self.outer.detach(finish=finish)

    # -- state ----------------------------------------------------------------------------------

    def snapshot(self, **meta: Any) -> Snapshot:
        """Everything needed to resume (finishes syncs in flight first, within their deadline)."""
        state = {
            "model": self.model.state_dict(),
            "inner": self.opt.state_dict(),
            "outer": self.outer.state_dict(),
            "counters": {"step": self.counters.step, "tokens": self.counters.tokens},
        }
        info = {
            "step": self.counters.step,
            "algorithm": self.cfg.algorithm,
            "model_shape": [self.lm.d_model, self.lm.n_layer, self.lm.n_head, self.lm.context],
            "seed": self.cfg.seed,
            "time": time.time(),
            **meta,
        }
        return Snapshot(state, info)

    def restore(self, snap: Snapshot, *, from_peer: bool) -> None:
        """Load a snapshot (ours, or a donor's); a snapshot that does not fit raises CheckpointError.

        From a peer we keep our own outer counters (syncs, bytes) at zero: they describe this node.
        """
        meta, state = snap.meta, snap.state
        if meta.get("algorithm") != self.cfg.algorithm:
            raise CheckpointError(f"state was trained with {meta.get('algorithm')!r}, this node runs {self.cfg.algorithm!r}")
        shape = [self.lm.d_model, self.lm.n_layer, self.lm.n_head, self.lm.context]
        if meta.get("model_shape") != shape:
            raise CheckpointError(f"state holds a model of shape {meta.get('model_shape')} (d_model, n_layer, n_head, context), this node builds {shape}")
        if not all(k in state for k in ("model", "inner", "outer", "counters")):
            raise CheckpointError("state lacks one of model, inner, outer, counters")
        outer_state = dict(state["outer"])
        if from_peer:
            for key in list(outer_state):
                if key.startswith("stats."):
                    outer_state[key] = -1 if key == "stats.last_sync_step" else 0
        try:
            for name, t in state["model"].items():
                if not torch.isfinite(t).all():
                    raise CheckpointError(f"state's model tensor {name!r} is not finite")
            was = self.outer.attached
            if was:
                self.outer.detach(finish=False)
            self.model.load_state_dict(state["model"], strict=True)
            self.opt.load_state_dict(state["inner"])
            self.outer.load_state_dict(outer_state)
            if was:
                self.outer.attach()
        except (ValueError, KeyError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"state does not fit this node: {' '.join(str(exc).split())[:300]}") from None
        c = state["counters"]
        self.counters = Counters(step=int(c["step"]), tokens=int(c["tokens"]))

    def model_hash(self) -> str:
        return model_hash(self.model)
