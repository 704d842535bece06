"""The embedded hook: join a swarm from an ordinary PyTorch training loop.

    import murmur
    with murmur.join(bootstrap=["10.0.0.5:7447"], listen=["0.0.0.0:7447"]) as swarm:
        opt = swarm.wrap(model, torch.optim.AdamW(model.parameters()), algorithm="noloco", sync_every=50)
        for x, y in data:                      # the loop is unchanged
            loss = loss_fn(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
    # leaving the block announces our leave and stops the node's thread

`murmur.join` runs the node's trio loop (transport, membership, collectives) in a background
thread and returns a `Swarm`; `wrap` attaches an outer algorithm to the inner optimizer's
`step()` and returns a `SwarmOptimizer` that behaves like the inner one. The outer algorithm
hands its collectives to the loop thread through `trio.from_thread` (optimizers.comm.TrioComm),
so the training thread only ever waits on a `concurrent.futures.Future` with a deadline.

For trio programs: `async with murmur.open_swarm(...) as swarm:` runs in the caller's loop;
call the training step in a worker thread (`await trio.to_thread.run_sync(step)`), since a sync
waits on the loop.
"""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

import torch
import trio

from gossip.identity import Identity, format_peer_id
from gossip.membership import MembershipConfig
from node.config import ALGORITHMS, check_address
from node.services import Services, collapse, open_services, swarm_key_from, wait_for_peers
from optimizers.comm import TrioComm
from optimizers.factory import make_outer

log = logging.getLogger("murmur.hook")

JOIN_TIMEOUT = 20.0  # seconds to find a first peer through the bootstrap addresses


class SwarmOptimizer:
    """The user's inner optimizer with an outer algorithm riding on its `step()`.

    `step`, `zero_grad`, `param_groups` and `state` are the inner optimizer's; `outer` is the
    algorithm (its `stats` count syncs and bytes); `state_dict()` holds both, as plain tensors.
    """

    def __init__(self, inner: torch.optim.Optimizer, outer: Any) -> None:
        self.inner = inner
        self.outer = outer

    def step(self, closure: Any = None) -> Any:
        return self.inner.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @property
    def state(self) -> Any:
        return self.inner.state

    @property
    def stats(self) -> Any:
        return self.outer.stats

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "outer": self.outer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.outer.load_state_dict(state["outer"])

    def detach(self, finish: bool = True) -> None:
        """Stop syncing (the inner optimizer keeps working on its own)."""
        if self.outer.attached:
            self.outer.detach(finish=finish)


class AsyncSwarm:
    """A joined swarm inside a trio loop: `wrap()` models, `peers()`, `leave()` on exit."""

    def __init__(self, services: Services, nursery: trio.Nursery, identity: Identity) -> None:
        self.services = services
        self.identity = identity
        self._nursery = nursery
        self._token = trio.lowlevel.current_trio_token()
        self._wrapped: list[SwarmOptimizer] = []
        self._lock = threading.Lock()

    @property
    def peer_id(self) -> str:
        return format_peer_id(self.identity.peer_id)

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(self.services.transport.addresses)

    def peers(self) -> int:
        """Live peers in our membership view."""
        return len(self.services.membership.live_peers())

    @property
    def traffic(self) -> Any:
        """Bytes and messages on the wire (gossip.transport.TrafficStats)."""
        return self.services.transport.stats

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, algorithm: str = "noloco", **options: Any) -> SwarmOptimizer:
        """Attach `algorithm` ("noloco", "diloco", "streaming-diloco") to `optimizer.step()`.

        `options` are the algorithm's config fields (e.g. sync_every=50, outer_lr=0.7,
        codec="bf16", timeout=30). Every member must wrap a model of the same shape, starting
        from the same weights (e.g. the same seed). Safe to call from any thread.
        """
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}; got {algorithm!r}")
        comm = TrioComm(self.services.collectives, self._token, self._nursery)
        outer = make_outer(algorithm, model, optimizer, comm, **options)
        outer.attach()
        wrapped = SwarmOptimizer(optimizer, outer)
        with self._lock:
            self._wrapped.append(wrapped)
        return wrapped

    def _detach_all(self) -> None:
        with self._lock:
            wrapped, self._wrapped = self._wrapped, []
        for w in wrapped:
            w.detach(finish=False)  # leaving: no more waiting on peers


def _identity(identity: Identity | str | Path | None) -> Identity:
    if identity is None:
        return Identity.generate()
    if isinstance(identity, Identity):
        return identity
    return Identity.load(identity)


@asynccontextmanager
async def open_swarm(
    bootstrap: Sequence[str] = (),
    listen: Sequence[str] = ("127.0.0.1:0",),
    *,
    swarm: str = "murmur",
    swarm_key: str | Path | None = None,
    identity: Identity | str | Path | None = None,
    announce: Sequence[str] = (),
    join_timeout: float = JOIN_TIMEOUT,
    membership_config: MembershipConfig | None = None,
) -> AsyncIterator[AsyncSwarm]:
    """Join a swarm from a trio program; leaving the block announces our leave.

    `announce`: addresses peers should dial when they differ from `listen` (e.g. a public IP).
    """
    if isinstance(bootstrap, str) or isinstance(listen, str) or isinstance(announce, str):
        raise ValueError("bootstrap, listen and announce are lists of 'host:port' strings, e.g. ['127.0.0.1:7447']")
    for addr in (*listen, *announce, *bootstrap):
        check_address(addr)
    ident = _identity(identity)
    key = swarm_key_from(swarm, None if swarm_key is None else str(swarm_key))
    async with open_services(ident, key, listen, bootstrap, membership_config=membership_config, announce=announce) as services:
        if bootstrap:
            await wait_for_peers(services, bootstrap, join_timeout)
        async with trio.open_nursery() as nursery:
            member = AsyncSwarm(services, nursery, ident)
            try:
                yield member
            finally:
                member._detach_all()
                nursery.cancel_scope.cancel()


class Swarm:
    """A joined swarm whose trio loop runs in a background thread. Use as a context manager,
    or call `leave()` when done. Created by `murmur.join(...)`."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._ready = threading.Event()
        self._member: AsyncSwarm | None = None
        self._error: BaseException | None = None
        self._closing: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread = threading.Thread(target=self._thread_main, name="murmur-swarm", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # to the constructor's caller, or logged if it comes later
            exc = collapse(exc)
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()
            else:
                log.error("murmur swarm loop stopped: %s", exc)
                self._member = None

    async def _main(self) -> None:
        self._closing = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        async with open_swarm(**self._kwargs) as member:
            self._member = member
            self._ready.set()
            await self._closing.wait()

    @property
    def member(self) -> AsyncSwarm:
        if self._member is None:
            raise RuntimeError("this swarm has been left")
        return self._member

    @property
    def peer_id(self) -> str:
        return self.member.peer_id

    @property
    def addresses(self) -> tuple[str, ...]:
        return self.member.addresses

    def peers(self) -> int:
        return self.member.peers()

    @property
    def traffic(self) -> Any:
        return self.member.traffic

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, algorithm: str = "noloco", **options: Any) -> SwarmOptimizer:
        return self.member.wrap(model, optimizer, algorithm, **options)

    def leave(self, timeout: float = 30.0) -> None:
        """Stop syncing, announce our leave, stop the background loop. Idempotent."""
        member, self._member = self._member, None
        if member is None:
            return
        member._detach_all()
        try:
            trio.from_thread.run_sync(self._closing.set, trio_token=self._token)
        except trio.RunFinishedError:
            pass  # the loop already ended
        self._thread.join(timeout)

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.leave()


def join(
    bootstrap: Sequence[str] = (),
    listen: Sequence[str] = ("127.0.0.1:0",),
    *,
    swarm: str = "murmur",
    swarm_key: str | Path | None = None,
    identity: Identity | str | Path | None = None,
    announce: Sequence[str] = (),
    join_timeout: float = JOIN_TIMEOUT,
    membership_config: MembershipConfig | None = None,
) -> Swarm:
    """Join a swarm: returns once the node listens (and, with bootstrap addresses, knows a peer).

    A bad address, a missing key file, a port in use or an unreachable bootstrap raise here.
    """
    return Swarm(
        bootstrap=bootstrap, listen=listen, swarm=swarm, swarm_key=swarm_key, identity=identity,
        announce=announce, join_timeout=join_timeout, membership_config=membership_config,
    )
