"""The trio pump for `group_average`: matchmaking, then reduce-scatter and all-gather.

Decisions are the sans-IO cores': `gossip.matchmaking.Matchmaker` (who leads, who is in the
group), `gossip.averaging` (shard bounds, the reducer's bookkeeping, what the result claims).
This class sends, waits and keeps deadlines; `gossip.collectives.Collectives` exposes it.
Codec work on large slices runs in a worker thread (DESIGN.md §6).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import trio

from gossip import collective_wire as wire
from gossip.averaging import (
    INVALID,
    LATE,
    OK,
    UNKNOWN,
    WRONG_SHARD,
    ShardReduction,
    all_finite,
    check_values,
    layout_fingerprint,
    shard_bounds,
    split_flat,
    summarize,
)
from gossip.collective_config import (
    CollectivesConfig,
    CollectiveStats,
    PeerRecordLike,
    PeerSource,
    Signal,
    check_timeout,
)
from gossip.collective_types import AverageResult, ShardReport
from gossip.errors import LocalProtocolError, MurmurError, PeerTimeout, PeerUnreachable
from gossip.matchmaking import ABSENT, REFUSE, WAIT, JoinAnswer, Matchmaker, Member, Role
from gossip.transport import Buffer, Handler, Request, Response, Transport


@dataclass
class _Session:
    """One running group_average on this node."""

    key: str
    codec: Any
    mm: Matchmaker
    changed: Signal = field(default_factory=Signal)
    early_parts: int = 0  # slices waiting for our seal (bounded by max_group)
    reduction: ShardReduction | None = None  # set when the all-reduce starts
    group_id: int | None = None
    index: int = -1  # our position in the group = the shard we reduce
    end: float = math.inf  # the all-reduce deadline
    reply: tuple[list[bytes], float, bytes, list[Buffer]] | None = None  # our reduced shard, encoded
    done: bool = False



class GroupAverage:
    """One node's group_average: sessions by key, each a `Matchmaker` then a `ShardReduction`."""

    def __init__(
        self, transport: Transport, peers: PeerSource, config: CollectivesConfig, rng: random.Random
    ) -> None:
        self.transport = transport
        self.peers = peers
        self.config = config
        self.rng = rng
        self.me = transport.peer_id
        self.address = transport.addresses[0]
        self.stats = CollectiveStats()
        self._sessions: dict[str, _Session] = {}

    def routes(self) -> list[tuple[str, Handler]]:
        return [
            (wire.AVG_HELLO.name, self._on_hello),
            (wire.AVG_JOIN.name, self._on_join),
            (wire.AVG_PART.name, self._on_part),
        ]

    async def group_average(
        self,
        key: str,
        tensors: Sequence[np.ndarray],
        codec: Any,
        weight: float = 1.0,
        *,
        timeout: float,
        window: float | None = None,
    ) -> AverageResult:
        """Weighted mean of `tensors` over the peers that join `key` within the window.

        `codec` has `encode(x) -> (header, buffers)` and `decode(header, buffers,
        expected_shape)`; every contribution and every reduced shard travels through it.
        `window` (default `config.matchmaking_window`, at most half the timeout) bounds
        matchmaking; the rest of the timeout is for the all-reduce. Never raises for a peer's
        failure: the result says what was averaged, over whom.
        """
        if type(key) is not str or not 1 <= len(key) <= wire.MAX_KEY:
            raise ValueError(f"key must be a str of 1..{wire.MAX_KEY} chars, got {key!r}")
        check_timeout(timeout)
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be a finite number > 0, got {weight!r}")
        arrays = [np.asarray(t, dtype=np.float32) for t in tensors]
        shapes = [a.shape for a in arrays]
        # One contiguous tensor is used in place (read only); several are concatenated into a
        # vector of our own, which then also receives the result (no second full-size buffer).
        if len(arrays) == 1 and arrays[0].flags.c_contiguous:
            flat, owned = arrays[0].reshape(-1), False
        else:
            flat = np.concatenate([a.ravel() for a in arrays]) if arrays else np.zeros(0, np.float32)
            owned = True
        if not all_finite(flat):
            raise ValueError("tensors must be finite: a NaN or inf must never reach a peer")
        if key in self._sessions:
            raise LocalProtocolError(f"group_average for key {key!r} is already running")
        if len(self._sessions) >= self.config.max_keys:
            raise LocalProtocolError(f"{self.config.max_keys} group_average calls already running (max_keys)")
        window = min(window or self.config.matchmaking_window, timeout / 2)
        now = trio.current_time()
        candidates = [r for r in self.peers.live_peers() if r.peer_id != self.me and r.addresses]
        if len(candidates) > self.config.max_candidates:  # a big swarm: greet a random subset
            candidates = self.rng.sample(candidates, self.config.max_candidates)
        mm = Matchmaker(
            Member(self.me, self.address), layout_fingerprint(shapes), now, now + timeout, window,
            self.config.max_group, frozenset(r.peer_id for r in candidates), self.config.join_slack,
        )
        session = self._sessions[key] = _Session(key, codec, mm)
        try:
            if candidates:
                with trio.move_on_at(mm.deadline):
                    await self._matchmake(session, candidates)
            if mm.result is None:  # the deadline cut matchmaking short: nobody counts on us
                mm.close()
            group = mm.result.group if mm.result is not None and mm.role is Role.SEALED else ()
            if len(group) <= 1:
                result = _alone(self.me, flat if owned else flat.copy(), shapes, float(weight))
            else:
                result = await self._allreduce(session, flat, shapes, float(weight), owned)
        finally:
            mm.close()
            session.done = True
            del self._sessions[key]
            session.changed.fire()
        self._count(result)
        return result

    async def _matchmake(self, session: _Session, candidates: Sequence[PeerRecordLike]) -> None:
        mm = session.mm
        async with trio.open_nursery() as nursery:
            for record in candidates:
                nursery.start_soon(self._hello, session, record)
            while mm.role is not Role.SEALED:
                now = trio.current_time()
                leader = mm.target()
                if leader is not None:
                    mm.follow(leader)
                    session.changed.fire()  # our own joiners learn of the redirect
                    answer = await self._join(session, leader)
                    mm.join_answered(leader, answer, trio.current_time())
                    session.changed.fire()
                elif mm.should_seal(now):
                    mm.seal(self.rng.getrandbits(63), now)
                    session.changed.fire()
                else:
                    await session.changed.wait(mm.seal_at)
            nursery.cancel_scope.cancel()  # stop greeting: the group is fixed

    async def _hello(self, session: _Session, record: PeerRecordLike) -> None:
        body = {"key": session.key, "layout": session.mm.fingerprint, "address": self.address}
        try:
            reply = await self.transport.call(
                record.addresses[0], wire.AVG_HELLO.name, body,
                timeout=self.config.hello_timeout, peer_id=record.peer_id,
            )
        except MurmurError:
            return
        if reply.body["present"]:
            session.mm.saw(record.peer_id, record.addresses[0])
            session.changed.fire()

    async def _join(self, session: _Session, leader: Member) -> JoinAnswer | None:
        mm = session.mm
        now = trio.current_time()
        patience = min(max(mm.seal_at - now, 0.0) + self.config.join_slack, mm.deadline - now)
        if patience <= 0:
            return None
        body = {
            "key": session.key, "layout": mm.fingerprint, "address": self.address,
            "waited": now - mm.entered, "patience": patience, "remaining": mm.deadline - now,
        }
        try:
            reply = await self.transport.call(
                leader.address, wire.AVG_JOIN.name, body, timeout=patience, peer_id=leader.peer_id
            )
        except MurmurError:
            return None
        return wire.join_answer_from_wire(reply.body, self.config.max_group)

    async def _on_hello(self, req: Request) -> Response:
        s = self._sessions.get(req.body["key"])
        present = (
            s is not None
            and s.mm.fingerprint == req.body["layout"]
            and s.mm.role in (Role.GATHERING, Role.FOLLOWING)
        )
        if present:
            s.mm.saw(req.peer_id, req.body["address"])
            s.changed.fire()
        return Response({"present": present})

    async def _on_join(self, req: Request) -> Response:
        b = req.body
        s = self._sessions.get(b["key"])
        if s is None:
            return Response(wire.join_answer_to_wire(JoinAnswer(REFUSE, ABSENT)))
        now = trio.current_time()
        answer = s.mm.on_join(Member(req.peer_id, b["address"]), b["layout"], b["waited"], b["remaining"], now)
        s.changed.fire()
        if answer.kind == WAIT:
            # Long poll: answer once the group is sealed or we follow someone else. Give up a
            # little before the joiner does, so it never counts itself out of a group it is in.
            give_up = min(s.mm.deadline, now + 0.9 * b["patience"])
            while req.peer_id not in s.mm.answers and trio.current_time() < give_up:
                await s.changed.wait(give_up)
            # Read, not pop: a repeated join (its first answer lost) must get the same answer.
            answer = s.mm.answers.get(req.peer_id) or s.mm.withdraw(req.peer_id)
        return Response(wire.join_answer_to_wire(answer))

    # =========================================================================================
    # group_average: reduce-scatter and all-gather
    # =========================================================================================

    async def _allreduce(
        self, session: _Session, flat: np.ndarray, shapes: list[tuple[int, ...]], weight: float, owned: bool
    ) -> AverageResult:
        sealed = session.mm.result
        assert sealed is not None
        ids = tuple(m.peer_id for m in sealed.group)
        n, me = len(ids), ids.index(self.me)
        bounds = shard_bounds(int(flat.size), n)
        now = trio.current_time()
        session.end = min(session.mm.deadline, now + sealed.budget)
        part_deadline = now + self.config.part_wait * (session.end - now)
        lo, hi = bounds[me]
        red = ShardReduction(self.me, ids, flat[lo:hi], weight)
        session.group_id, session.index, session.reduction = sealed.group_id, me, red
        session.changed.fire()  # slices that arrived before our seal may go on
        # Each shard of `out` is written once: its mean, or our own input. An `owned` flat vector
        # is its own output: shard i is overwritten only once its reply arrived, after the last
        # byte of our slice i went out (a reply before that is a protocol violation), and a
        # shard not averaged keeps our input where it is.
        out = flat if owned else np.empty_like(flat)
        reports: list[ShardReport | None] = [None] * n
        rejected: set[bytes] = set()
        async with trio.open_nursery() as nursery:
            for i, member in enumerate(sealed.group):
                if i != me:
                    nursery.start_soon(
                        self._send_part, session, i, member, flat, bounds[i], weight, out, reports, rejected
                    )
            if hi > lo:
                while not red.complete and trio.current_time() < part_deadline:
                    await session.changed.wait(part_deadline)
            mean = red.finalize()
            header, bufs = await self._codec(session.codec.encode, mean, numel=mean.size)
            packed = wire.pack_header(header)
            session.reply = (sorted(red.contributors), red.total_weight, packed, list(bufs))
            session.changed.fire()
            # Keep what the others will decode, so every member holds the same values (a
            # lossless codec decodes to the mean itself: no need to decode).
            values, problem = mean, None
            if not getattr(session.codec, "lossless", False):
                values, problem = await self._decode(session.codec, packed, bufs, mean.size)
            out[lo:hi] = values if problem is None else mean
            reports[me] = ShardReport(lo, hi, self.me, True, tuple(sorted(red.contributors)), red.total_weight)
        if out is not flat:
            for report in reports:
                if report is not None and not report.averaged:
                    out[report.start : report.stop] = flat[report.start : report.stop]
        rejected |= set(red.rejected)
        self.stats.rejected += len(red.rejected)
        final = [r for r in reports if r is not None]
        contributors, fractions = summarize(self.me, final, [int(np.prod(s, dtype=np.int64)) for s in shapes])
        return AverageResult(
            tensors=split_flat(out, shapes), group=ids, contributors=contributors,
            fractions=fractions, shards=tuple(final), rejected=tuple(sorted(rejected)),
        )

    async def _send_part(
        self, session: _Session, i: int, member: Member, flat: np.ndarray, bound: tuple[int, int],
        weight: float, out: np.ndarray, reports: list, rejected: set[bytes],
    ) -> None:
        lo, hi = bound
        failed = ShardReport(lo, hi, member.peer_id, False, (), 0.0)
        reports[i] = failed
        if hi == lo:  # nothing to average there: trivially done, nobody's data in it
            reports[i] = ShardReport(lo, hi, member.peer_id, True, (), 0.0)
            return
        header, bufs = await self._codec(session.codec.encode, flat[lo:hi], numel=hi - lo)
        body = {
            "key": session.key, "group_id": session.group_id, "shard": i, "weight": weight,
            "header": wire.pack_header(header),
        }
        timeout = session.end - trio.current_time()
        try:
            if timeout <= 0:
                raise PeerTimeout("no time left for this shard")
            reply = await self.transport.call(
                member.address, wire.AVG_PART.name, body, bufs, timeout=timeout, peer_id=member.peer_id
            )
        except MurmurError as exc:
            self.stats.failed(type(exc).__name__)
            if isinstance(exc, PeerUnreachable) and session.reduction is not None:
                # It is down: our own shard stops waiting for its slice (else: until part_wait).
                session.reduction.give_up_on(member.peer_id, type(exc).__name__)
                session.changed.fire()
            return
        r = reply.body
        if not r["ok"]:
            self.stats.failed(r["reason"])
            return
        group = set(m.peer_id for m in session.mm.result.group)  # type: ignore[union-attr]
        contributors = r["contributors"]
        values, problem = await self._decode(session.codec, r["header"], reply.buffers, hi - lo)
        if problem is None and not (
            len(set(contributors)) == len(contributors) and set(contributors) <= group
            and {self.me, member.peer_id} <= set(contributors)
        ):
            problem = "its contributor list is not a subset of the group with us and itself in it"
        if problem is not None:
            rejected.add(member.peer_id)
            self.stats.rejected += 1
            self.stats.failed(INVALID)
            return
        out[lo:hi] = values
        reports[i] = ShardReport(lo, hi, member.peer_id, True, tuple(sorted(contributors)), r["weight"])

    async def _on_part(self, req: Request) -> Response:
        b = req.body
        s = self._sessions.get(b["key"])
        if s is not None and s.reduction is None and s.early_parts < self.config.max_group:
            # The slice outran the leader's answer to us: wait (bounded) for our own seal.
            s.early_parts += 1
            try:
                while s.reduction is None and not s.done and trio.current_time() < s.mm.deadline:
                    await s.changed.wait(s.mm.deadline)
            finally:
                s.early_parts -= 1
        if s is None or s.done or s.reduction is None or s.group_id != b["group_id"]:
            self.stats.dropped += 1
            return _part_refusal(UNKNOWN)
        if b["shard"] != s.index:
            return _part_refusal(WRONG_SHARD)
        red = s.reduction
        values, problem = await self._decode(s.codec, b["header"], req.buffers, red.size)
        reason = red.offer(req.peer_id, b["weight"], values, problem, checked=True)
        del values  # summed into the shard: do not hold a copy while we wait for the others
        s.changed.fire()
        if reason != OK:
            return _part_refusal(reason)
        while s.reply is None and not s.done and trio.current_time() < s.end:
            await s.changed.wait(s.end)
        if s.reply is None:
            return _part_refusal(LATE)
        contributors, total, packed, bufs = s.reply
        return Response(
            {"ok": True, "reason": OK, "contributors": contributors, "weight": total, "header": packed}, bufs
        )

    # =========================================================================================
    # helpers
    # =========================================================================================

    async def _codec(self, fn: Callable, *args: Any, numel: int) -> Any:
        if numel > self.config.offload_numel:
            return await trio.to_thread.run_sync(fn, *args)
        return fn(*args)

    async def _decode(
        self, codec: Any, packed: bytes, buffers: Sequence[Buffer], size: int
    ) -> tuple[np.ndarray | None, str | None]:
        """Decode a peer's slice: (values, None) or (None, why it is unusable). Never raises."""
        header = wire.unpack_header(packed)
        if header is None:
            return None, "header is not a msgpack map"
        try:
            decoded = await self._codec(codec.decode, header, list(buffers), (size,), numel=size)
            values = np.asarray(decoded.numpy() if hasattr(decoded, "numpy") else decoded, dtype=np.float32)
        except Exception as exc:  # noqa: BLE001 - the bytes are the peer's: any failure is its fault
            return None, f"{type(exc).__name__}: {str(exc)[:200]}"
        problem = check_values(values, size)
        return (None, problem) if problem else (values, None)

    def _count(self, result: AverageResult) -> None:
        self.stats.averages += 1
        self.stats.complete += result.complete and not result.alone
        self.stats.alone += result.alone




def _alone(me: bytes, flat: np.ndarray, shapes: list[tuple[int, ...]], weight: float) -> AverageResult:
    report = ShardReport(0, int(flat.size), me, True, (me,), weight)
    return AverageResult(
        tensors=split_flat(flat, shapes), group=(me,), contributors=(me,),
        fractions=tuple(1.0 for _ in shapes), shards=(report,),
    )


def _part_refusal(reason: str) -> Response:
    return Response({"ok": False, "reason": reason, "contributors": [], "weight": 0.0, "header": b""})


