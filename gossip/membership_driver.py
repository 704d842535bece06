"""`Membership`: the trio pump around `gossip.membership.MembershipCore`.

It owns the timers and the calls; every decision (whom to shuffle with, whom to suspect, what to
merge) is the core's. One round, every `round_s` seconds with a random phase per node:

1. `core.tick`: drop suspects whose time is up and entries older than `max_age_s`;
2. shuffle with the member behind the oldest pointer; if it does not answer, ask
   `indirect_probes` other members to ping it, and if none can, suspect it;
3. beside it: ping suspects and doubted members, ping a random member (`pings_per_round`),
   every `revive_every` rounds shuffle with one removed peer (heals partitions), and while the
   view is empty call the bootstrap addresses again.

Every call has a deadline from the config, so no task waits on a peer for longer than
`call_timeout_s + 3 * probe_timeout_s`, and `leave()` never for longer than `leave_timeout_s`.
Handlers answer shuffles, joins, pings, indirect probes and leave announcements; bad records
and oversized messages are counted in `stats` and refused, never raised into the node.
"""
from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import trio

from gossip.errors import (
    LocalProtocolError,
    PeerTimeout,
    PeerUnreachable,
    RemoteError,
    RemoteProtocolError,
)
from gossip.identity import Identity
from gossip.membership import MembershipConfig, MembershipCore, MembershipStats, ShufflePlan, next_seq
from gossip.membership_wire import JOIN, LEAVE, PING, PROBE, SHUFFLE, decode_entries, encode_entries
from gossip.messages import MessageType
from gossip.peer_records import PeerRecord, RecordError, check_metadata, decode_record, sign_record
from gossip.transport import Reply, Request, Response, Transport

# A call that ended in one of these tells us nothing good about the peer's liveness.
_UNREACHED = (PeerTimeout, PeerUnreachable, RemoteProtocolError)


class Membership:
    """Join a swarm, keep a fresh random partial view of it, detect failures, leave politely.

    `bootstrap` addresses are called at start (and again whenever the view runs empty); our
    own addresses among them are skipped, so every node of a swarm can share one list.
    `announce` overrides the addresses put in our record (default: `transport.addresses`).
    `wall_clock` gives unix seconds for record seqs and expiry (simulations pass virtual time).
    """

    def __init__(
        self,
        transport: Transport,
        identity: Identity,
        config: MembershipConfig | None = None,
        bootstrap: Sequence[str] = (),
        *,
        metadata: dict[str, Any] | None = None,
        announce: Sequence[str] | None = None,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        if transport.peer_id != identity.peer_id:
            raise ValueError("the transport runs under another identity: pass the same Identity to both")
        addresses = tuple(transport.addresses if announce is None else announce)
        if not addresses:
            raise ValueError("no address to announce: listen somewhere or pass announce=[...]")
        if isinstance(bootstrap, str) or any(not isinstance(a, str) or not a for a in bootstrap):
            raise ValueError("bootstrap must be a list of address strings, e.g. ['127.0.0.1:7000']")
        config = config if config is not None else MembershipConfig()
        self.config = config
        self._transport = transport
        self._identity = identity
        self._addresses = addresses
        self._bootstrap = [a for a in dict.fromkeys(bootstrap) if a not in addresses]
        self._wall = wall_clock
        self._rng = rng if rng is not None else random.Random()
        self._core = MembershipCore(config, identity.peer_id, self._rng)
        self.stats: MembershipStats = self._core.stats
        self._metadata = check_metadata(metadata or {})
        self._record = self._sign(self._addresses, previous=0)
        self._left = False
        self._scope: trio.CancelScope | None = None
        self._background: trio.Nursery  # set by run(): side tasks of rounds
        self._running = False
        # Peers that shuffled with us lately hold our record: they hear our leave first-hand.
        self._callers: OrderedDict[bytes, str] = OrderedDict()
        self._probe_slots = trio.Semaphore(config.max_inflight_probes)
        transport.route(SHUFFLE.name, self._on_shuffle)
        transport.route(JOIN.name, self._on_join)
        transport.route(PING.name, self._on_ping)
        transport.route(PROBE.name, self._on_probe)
        transport.route(LEAVE.name, self._on_leave)

    # -- public API ------------------------------------------------------------------------------

    @property
    def peer_id(self) -> bytes:
        return self._identity.peer_id

    @property
    def record(self) -> PeerRecord:
        """Our current signed record."""
        return self._record

    @property
    def core(self) -> MembershipCore:
        """The state machine (views, tombstones), for status reports and tests."""
        return self._core

    def sample(self, k: int) -> list[PeerRecord]:
        """k distinct live peers, uniformly at random over the swarm (fewer if we know fewer).

        Drawn among young pointers so a peer's in-degree does not bias it (see
        `MembershipCore.sample`); never ourselves, never a suspect."""
        if self._left:
            return []
        return self._core.sample(k, trio.current_time())

    def live_peers(self) -> list[PeerRecord]:
        return [] if self._left else self._core.live()

    def update_metadata(self, **fields: Any) -> None:
        """Change fields of our record's metadata (None removes one); re-signs with a higher seq."""
        if self._left:
            raise LocalProtocolError("this node has left the swarm; its record is final")
        metadata = dict(self._metadata)
        for key, value in fields.items():
            if value is None:
                metadata.pop(key, None)
            else:
                metadata[key] = value
        self._metadata = check_metadata(metadata)
        self._record = self._sign(self._addresses, self._record.seq)

    async def run(self) -> None:
        """Join, then run rounds until cancelled or `leave()`."""
        if self._running or self._left:
            raise LocalProtocolError("Membership.run() runs once per Membership object")
        self._running = True
        cfg = self.config
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as self._background:
                if self._bootstrap:
                    await self._join()
                await trio.sleep(self._rng.uniform(0.0, cfg.round_s))  # spread rounds across nodes
                next_round = trio.current_time()
                while True:
                    await self._round()
                    next_round = max(next_round + cfg.round_s, trio.current_time())
                    await trio.sleep_until(next_round)

    async def leave(self) -> None:
        """Tell view members and recent partners that we leave; stop rounds. Bounded time."""
        if self._left:
            return
        self._left = True
        if self._scope is not None:
            self._scope.cancel()
        self._record = self._sign((), self._record.seq)
        targets: dict[bytes, str] = {r.peer_id: r.addresses[0] for r in self._core.live()}
        for peer_id, address in self._callers.items():
            targets.setdefault(peer_id, address)
        body = {"record": self._record.blob}
        with trio.move_on_after(self.config.leave_timeout_s):
            async with trio.open_nursery() as nursery:
                for peer_id, address in targets.items():
                    nursery.start_soon(self._announce_leave, peer_id, address, body)

    # -- rounds ----------------------------------------------------------------------------------

    async def _round(self) -> None:
        wall = self._wall()
        if wall >= self._record.expires - self.config.record_ttl_s / 2 or self._core.own_seq_seen >= self._record.seq:
            self._record = self._sign(self._addresses, self._record.seq)  # fresh expiry / beat an old self
        plan = self._core.tick(trio.current_time(), self._record)
        # Side work runs beside the shuffle in the background nursery; each task is bounded by
        # its own deadlines (at most 4 * probe_timeout_s), and a round starts at most
        # view_size + pings_per_round + 2 of them, so they cannot pile up without bound.
        spawn = self._background.start_soon
        for record in plan.reprobe:
            spawn(self._reprobe, record)
        for record in plan.ping:
            spawn(self._ping, record)
        if plan.revive is not None:
            spawn(self._shuffle, self._core.plan_revive(plan.revive, trio.current_time(), self._record), True)
        if plan.rejoin and self._bootstrap:
            spawn(self._join)
        if plan.shuffle is not None:
            await self._shuffle(plan.shuffle)

    async def _call(self, record: PeerRecord, mt: MessageType, body: dict, timeout: float) -> Reply:
        return await self._transport.call(
            record.addresses[0], mt.name, body, timeout=timeout, peer_id=record.peer_id
        )

    async def _shuffle(self, plan: ShufflePlan, revive: bool = False) -> None:
        target = plan.target
        start = trio.current_time()
        body = encode_entries(plan.entries)
        body["gone"] = self._core.gone(start)
        try:
            reply = await self._call(target, SHUFFLE, body, self.config.call_timeout_s)
            received = decode_entries(reply.body, self.config.shuffle_len, self.stats)
        except RemoteError:
            # It answered, with an error (e.g. it refused our message): alive, nothing swapped.
            self._core.heard_from(target.peer_id, trio.current_time())
            return
        except _UNREACHED:
            if not revive:  # a removed peer that stays silent is simply forgotten
                self.stats.shuffle_failures += 1
                await self._check(target)
            return
        now = trio.current_time()
        self._core.on_shuffle_reply(plan, received, now - start, now, self._wall(), revive)
        self._core.on_gone(reply.body["gone"], now)
        self.stats.shuffles += 1

    async def _check(self, target: PeerRecord) -> None:
        """SWIM's indirect probe: can anyone else reach `target`? If not, suspect it."""
        helpers = self._core.probe_helpers(target.peer_id)
        confirmed = False

        async def ask(helper: PeerRecord, cancel: trio.CancelScope) -> None:
            nonlocal confirmed
            self.stats.indirect_probes += 1
            body = {"target": target.peer_id, "address": target.addresses[0]}
            try:
                reply = await self._call(helper, PROBE, body, 3 * self.config.probe_timeout_s)
            except (RemoteError, *_UNREACHED):
                return  # that helper gives no information
            if reply.body["alive"]:
                confirmed = True
                cancel.cancel()

        if helpers:
            async with trio.open_nursery() as nursery:
                for helper in helpers:
                    nursery.start_soon(ask, helper, nursery.cancel_scope)
        if confirmed:
            self._core.heard_from(target.peer_id, trio.current_time())
        else:
            self._core.suspect(target.peer_id, trio.current_time())

    async def _reprobe(self, record: PeerRecord) -> None:
        try:
            reply = await self._call(record, PING, {"known": record.seq}, self.config.probe_timeout_s)
        except (RemoteError, *_UNREACHED):
            # Silent: a doubted member becomes a suspect; tick() removes suspects in time.
            self._core.probe_failed(record.peer_id, trio.current_time())
            return
        fresh = self._decode_optional(reply.body["record"])
        self._core.heard_from(record.peer_id, trio.current_time(), fresh, self._wall())

    async def _ping(self, record: PeerRecord) -> None:
        """SWIM's probe of a random member: a ping, then helpers, then suspicion."""
        try:
            reply = await self._call(record, PING, {"known": record.seq}, self.config.probe_timeout_s)
        except RemoteError:
            self._core.heard_from(record.peer_id, trio.current_time())
            return
        except _UNREACHED:
            await self._check(record)
            return
        fresh = self._decode_optional(reply.body["record"])
        self._core.heard_from(record.peer_id, trio.current_time(), fresh, self._wall())

    async def _join(self) -> None:
        """Call up to max_bootstrap bootstrap addresses at once and merge what they answer."""
        replies: list[tuple[bytes, list, float]] = []
        async with trio.open_nursery() as nursery:
            for address in self._bootstrap[: self.config.max_bootstrap]:
                nursery.start_soon(self._join_one, address, replies)
        if replies:
            self._core.on_join_replies(replies, trio.current_time(), self._wall())

    async def _join_one(self, address: str, replies: list) -> None:
        start = trio.current_time()
        try:
            reply = await self._transport.call(
                address, JOIN.name, {"record": self._record.blob}, timeout=self.config.call_timeout_s
            )
            received = decode_entries(reply.body, self.config.shuffle_len + 1, self.stats)
        except (RemoteError, *_UNREACHED):
            self.stats.join_failures += 1
            return
        replies.append((reply.peer_id, received, trio.current_time() - start))

    async def _announce_leave(self, peer_id: bytes, address: str, body: dict) -> None:
        try:
            await self._transport.call(
                address, LEAVE.name, body, timeout=self.config.leave_timeout_s, peer_id=peer_id
            )
        except (RemoteError, *_UNREACHED):
            pass  # it will notice by probing; the announcement only makes it faster

    # -- handlers --------------------------------------------------------------------------------

    def _refuse_if_left(self) -> None:
        if self._left:
            raise PeerUnreachable("this node has left the swarm")

    def _note_caller(self, peer_id: bytes, received: list[tuple[PeerRecord, float]]) -> None:
        for record, _ in received:
            if record.peer_id == peer_id and record.addresses:
                self._callers[peer_id] = record.addresses[0]
                self._callers.move_to_end(peer_id)
                if len(self._callers) > self.config.view_size:
                    self._callers.popitem(last=False)
                return

    def _decode_caller_record(self, blob: bytes, caller: bytes) -> PeerRecord:
        try:
            record = decode_record(blob)
        except RecordError:
            self.stats.forged += 1
            raise
        if record.peer_id != caller:
            self.stats.forged += 1
            raise RecordError("the record is not the caller's own")
        return record

    def _decode_optional(self, blob: bytes | None) -> PeerRecord | None:
        if blob is None:
            return None
        try:
            return decode_record(blob)
        except RecordError:
            self.stats.forged += 1
            return None

    async def _on_shuffle(self, request: Request) -> Response:
        self._refuse_if_left()
        received = decode_entries(request.body, self.config.shuffle_len, self.stats)
        now = trio.current_time()
        reply = self._core.on_shuffle_request(request.peer_id, received, now, self._wall())
        self._core.on_gone(request.body["gone"], now)
        self._note_caller(request.peer_id, received)
        body = encode_entries(reply)
        body["gone"] = self._core.gone(now)
        return Response(body)

    async def _on_join(self, request: Request) -> Response:
        self._refuse_if_left()
        record = self._decode_caller_record(request.body["record"], request.peer_id)
        reply = self._core.on_join(record, trio.current_time(), self._wall())
        self._note_caller(request.peer_id, [(record, 0.0)])
        return Response(encode_entries([(self._record, 0.0)] + reply))

    async def _on_ping(self, request: Request) -> Response:
        self._core.heard_from(request.peer_id, trio.current_time())
        newer = self._record.blob if self._record.seq > request.body["known"] else None
        return Response({"record": newer})

    async def _on_probe(self, request: Request) -> Response:
        self._refuse_if_left()
        timeout = self.config.probe_timeout_s
        target, address = request.body["target"], request.body["address"]
        acquired = False
        with trio.move_on_after(timeout):
            await self._probe_slots.acquire()  # bounded: a peer cannot make us dial without limit
            acquired = True
        if not acquired:
            raise PeerTimeout(f"all {self.config.max_inflight_probes} probe slots busy")
        try:
            self.stats.probes_answered += 1
            await self._transport.call(address, PING.name, {"known": 0}, timeout=timeout, peer_id=target)
        except (RemoteError, *_UNREACHED):
            return Response({"alive": False})
        finally:
            self._probe_slots.release()
        return Response({"alive": True})

    async def _on_leave(self, request: Request) -> Response:
        record = self._decode_caller_record(request.body["record"], request.peer_id)
        self._core.on_leave(record, trio.current_time())
        return Response({})

    # -- our record ------------------------------------------------------------------------------

    def _sign(self, addresses: Sequence[str], previous: int) -> PeerRecord:
        wall = self._wall()
        seq = next_seq(max(previous, self._core.own_seq_seen), wall)
        return sign_record(self._identity, addresses, seq, int(wall) + self.config.record_ttl_s, self._metadata)
