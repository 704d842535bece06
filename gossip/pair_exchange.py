"""The trio pump for `pair_exchange`: proposals, swap and commit over a `Transport`.

Every decision is `gossip.pairing.PairingCore`'s; this class sends its messages, answers its
peers' and keeps the deadline. `gossip.collectives.Collectives` exposes it.
"""

from __future__ import annotations

import math
import random
from typing import Any, Sequence

import trio

from gossip import collective_wire as wire
from gossip.collective_config import CollectivesConfig, PeerRecordLike, PeerSource, Signal, check_timeout
from gossip.collective_types import PairResult
from gossip.errors import MurmurError
from gossip.pairing import INVALID as INVALID_PAYLOAD
from gossip.pairing import Decision, PairingCore, Payload, Phase, choose_partner
from gossip.transport import Buffer, Handler, Request, Response, Transport


class PairExchange:
    """One node's pair_exchange: a `PairingCore` pumped over `transport`."""

    def __init__(
        self, transport: Transport, peers: PeerSource, config: CollectivesConfig, rng: random.Random
    ) -> None:
        self.transport = transport
        self.peers = peers
        self.config = config
        self.rng = rng
        self.me = transport.peer_id
        self.core = PairingCore(self.me, config.pair_hold_timeout)
        self._target_records: dict[bytes, PeerRecordLike] = {}  # the record of the core's target
        self.changed = Signal()

    def routes(self) -> list[tuple[str, Handler]]:
        return [
            (wire.PAIR_PROPOSE.name, self._on_propose),
            (wire.PAIR_SWAP.name, self._on_swap),
            (wire.PAIR_COMMIT.name, self._on_commit),
        ]

    async def pair_exchange(
        self, round: int, body: dict, buffers: Sequence[Buffer] = (), *, timeout: float
    ) -> PairResult | None:
        """Swap (body, buffers) with one random live peer for `round`; None if none in time.

        Both sides get each other's payload or neither does (see `gossip.pairing`). A node
        pairs at most once per round; one pair_exchange runs at a time.
        """
        if type(round) is not int or not 0 <= round <= wire.MAX_ROUND:
            raise ValueError(f"round must be an int in [0, {wire.MAX_ROUND}], got {round!r}")
        check_timeout(timeout)
        ours = Payload(wire.pack_user_body(body), list(buffers))
        wire.check_pair_buffers(ours.buffers)
        deadline = trio.current_time() + timeout
        core = self.core
        core.start(round, ours, min(self.config.pair_patience, timeout / 4))
        self.changed.fire()
        try:
            while not core.done and trio.current_time() < deadline:
                if core.nobody_left(r.peer_id for r in self.peers.live_peers()):
                    break  # every live peer already paired this round: no partner can come
                await self._pair_step(round, deadline)
        finally:
            outcome = core.finish()
            self.changed.fire()
        if outcome is None:
            return None
        peer, theirs = outcome
        return PairResult(peer, theirs.body, list(theirs.buffers))

    async def _pair_step(self, round: int, deadline: float) -> None:
        core = self.core
        now = trio.current_time()
        if core.expire(now):
            self.changed.fire()
        if core.phase is Phase.HOLDING:  # someone proposed to us: wait for its swap and commit
            await self.changed.wait(min(deadline, core.hold_until))
            return
        target = core.waiting_for(now)
        if target is not None and target in self._target_records:
            peer, records = target, self._target_records
        else:
            records = {r.peer_id: r for r in self.peers.sample(self.config.pair_sample) if r.addresses}
            peer = choose_partner(list(records), self.me, core.refused, self.rng)
            self._target_records = {peer: records[peer]} if peer is not None else {}
        if peer is not None:
            await self._initiate(records[peer], round, deadline)
        if core.phase is Phase.OPEN:
            pause = self.rng.uniform(0.0, self.config.pair_retry_delay) if peer else self.config.pair_retry_delay
            await self.changed.wait(min(deadline, trio.current_time() + pause))

    async def _initiate(self, record: PeerRecordLike, round: int, deadline: float) -> None:
        core, peer = self.core, record.peer_id
        if not core.begin_proposal(peer, trio.current_time()):
            return
        address = record.addresses[0]
        sent = trio.current_time()
        reply = await self._pair_call(address, peer, wire.PAIR_PROPOSE.name, {"round": round}, (), deadline)
        rtt = trio.current_time() - sent  # of a small message: what the commit will take
        decision = Decision(reply.body["ok"], reply.body["reason"]) if reply else None
        if not core.proposal_answered(peer, decision, trio.current_time()):
            return
        assert core.ours is not None
        body = {"round": round, "body": core.ours.packed_body}
        reply = await self._pair_call(address, peer, wire.PAIR_SWAP.name, body, core.ours.buffers, deadline)
        theirs = None
        if reply is not None and reply.body["ok"]:
            theirs = wire.unpack_user_body(reply.body["body"], reply.buffers)
            if theirs is None:
                reply = None  # an unreadable payload: treated as no answer, nobody commits
        decision = Decision(reply.body["ok"], reply.body["reason"]) if reply else None
        if not core.swap_answered(peer, decision, theirs):
            return
        if deadline - trio.current_time() < 2 * rtt:
            # A commit now would likely be answered after our deadline, leaving the partner
            # committed and us not. Not committing is safe: its hold expires, nobody uses anything.
            core.give_up(peer, "no_time")
            return
        # The commit is idempotent at the acceptor: retry until an answer or the deadline, each
        # try allowed a few round trips, so one lost message does not use up all our time.
        per_try = max(4 * rtt, 0.05)
        while True:
            reply = await self._pair_call(
                address, peer, wire.PAIR_COMMIT.name, {"round": round}, (), deadline, per_try
            )
            if reply is not None:
                core.commit_answered(peer, Decision(reply.body["ok"], reply.body["reason"]))
                return
            if trio.current_time() >= deadline:
                core.commit_unanswered()
                return
            await trio.sleep(min(self.config.pair_retry_delay, max(0.0, deadline - trio.current_time())))

    async def _pair_call(self, address, peer, method, body, buffers, deadline, limit=math.inf) -> Any:
        timeout = min(self.config.pair_call_timeout, limit, deadline - trio.current_time())
        if timeout <= 0:
            return None
        try:
            return await self.transport.call(address, method, body, buffers, timeout=timeout, peer_id=peer)
        except MurmurError:
            return None

    async def _on_propose(self, req: Request) -> Response:
        d = self.core.on_propose(req.peer_id, req.body["round"], trio.current_time())
        self.changed.fire()
        return Response({"ok": d.ok, "reason": d.reason})

    async def _on_swap(self, req: Request) -> Response:
        core = self.core
        theirs = wire.unpack_user_body(req.body["body"], req.buffers)
        if theirs is None:
            d = Decision.refuse(INVALID_PAYLOAD)
        else:
            d = core.on_swap(req.peer_id, req.body["round"], theirs, trio.current_time())
        self.changed.fire()
        if not d.ok or core.ours is None:
            return Response({"ok": False, "reason": d.reason, "body": b""})
        return Response({"ok": True, "reason": d.reason, "body": core.ours.packed_body}, core.ours.buffers)

    async def _on_commit(self, req: Request) -> Response:
        d = self.core.on_commit(req.peer_id, req.body["round"])
        self.changed.fire()
        return Response({"ok": d.ok, "reason": d.reason})

