"""How outer optimizers talk: the `Comm` interface and its two implementations.

`Comm` is synchronous and future-returning, so the training thread starts a collective, keeps
taking inner steps, and picks the result up later (`future.result(timeout)`):

- `TrioComm` forwards to a node's `gossip.collectives` object running in a trio loop in another
  thread (DESIGN.md §6). It never blocks that loop: it only schedules a task there.
- `LocalGroup(n)` serves W workers in one process with the same semantics and result types,
  for unit tests and single-process benchmarks. It works with one thread per worker and with
  one thread stepping the workers round-robin: a collective resolves once every live rank has
  submitted (or its deadline passes), so nobody ever waits on a step not yet taken.

Result types are `gossip.collective_types.AverageResult` and `PairResult`.
"""

from __future__ import annotations

import concurrent.futures
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol, Sequence

import msgpack
import numpy as np

from gossip.collective_types import AverageResult, PairResult
from gossip.errors import LocalProtocolError, PeerTimeout
from optimizers.pairing import pair_matching
from optimizers.payload import ring_allreduce_bytes

if TYPE_CHECKING:
    from compression.base import Codec

DEFAULT_TIMEOUT = 120.0  # seconds; outer configs pass their own


class Comm(Protocol):
    """The two collectives the outer optimizers use (DESIGN.md §4)."""

    def group_average(
        self, key: str, tensors: list[np.ndarray], codec: "Codec", weight: float = 1.0,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> concurrent.futures.Future:
        """Average `tensors` (flat float32) with whoever joins `key`; resolves to AverageResult."""
        ...

    def pair_exchange(
        self, round: int, body: dict, buffers: list, timeout: float = DEFAULT_TIMEOUT
    ) -> concurrent.futures.Future:
        """Swap (body, buffers) with one partner for `round`; resolves to PairResult, or None
        when no partner was found before the deadline."""
        ...


# ============================================================================================
# TrioComm: the bridge into a node's trio loop.
# ============================================================================================


class TrioComm:
    """`Comm` over `gossip.collectives`, called from a thread that is not the trio thread.

    Each call schedules `collectives.<op>(..., timeout=...)` as a task in the node's loop (in
    `nursery` if given, else as a trio system task) through `trio.from_thread.run_sync` with
    `trio_token`, and returns a Future the task resolves. trio's `TooSlowError` becomes
    `PeerTimeout`; a loop that is gone or shutting down fails the future with
    `LocalProtocolError`. The codec object is passed through unchanged.
    """

    def __init__(self, collectives: Any, trio_token: Any, nursery: Any = None):
        import trio

        for meth in ("group_average", "pair_exchange"):
            if not callable(getattr(collectives, meth, None)):
                raise ValueError(f"collectives must have an async {meth}() (gossip.collectives); got {type(collectives).__name__}")
        if not isinstance(trio_token, trio.lowlevel.TrioToken):
            raise ValueError("trio_token must be the node loop's trio.lowlevel.current_trio_token()")
        self._collectives = collectives
        self._token = trio_token
        self._nursery = nursery

    def group_average(self, key, tensors, codec, weight=1.0, timeout=DEFAULT_TIMEOUT):
        return self._submit(self._collectives.group_average, (key, tensors, codec), {"weight": weight, "timeout": timeout})

    def pair_exchange(self, round, body, buffers, timeout=DEFAULT_TIMEOUT):
        return self._submit(self._collectives.pair_exchange, (round, body, buffers), {"timeout": timeout})

    def _submit(self, fn: Callable[..., Awaitable[Any]], args: tuple, kwargs: dict) -> concurrent.futures.Future:
        import trio

        fut: concurrent.futures.Future = concurrent.futures.Future()

        async def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return  # the caller gave up before we started
            try:
                result = await fn(*args, **kwargs)
            except trio.Cancelled:
                fut.set_exception(LocalProtocolError("the node's trio loop cancelled the collective (shutting down)"))
                raise
            except trio.TooSlowError as e:
                fut.set_exception(PeerTimeout(f"collective timed out: {e}"))
            except Exception as e:  # already translated by gossip/ (PeerTimeout, RemoteError, ...)
                fut.set_exception(e)
            except BaseException as e:  # KeyboardInterrupt and friends: report, then let trio see it
                fut.set_exception(LocalProtocolError(f"collective interrupted: {e!r}"))
                raise
            else:
                fut.set_result(result)

        spawn = self._nursery.start_soon if self._nursery is not None else trio.lowlevel.spawn_system_task
        try:
            trio.from_thread.run_sync(spawn, run, trio_token=self._token)
        except (trio.RunFinishedError, RuntimeError) as e:
            # RunFinishedError: the loop is gone; RuntimeError: nursery closed, or called from the
            # trio thread itself (which would deadlock on .result()).
            if fut.set_running_or_notify_cancel():
                fut.set_exception(LocalProtocolError(f"cannot reach the node's trio loop: {e}"))
        return fut


# ============================================================================================
# LocalGroup: W workers in one process.
# ============================================================================================


def _peer_id(rank: int) -> bytes:
    # Big-endian so sorting peer ids sorts ranks, as AverageResult's sorted tuples expect.
    return b"rank" + rank.to_bytes(4, "big")


@dataclass
class _AvgRound:
    shapes: list[tuple[int, ...]]  # from the first submission; later ones must match
    subs: dict[int, tuple[list[np.ndarray], list[np.ndarray], float, list[int]]] = field(default_factory=dict)
    #      rank -> (own inputs, decoded contributions, weight, encoded bytes per tensor)
    futures: dict[int, concurrent.futures.Future] = field(default_factory=dict)
    excluded: set[int] = field(default_factory=set)  # joined but failed (bad shapes, unencodable)
    timer: threading.Timer | None = None


@dataclass
class _PairRound:
    subs: dict[int, tuple[bytes, list[bytes]]] = field(default_factory=dict)  # rank -> (packed body, buffers)
    futures: dict[int, concurrent.futures.Future] = field(default_factory=dict)
    timer: threading.Timer | None = None


class LocalGroup:
    """W in-process workers sharing collectives; `comm(rank)` is worker `rank`'s `Comm`.

    - `group_average(key, ...)`: each contribution goes through the codec (encode, decode), then
      all ranks get the weighted mean, in float32, of every contribution for `key`. It resolves
      when every live rank has submitted; at the deadline, over those who did (a partial result:
      `group` lists the live ranks, `contributors` the submitters). A rank submitting to a key
      already resolved gets an `alone` result (its own input) at once.
    - `pair_exchange(round, ...)`: resolves when every live rank has submitted for `round` (or at
      the deadline, among those who did); ranks are paired by `pair_matching(round, ranks, seed)`,
      each gets its partner's body (through a msgpack round trip) and buffers; an unpaired rank,
      or a late one, gets None.
    - `leave(rank)`: the rank stops counting as live, so nobody waits for it any more.
    - Bytes: `bytes_sent[r]` / `bytes_received[r]` count what rank r would put on the wire:
      for group_average, (n−1)/n of each encoded tensor twice (reduce-scatter + all-gather, n
      contributors); for pair_exchange, the msgpack body plus the buffers, each way.
    """

    _MAX_DONE = 4096  # resolved keys/rounds remembered, to answer late submitters; oldest forgotten

    def __init__(self, n: int, seed: int = 0):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1 (number of workers), got {n!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.n = n
        self.seed = seed
        self.bytes_sent = [0] * n
        self.bytes_received = [0] * n
        self._live = set(range(n))
        self._lock = threading.Lock()
        self._avg: dict[str, _AvgRound] = {}
        self._pairs: dict[int, _PairRound] = {}
        self._done_avg: OrderedDict[str, None] = OrderedDict()
        self._done_pairs: OrderedDict[int, None] = OrderedDict()

    def comm(self, rank: int) -> "LocalComm":
        self._check_rank(rank)
        return LocalComm(self, rank)

    @property
    def live(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._live)

    def leave(self, rank: int) -> None:
        """Rank `rank` leaves: collectives waiting only for it resolve now without it."""
        self._check_rank(rank)
        with self._lock:
            self._live.discard(rank)
            ready = [k for k, r in self._avg.items() if self._live <= set(r.subs) | r.excluded]
            ready_pairs = [k for k, r in self._pairs.items() if self._live <= set(r.subs)]
            actions = [a for k in ready for a in self._resolve_avg(k)]
            actions += [a for k in ready_pairs for a in self._resolve_pairs(k)]
        _run(actions)

    def _check_rank(self, rank: int) -> None:
        if not isinstance(rank, int) or not 0 <= rank < self.n:
            raise ValueError(f"rank must be an int in [0, {self.n}), got {rank!r}")

    # ---- group_average -----------------------------------------------------------------------

    def _group_average(self, rank, key, tensors, codec, weight, timeout) -> concurrent.futures.Future:
        if not isinstance(key, str):
            raise ValueError(f"key must be a str, got {type(key).__name__}")
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be a finite number > 0, got {weight!r}")
        _check_timeout(timeout)
        own = [np.ascontiguousarray(t, dtype=np.float32).copy() for t in tensors]
        decoded, sizes, failure = [], [], None
        try:  # the codec work runs in the caller's thread, outside the lock
            for t in own:
                header, bufs = codec.encode(t)
                sizes.append(sum(memoryview(b).nbytes for b in bufs))
                d = codec.decode(header, bufs, expected_shape=t.shape)
                decoded.append(np.asarray(d.detach().cpu().float().numpy() if hasattr(d, "detach") else d, dtype=np.float32))
        except (ValueError, TypeError) as e:  # e.g. a non-finite input, which codecs refuse to send
            failure = e
        fut: concurrent.futures.Future = concurrent.futures.Future()
        actions: list = []
        with self._lock:
            if rank not in self._live:
                actions.append((fut, None, LocalProtocolError(f"rank {rank} has left the group")))
            elif key in self._done_avg:
                actions.append((fut, self._alone(rank, own) if failure is None else None, failure))
            else:
                r = self._avg.get(key)
                if r is None:
                    r = self._avg[key] = _AvgRound(shapes=[t.shape for t in own])
                    r.timer = _timer(timeout, self._expire_avg, key)
                if rank in r.subs or rank in r.excluded:
                    actions.append((fut, None, LocalProtocolError(f"rank {rank} already joined key {key!r}")))
                else:
                    if failure is None and [t.shape for t in own] != r.shapes:
                        failure = LocalProtocolError(
                            f"rank {rank}: tensor shapes {[t.shape for t in own]} differ from the group's {r.shapes} for key {key!r}")
                    if failure is not None:
                        # It joined but has nothing valid to add: the others stop waiting for it.
                        r.excluded.add(rank)
                        actions.append((fut, None, failure))
                    else:
                        r.subs[rank] = (own, decoded, float(weight), sizes)
                        r.futures[rank] = fut
                    if self._live <= set(r.subs) | r.excluded:
                        actions += self._resolve_avg(key)
        _run(actions)
        return fut

    def _alone(self, rank: int, own: list[np.ndarray]) -> AverageResult:
        me = (_peer_id(rank),)
        return AverageResult(tensors=own, group=me, contributors=me, fractions=tuple(1.0 for _ in own))

    def _expire_avg(self, key: str) -> None:
        with self._lock:
            actions = self._resolve_avg(key) if key in self._avg else []
        _run(actions)

    def _resolve_avg(self, key: str) -> list:
        """Compute the mean for `key` and return the futures to resolve (call with the lock held)."""
        r = self._avg.pop(key)
        if r.timer is not None:
            r.timer.cancel()
        self._remember(self._done_avg, key)
        ranks = sorted(r.subs)
        if not ranks:
            return []
        total_w = sum(r.subs[k][2] for k in ranks)
        means = []
        for i in range(len(r.shapes)):
            acc = np.zeros(r.shapes[i], dtype=np.float32)
            for k in ranks:
                acc += np.float32(r.subs[k][2]) * r.subs[k][1][i]
            means.append(acc / np.float32(total_w))
        group = tuple(_peer_id(k) for k in sorted(self._live | set(ranks) | r.excluded))
        contributors = tuple(_peer_id(k) for k in ranks)
        n = len(ranks)
        actions = []
        for k in ranks:
            for s in r.subs[k][3]:
                b = ring_allreduce_bytes(s, n)
                self.bytes_sent[k] += b
                self.bytes_received[k] += b
            res = AverageResult(
                tensors=[m.copy() for m in means], group=group, contributors=contributors,
                fractions=tuple(1.0 for _ in means),
            )
            actions.append((r.futures[k], res, None))
        return actions

    # ---- pair_exchange -----------------------------------------------------------------------

    def _pair_exchange(self, rank, round, body, buffers, timeout) -> concurrent.futures.Future:
        if not isinstance(round, int) or round < 0:
            raise ValueError(f"round must be an int >= 0, got {round!r}")
        _check_timeout(timeout)
        try:
            packed = msgpack.packb(body, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"body must be msgpack-able: {e}") from e
        bufs = [bytes(memoryview(b)) for b in buffers]  # partners get their own copy, as on a wire
        fut: concurrent.futures.Future = concurrent.futures.Future()
        actions: list = []
        with self._lock:
            if rank not in self._live:
                actions.append((fut, None, LocalProtocolError(f"rank {rank} has left the group")))
            elif round in self._done_pairs:
                actions.append((fut, None, None))
            else:
                r = self._pairs.get(round)
                if r is None:
                    r = self._pairs[round] = _PairRound()
                    r.timer = _timer(timeout, self._expire_pairs, round)
                if rank in r.subs:
                    actions.append((fut, None, LocalProtocolError(f"rank {rank} already joined round {round}")))
                else:
                    r.subs[rank] = (packed, bufs)
                    r.futures[rank] = fut
                    if self._live <= set(r.subs):
                        actions += self._resolve_pairs(round)
        _run(actions)
        return fut

    def _expire_pairs(self, round: int) -> None:
        with self._lock:
            actions = self._resolve_pairs(round) if round in self._pairs else []
        _run(actions)

    def _resolve_pairs(self, round: int) -> list:
        r = self._pairs.pop(round)
        if r.timer is not None:
            r.timer.cancel()
        self._remember(self._done_pairs, round)
        pairs, unpaired = pair_matching(round, sorted(r.subs), self.seed)
        actions = []
        for a, b in pairs:
            for me, other in ((a, b), (b, a)):
                packed, bufs = r.subs[other]
                body = msgpack.unpackb(packed, raw=False, strict_map_key=False)
                actions.append((r.futures[me], PairResult(peer_id=_peer_id(other), body=body, buffers=list(bufs)), None))
                nbytes = len(packed) + sum(len(x) for x in bufs)
                self.bytes_received[me] += nbytes
                self.bytes_sent[other] += nbytes
        if unpaired is not None:
            actions.append((r.futures[unpaired], None, None))
        return actions

    def _remember(self, done: OrderedDict, key: Any) -> None:
        done[key] = None
        while len(done) > self._MAX_DONE:
            done.popitem(last=False)


class LocalComm:
    """Worker `rank`'s view of a LocalGroup; implements `Comm`."""

    def __init__(self, group: LocalGroup, rank: int):
        self.group = group
        self.rank = rank
        self.peer_id = _peer_id(rank)

    def group_average(self, key, tensors, codec, weight=1.0, timeout=DEFAULT_TIMEOUT):
        return self.group._group_average(self.rank, key, tensors, codec, weight, timeout)

    def pair_exchange(self, round, body, buffers, timeout=DEFAULT_TIMEOUT):
        return self.group._pair_exchange(self.rank, round, body, buffers, timeout)

    @property
    def bytes_sent(self) -> int:
        return self.group.bytes_sent[self.rank]

    @property
    def bytes_received(self) -> int:
        return self.group.bytes_received[self.rank]


def _check_timeout(timeout: float) -> None:
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")


def _timer(timeout: float, fn: Callable[[Any], None], arg: Any) -> threading.Timer:
    t = threading.Timer(timeout, fn, args=(arg,))
    t.daemon = True
    t.start()
    return t


def _run(actions: Sequence[tuple[concurrent.futures.Future, Any, BaseException | None]]) -> None:
    """Resolve futures outside the lock, so their callbacks may call back into the group."""
    for fut, result, err in actions:
        if err is not None:
            fut.set_exception(err)
        else:
            fut.set_result(result)
