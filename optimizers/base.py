"""What DiLoCo, Streaming DiLoCo and NoLoCo share: hooks, pending syncs, stats, checkpoints.

An outer optimizer wraps the user's model and inner `torch.optim.Optimizer` and rides on its
`step()` (torchft's pattern): a step post-hook counts inner steps and launches a sync on the
algorithm's schedule. A sync is a `concurrent.futures.Future` from the `Comm`, so communication
overlaps computation; it is *finished* (its result applied to the weights) either

- at a fixed later step (`due_step`, Streaming DiLoCo's τ-overlap), in that step's post-hook; or
- lazily, for syncs that must land before the next inner step (DiLoCo, NoLoCo, streaming with
  τ=0): just before the model's next forward pass (a forward pre-hook), or failing that before the
  next `opt.step()`, or in `finish_pending()`, `state_dict()` and `detach()`.

The lazy form gives exactly the blocking algorithm's trajectory (the next gradient is computed at
the synced weights) while letting W workers stepped round-robin by one thread make progress: each
worker's sync resolves once all of them have taken the step that launched it.

An outer optimizer belongs to the training thread: call its methods (and `opt.step()`) from that
thread only. Waiting is bounded: `future.result(timeout + _WAIT_GRACE)`. A failed, empty or rejected sync is
logged and counted in `stats`, the algorithm's fallback runs, and training continues.
"""

from __future__ import annotations

import concurrent.futures
from abc import ABC, abstractmethod
import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from optimizers.payload import payload_nbytes

if TYPE_CHECKING:
    from compression.base import Codec
    from optimizers.comm import Comm

log = logging.getLogger("murmur.optimizers")

# The collective enforces `timeout` itself; this extra wait only covers the hand-off between
# threads, so a result that arrives exactly at the deadline is not thrown away.
_WAIT_GRACE = 5.0


@dataclass
class OuterStats:
    """Counters an outer optimizer keeps; plain numbers, saved in `state_dict()`."""

    syncs_done: int = 0  # syncs applied with data from at least one peer (complete or partial)
    syncs_partial: int = 0  # of syncs_done: some group member or some elements were missing
    syncs_missed: int = 0  # syncs that found nobody, timed out or failed: solo update instead
    rejected: int = 0  # syncs whose received data failed the peer check (or, alone, our own
    #                    update was not finite): their data dropped, fallback taken
    bytes_sent: int = 0  # payload bytes this node sent for syncs (codec buffers; headers not counted)
    bytes_received: int = 0  # payload bytes this node received for syncs
    last_sync_step: int = -1  # inner step whose sync last applied peer data (-1: none yet)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def check_common_config(cfg: Any) -> None:
    """ValueErrors for the fields every outer config has; each message says how to fix it."""
    if not isinstance(cfg.sync_every, int) or isinstance(cfg.sync_every, bool) or cfg.sync_every < 1:
        raise ValueError(f"sync_every must be an int >= 1 (inner steps per outer step), got {cfg.sync_every!r}")
    if not (_num(cfg.outer_lr) and math.isfinite(cfg.outer_lr) and cfg.outer_lr > 0):
        raise ValueError(f"outer_lr must be a finite number > 0 (e.g. 0.7), got {cfg.outer_lr!r}")
    if not (_num(cfg.outer_momentum) and 0 <= cfg.outer_momentum < 1):
        raise ValueError(f"outer_momentum must be in [0, 1) (e.g. 0.9), got {cfg.outer_momentum!r}")
    if not (_num(cfg.timeout) and math.isfinite(cfg.timeout) and cfg.timeout > 0):
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {cfg.timeout!r}")
    if not (_num(cfg.max_norm_ratio) and cfg.max_norm_ratio >= 1):
        raise ValueError(f"max_norm_ratio must be >= 1 (e.g. 10; math.inf turns the norm check off), got {cfg.max_norm_ratio!r}")
    if not (_num(cfg.norm_eps) and math.isfinite(cfg.norm_eps) and cfg.norm_eps >= 0):
        raise ValueError(f"norm_eps must be finite and >= 0, got {cfg.norm_eps!r}")
    if not isinstance(cfg.codec, str) or not cfg.codec:
        raise ValueError(f"codec must be a codec name such as 'fp32', 'bf16' or 'e3m0', got {cfg.codec!r}")
    weight = getattr(cfg, "weight", 1.0)
    if not (_num(weight) and math.isfinite(weight) and weight > 0):
        raise ValueError(f"weight must be a finite number > 0, got {weight!r}")


def resolve_codec(name: str) -> "Codec":
    """Look a codec up by name; a bad name is a ValueError listing the valid ones."""
    from compression.base import get_codec

    return get_codec(name)


@dataclass
class _Pending:
    future: concurrent.futures.Future
    launch_step: int
    due_step: int | None  # None: finish lazily, before the next forward / inner step
    finish: Callable[[Any, BaseException | None], None]


class OuterOptimizer(ABC):
    """Base class: parameter bookkeeping, hooks, pending syncs. Subclasses implement
    `_on_step(step)` (launch syncs on their schedule) and their state tensors."""

    algorithm = "outer"

    def __init__(self, model: torch.nn.Module, inner_opt: torch.optim.Optimizer, comm: "Comm", timeout: float):
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(inner_opt, torch.optim.Optimizer):
            raise ValueError(f"inner_opt must be a torch.optim.Optimizer, got {type(inner_opt).__name__}")
        for meth in ("group_average", "pair_exchange"):
            if not callable(getattr(comm, meth, None)):
                raise ValueError(
                    f"comm must implement the Comm interface (optimizers.comm): missing {meth}(); "
                    "use LocalGroup(n).comm(rank) in one process or TrioComm(collectives, token) on a node"
                )
        opt_params = {id(p) for g in inner_opt.param_groups for p in g["params"]}
        named = [(n, p) for n, p in model.named_parameters() if id(p) in opt_params]
        if not named:
            raise ValueError("inner_opt updates none of the model's parameters: build it from model.parameters()")
        if len(named) != len(opt_params):
            raise ValueError(
                f"inner_opt updates {len(opt_params) - len(named)} parameter(s) that are not in the model: "
                "pass the model that owns every parameter the optimizer steps"
            )
        self.model = model
        self.inner_opt = inner_opt
        self.comm = comm
        self.stats = OuterStats()
        self._named = named
        self._timeout = timeout
        self._step = 0
        self._pending: list[_Pending] = []
        self._handles: list[Any] = []
        self._nbytes_cache: dict[int, int] = {}

    # ---- public API --------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """Inner steps taken since construction (or since the loaded checkpoint)."""
        return self._step

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> "OuterOptimizer":
        """Start following `inner_opt.step()`. Raises RuntimeError if already attached."""
        if self._handles:
            raise RuntimeError(f"{type(self).__name__} is already attached; call detach() first")
        self._handles = [
            self.inner_opt.register_step_post_hook(self._post_hook),
            self.inner_opt.register_step_pre_hook(self._pre_step_hook),
            self.model.register_forward_pre_hook(self._pre_forward_hook),
        ]
        return self

    def detach(self, finish: bool = True) -> None:
        """Stop following the optimizer; with `finish`, apply syncs still in flight first
        (bounded by the timeout), else drop them. Detaching twice is harmless."""
        try:
            if finish:
                self.finish_pending()
            elif self._pending:
                self.stats.syncs_missed += len(self._pending)
                log.warning("%s detached with %d sync(s) in flight: dropped", self.algorithm, len(self._pending))
                self._pending.clear()
        finally:
            for h in self._handles:
                h.remove()
            self._handles = []

    def __enter__(self) -> "OuterOptimizer":
        return self.attach()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # On an exception (Ctrl-C, a crash in the loop) do not wait on peers: drop what is in flight.
        self.detach(finish=exc_type is None)

    def finish_pending(self) -> None:
        """Apply every sync in flight now, in launch order (waits up to the timeout for each)."""
        while self._pending:
            self._finish(self._pending.pop(0))

    # ---- hooks -------------------------------------------------------------------------------

    def _post_hook(self, opt: Any, args: Any, kwargs: Any) -> None:
        self._step += 1
        due = [p for p in self._pending if p.due_step is not None and p.due_step <= self._step]
        for p in due:
            self._pending.remove(p)
            self._finish(p)
        self._on_step(self._step)

    def _pre_step_hook(self, opt: Any, args: Any, kwargs: Any) -> None:
        self._finish_lazy()

    def _pre_forward_hook(self, module: Any, args: Any) -> None:
        self._finish_lazy()

    def _finish_lazy(self) -> None:
        if not self._pending:
            return
        lazy = [p for p in self._pending if p.due_step is None]
        for p in lazy:
            self._pending.remove(p)
            self._finish(p)

    # ---- for subclasses ----------------------------------------------------------------------

    @abstractmethod
    def _on_step(self, step: int) -> None:
        """Called after inner step `step` (1-based): launch the syncs the schedule wants."""

    def _launch(
        self,
        start: Callable[[], concurrent.futures.Future],
        due_step: int | None,
        finish: Callable[[Any, BaseException | None], None],
    ) -> None:
        """Start a collective; a synchronous failure becomes an already-failed future."""
        try:
            fut = start()
        except Exception as e:  # the comm could not even start (loop gone, bad state)
            fut = concurrent.futures.Future()
            fut.set_exception(e)
        self._pending.append(_Pending(fut, self._step, due_step, finish))

    def _finish(self, p: _Pending) -> None:
        wait = self._timeout + _WAIT_GRACE
        try:
            result, err = p.future.result(timeout=wait), None
        except Exception as e:  # PeerTimeout, PeerUnreachable, RemoteError, ...: a failed sync
            result, err = None, e
            if not p.future.done():  # our own wait ran out, not the collective
                p.future.cancel()
                err = TimeoutError(f"no result within {wait:.0f} s")
        p.finish(result, err)

    def _flat(self, t: torch.Tensor) -> np.ndarray:
        """A float32 numpy view of a CPU float32 state tensor, flattened."""
        return t.reshape(-1).numpy()

    def _local(self, i: int) -> torch.Tensor:
        """Parameter i as a fresh float32 CPU tensor (the parameter may live on CUDA, in bf16)."""
        return self._named[i][1].detach().to("cpu", torch.float32, copy=True)

    def _write_param(self, i: int, value: torch.Tensor) -> None:
        p = self._named[i][1]
        with torch.no_grad():
            p.copy_(value.view_as(p).to(p.device, p.dtype))

    def _group_bytes(self, codec: "Codec", idxs: list[int], members: int) -> int:
        from optimizers.payload import ring_allreduce_bytes

        total = 0
        for i in idxs:
            n = self._named[i][1].numel()
            if n not in self._nbytes_cache:
                self._nbytes_cache[n] = payload_nbytes(codec, n)
            total += ring_allreduce_bytes(self._nbytes_cache[n], members)
        return total

    def _log_outcome(self, what: str, outcome: str, detail: str, level: int = logging.WARNING) -> None:
        # Failures and rejections are warnings; being alone or partial is routine in a swarm (info).
        log.log(level, "%s %s: %s (%s)", self.algorithm, what, outcome, detail)

    # ---- checkpoints ---------------------------------------------------------------------------

    @abstractmethod
    def _state_tensors(self) -> dict[str, list[torch.Tensor]]:
        """The algorithm's state buffers by name, each the live list of per-parameter tensors
        (so `load_state_dict` can replace their contents in place)."""

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        """Plain tensors and ints, safetensors-friendly: `step`, `stats.<field>`, and for each state
        buffer `<buffer>.<param name>` (float32, the parameter's shape). Finishes syncs in flight first."""
        self.finish_pending()
        out: dict[str, torch.Tensor | int] = {"step": self._step}
        for k, v in self.stats.as_dict().items():
            out[f"stats.{k}"] = v
        for buf, tensors in self._state_tensors().items():
            for (name, _), t in zip(self._named, tensors):
                out[f"{buf}.{name}"] = t.clone()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()` output; every key, shape and value is checked first and a
        bad checkpoint raises ValueError without changing anything."""
        self.finish_pending()
        bufs = self._state_tensors()
        expected = {"step"} | {f"stats.{f.name}" for f in fields(OuterStats)}
        expected |= {f"{b}.{n}" for b in bufs for n, _ in self._named}
        got = set(state)
        if got != expected:
            missing, extra = sorted(expected - got), sorted(got - expected)
            raise ValueError(f"state does not match this {type(self).__name__}: missing {missing[:5]}, unexpected {extra[:5]}")

        def as_int(key: str, lo: int) -> int:
            v = state[key]
            v = v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"state[{key!r}] must be an int >= {lo}, got {v!r}")
            return int(v)

        step = as_int("step", 0)
        stats = {f.name: as_int(f"stats.{f.name}", -1 if f.name == "last_sync_step" else 0) for f in fields(OuterStats)}
        new: dict[str, list[torch.Tensor]] = {}
        for b in bufs:
            new[b] = []
            for name, p in self._named:
                t = state[f"{b}.{name}"]
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(p.shape):
                    shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"state[{b}.{name!r}] must be a tensor of shape {tuple(p.shape)}, got {shape}")
                t = t.detach().to("cpu", torch.float32, copy=True)
                if not torch.isfinite(t).all():
                    raise ValueError(f"state[{b}.{name!r}] contains NaN or inf")
                new[b].append(t.contiguous())
        self._step = step
        self.stats = OuterStats(**stats)
        for b, ts in new.items():
            bufs[b][:] = ts
