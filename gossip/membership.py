"""Swarm membership, sans-IO: the partial view, shuffles, suspicion and removal as plain data.

The view follows CYCLON's enhanced shuffle (Voulgaris, Gavidia, van Steen, "CYCLON: Inexpensive
Membership Management for Unstructured P2P Overlays", J. Netw. Syst. Manage. 2005, section 3.2):
every round a node swaps `shuffle_len` entries with the member behind its oldest pointer;
received entries fill empty slots first, then the slots of entries it just sent away. Views
stay random samples of the swarm with a narrow in-degree spread.

Sampling (`sample`) is fair beyond what the view alone gives: a view holds each peer in
proportion to its in-degree, but every peer makes exactly one new pointer to itself per round,
so drawing among *young* pointers (younger than `sample_age_s`) picks every member equally often.

Failure detection adds SWIM's machinery (Das, Gupta, Motivala, DSN 2002, sections 3-4): a shuffle
or a random ping that gets no answer is a failed direct probe; `indirect_probes` other peers are
asked to ping the target; if none can, the target is *suspected* (no longer sampled or relayed)
and removed after `suspicion_s` unless it shows a sign of life. Removed peers are tombstoned, so
their old records cannot be gossiped back in. News of a removal spreads as a rumour on shuffles
("gone"): a peer that hears it only *doubts* that member (still samples it, stops relaying it)
and pings it next round itself; only its own failed ping makes it a suspect. A liar costs pings.

Ages make the bound. Each entry carries its pointer's age, the time since its peer made it;
relays pass ages on (plus a per-hop allowance for transit), so a dead peer's entries only grow
older, everywhere. An entry older than `max_age_s` is dropped on receipt and at every round: a
peer that died at time t is out of every view by t + max_age_s + round_s, whatever else happens.

This module does no I/O and never imports trio: `MembershipCore` is fed records, ages and times
(`now`: a monotonic clock; `wall`: unix seconds, for record expiry) and returns decisions. The
trio pump is `gossip.membership_driver.Membership`; the wire format is `gossip.membership_wire`.
"""
from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from gossip.errors import RemoteProtocolError
from gossip.membership_config import MembershipConfig, MembershipStats
from gossip.membership_wire import MAX_GONE
from gossip.peer_records import PeerRecord

__all__ = ["MembershipConfig", "MembershipCore", "MembershipStats", "RoundPlan", "ShufflePlan", "next_seq"]

MAX_RUMOURS = 64  # removals heard from others that we pass on (oldest forgotten first)


class _Entry:
    """One view slot. `heard_at` is when its peer was last heard from directly, by anyone
    (liveness); `born` is when its owner made this pointer (CYCLON's age)."""

    __slots__ = ("record", "heard_at", "born", "due", "suspect_since", "doubted_at", "given")

    def __init__(self, record: PeerRecord, heard_at: float) -> None:
        self.record = record
        self.heard_at = heard_at
        # CYCLON's pointer age: when the owner made this pointer (injected its record), carried
        # from hop to hop and never refreshed by duplicates. Shuffling with the oldest pointer,
        # not the least recently heard peer, keeps in-degrees even (a popular peer's fresh
        # duplicates must not shield its old pointers), and young pointers make sample() fair.
        self.born = heard_at
        self.due = heard_at  # shuffle order: `born`, pushed back after a shuffle that kept it
        self.given = 0  # times handed to a joiner: bootstraps spread their copies evenly
        self.suspect_since: float | None = None  # our probes failed: not sampled, removed in time
        self.doubted_at: float | None = None  # a partner reported it gone: ping it, do not relay it


@dataclass(frozen=True)
class ShufflePlan:
    """What to send in our shuffle: to `target`, these `entries` (our own record first)."""

    target: PeerRecord
    entries: list[tuple[PeerRecord, float]]  # (record, age in seconds)


@dataclass(frozen=True)
class RoundPlan:
    """What one round does, decided by `MembershipCore.tick`."""

    shuffle: ShufflePlan | None  # None: nobody to shuffle with
    reprobe: list[PeerRecord]  # suspects and doubted members to ping
    ping: list[PeerRecord]  # random members to ping (a failure starts an indirect check)
    revive: PeerRecord | None  # a removed peer to try again (graveyard)
    rejoin: bool  # our view is empty and a bootstrap attempt is due


def next_seq(previous: int, wall: float) -> int:
    """A record seq that beats `previous` and any seq this identity used before a restart.

    Microseconds of wall-clock time, so a restarted node that lost its state still wins, and
    +1 on top so two changes in one microsecond stay ordered.
    """
    return max(previous + 1, int(wall * 1_000_000))


class MembershipCore:
    """The partial view and every decision about it. Fed events, returns plans; no I/O."""

    def __init__(self, config: MembershipConfig, self_id: bytes, rng: random.Random) -> None:
        self.config = config
        self.self_id = self_id
        self.rng = rng
        self.view: dict[bytes, _Entry] = {}
        self.tombstones: OrderedDict[bytes, tuple[int, float]] = OrderedDict()  # id -> (seq, removed_at)
        self.graveyard: OrderedDict[bytes, tuple[PeerRecord, float]] = OrderedDict()  # id -> (record, removed_at)
        self.rumours: OrderedDict[bytes, float] = OrderedDict()  # id -> when we heard it was removed
        self.stats = MembershipStats()
        self.own_seq_seen = 0  # highest seq of our own id seen from peers (an earlier incarnation)
        self._round = 0
        self._empty_rounds = 0  # consecutive rounds that started with an empty view

    # -- queries ---------------------------------------------------------------------------------

    def live(self) -> list[PeerRecord]:
        """Records of view members that are not suspected."""
        return [e.record for e in self.view.values() if e.suspect_since is None]

    def sample(self, k: int, now: float) -> list[PeerRecord]:
        """Up to k distinct live view members, drawn so every swarm member is equally likely.

        A partial view holds each peer in proportion to its in-degree, so a plain draw from the
        view favours popular peers. But every peer makes exactly one new pointer to itself per
        round (its own shuffle), and pointers keep their age as they move: the pointers younger
        than sample_age_s number about sample_age_s / round_s per peer, whatever its in-degree.
        We draw from those first; only if fewer than k are young do the rest come from older
        live entries (uniformly).
        """
        if k < 0:
            raise ValueError("sample size k must be >= 0")
        horizon = now - self.config.sample_age_s
        young: list[_Entry] = []
        old: list[_Entry] = []
        for entry in self.view.values():
            if entry.suspect_since is None:
                (young if entry.born >= horizon else old).append(entry)
        if len(young) >= k:
            return [e.record for e in self.rng.sample(young, k)]
        picked = young + self.rng.sample(old, min(k - len(young), len(old)))
        return [e.record for e in picked]

    def is_suspect(self, peer_id: bytes) -> bool:
        entry = self.view.get(peer_id)
        return entry is not None and entry.suspect_since is not None

    def is_doubted(self, peer_id: bytes) -> bool:
        entry = self.view.get(peer_id)
        return entry is not None and entry.doubted_at is not None

    def _shareable(self, exclude: bytes | None = None) -> list[_Entry]:
        """Entries we pass on to others: not suspected, not doubted."""
        return [e for pid, e in self.view.items()
                if e.suspect_since is None and e.doubted_at is None and pid != exclude]

    # -- rounds ----------------------------------------------------------------------------------

    def tick(self, now: float, own: PeerRecord) -> RoundPlan:
        """Start a round: expire suspects and old entries, then plan the shuffle and pings.

        One pass over the view (O(view_size)): CYCLON's target is the member heard from longest
        ago; the shuffle carries us and shuffle_len - 1 random shareable members.
        """
        cfg = self.config
        rng = self.rng
        self._round += 1
        self.stats.rounds += 1
        suspicion_over = now - cfg.suspicion_s
        too_old = now - cfg.max_age_s
        expired: list[tuple[bytes, bool]] = []
        reprobe: list[PeerRecord] = []
        shareable: list[_Entry] = []
        target: _Entry | None = None
        for peer_id, entry in self.view.items():
            if entry.suspect_since is not None:
                if entry.suspect_since <= suspicion_over:
                    expired.append((peer_id, True))
                else:
                    reprobe.append(entry.record)
                continue
            if entry.heard_at < too_old:
                expired.append((peer_id, False))
                continue
            if target is None or entry.due < target.due:
                target = entry
            if entry.doubted_at is not None:
                reprobe.append(entry.record)
            else:
                shareable.append(entry)
        for peer_id, dead in expired:
            self._remove(peer_id, now, bury=dead)
            if dead:
                self.stats.removed += 1
            else:
                self.stats.aged_out += 1
        self._forget_old(now)
        revive = None
        if self.graveyard and self._round % cfg.revive_every == 0:
            revive = self.graveyard.pop(rng.choice(list(self.graveyard)))[0]
        self._empty_rounds = 0 if self.view else self._empty_rounds + 1
        rejoin = self._empty_rounds > 0 and (self._empty_rounds - 1) % cfg.rejoin_every == 0
        if target is None:
            return RoundPlan(None, reprobe, [], revive, rejoin)
        others = [e for e in shareable if e is not target]
        picked = rng.sample(others, min(cfg.shuffle_len - 1, len(others)))
        shuffle = ShufflePlan(target.record, [(own, 0.0)] + [(e.record, now - e.born) for e in picked])
        pings = int(cfg.pings_per_round) + (rng.random() < cfg.pings_per_round % 1)
        ping = [e.record for e in rng.sample(others, min(pings, len(others)))]
        return RoundPlan(shuffle, reprobe, ping, revive, rejoin)

    def plan_revive(self, record: PeerRecord, now: float, own: PeerRecord) -> ShufflePlan:
        """A shuffle with a removed peer: the same exchange, aimed at someone outside the view."""
        live = self._shareable()
        picked = self.rng.sample(live, min(self.config.shuffle_len - 1, len(live)))
        return ShufflePlan(record, [(own, 0.0)] + [(e.record, now - e.born) for e in picked])

    def on_shuffle_reply(
        self,
        plan: ShufflePlan,
        received: list[tuple[PeerRecord, float]],
        rtt: float,
        now: float,
        wall: float,
        revive: bool = False,
    ) -> None:
        """Our shuffle was answered: the target is alive; merge, overwriting what we sent.

        The target's own slot is overwritten first (CYCLON moves that pointer: the target now
        holds ours). A revived target (from the graveyard) is taken back into the view instead.
        """
        target = plan.target.peer_id
        victims = [r.peer_id for r, _ in plan.entries[1:]]
        if revive:
            self.stats.revived += 1  # a peer we had removed answers: e.g. a partition healed
            self.merge([(plan.target, 0.0)], now, wall, 0.0, victims, direct=target)
        else:
            self.heard_from(target, now)
            victims.insert(0, target)
        self.merge(received, now, wall, max(rtt, self.config.hop_age_s), victims)
        kept = self.view.get(target)
        if kept is not None:
            kept.due = now  # nothing took its slot: to the back of the shuffle queue

    def on_shuffle_request(
        self, sender: bytes, received: list[tuple[PeerRecord, float]], now: float, wall: float
    ) -> list[tuple[PeerRecord, float]]:
        """Answer a shuffle: l random live entries (not the sender), then merge what came in."""
        if not any(r.peer_id == sender for r, _ in received):
            raise RemoteProtocolError("a shuffle request must carry the caller's own record")
        live = self._shareable(exclude=sender)
        picked = self.rng.sample(live, min(self.config.shuffle_len, len(live)))
        reply = [(e.record, now - e.born) for e in picked]
        self.stats.shuffles_answered += 1
        self.merge(received, now, wall, self.config.hop_age_s, [r.peer_id for r, _ in reply], direct=sender)
        return reply

    def on_join(self, record: PeerRecord, now: float, wall: float) -> list[tuple[PeerRecord, float]]:
        """A joiner called us as its bootstrap: give it the shuffle_len members handed out least
        (the driver adds our own record), take it in, evicting the member handed out most.

        Only shuffle_len, not the whole view: consecutive joiners would otherwise copy nearly the
        same view and skew in-degrees; shuffles fill the rest of the joiner's view."""
        live = self._shareable(exclude=record.peer_id)
        self.rng.shuffle(live)
        live.sort(key=lambda e: e.given)  # least handed-out first (random among equals)
        picked = live[: self.config.shuffle_len]
        for entry in picked:
            entry.given += 1
        reply = [(e.record, now - e.born) for e in picked]
        # The joiner takes the slot of the member handed out most: no entry of a busy
        # bootstrap's view is copied into many more joiners' views than the others.
        victims = [max(picked, key=lambda e: e.given).record.peer_id] if picked else []
        self.stats.joins_answered += 1
        self.merge([(record, 0.0)], now, wall, 0.0, victims, direct=record.peer_id)
        return reply

    def on_join_replies(
        self, replies: Sequence[tuple[bytes, list[tuple[PeerRecord, float]], float]], now: float, wall: float
    ) -> None:
        """Bootstraps answered (peer id, entries, rtt each): take their members, and the
        bootstraps themselves only while we hold fewer than shuffle_len peers. Otherwise every
        joiner would point at the bootstraps: an in-degree hot spot that takes many rounds of
        shuffles to spread out."""
        hop = self.config.hop_age_s
        for bootstrap, received, rtt in replies:
            others = [(r, age) for r, age in received if r.peer_id != bootstrap]
            self.merge(others, now, wall, max(rtt, hop), [])
        for bootstrap, received, _ in replies:
            if len(self.view) >= self.config.shuffle_len:
                break
            own = [(r, age) for r, age in received if r.peer_id == bootstrap]
            self.merge(own, now, wall, 0.0, [], direct=bootstrap)

    # -- liveness --------------------------------------------------------------------------------

    def heard_from(self, peer_id: bytes, now: float, record: PeerRecord | None = None, wall: float = 0.0) -> None:
        """Direct contact with a view member (or a helper reached it): it is alive now."""
        if record is not None and record.peer_id == peer_id:
            self.merge([(record, 0.0)], now, wall, 0.0, [], direct=peer_id)
        entry = self.view.get(peer_id)
        if entry is not None:
            self._alive(peer_id, entry, now)

    def _alive(self, peer_id: bytes, entry: _Entry, heard: float) -> None:
        """Someone heard from the peer at `heard`: news after a doubt or suspicion clears it."""
        if heard > entry.heard_at:
            entry.heard_at = heard
        if entry.suspect_since is not None and heard > entry.suspect_since:
            entry.suspect_since = None
            self.stats.refuted += 1
        if entry.doubted_at is not None and heard > entry.doubted_at:
            entry.doubted_at = None
            self.rumours.pop(peer_id, None)  # it lives: stop passing the rumour on

    def probe_helpers(self, target: bytes) -> list[PeerRecord]:
        """Peers to ask for an indirect probe of `target`: random live view members."""
        live = [e.record for e in self._shareable(exclude=target)]
        return self.rng.sample(live, min(self.config.indirect_probes, len(live)))

    def suspect(self, peer_id: bytes, now: float) -> None:
        """Nobody could reach the peer: stop using it; `tick` removes it after suspicion_s."""
        entry = self.view.get(peer_id)
        if entry is not None and entry.suspect_since is None:
            entry.suspect_since = now
            self.stats.suspected += 1

    def probe_failed(self, peer_id: bytes, now: float) -> None:
        """Our own ping of a doubted or suspected member got no answer."""
        entry = self.view.get(peer_id)
        if entry is not None and entry.doubted_at is not None:
            self.suspect(peer_id, now)  # the partner's report plus our own silence

    def gone(self, now: float) -> list[bytes]:
        """News for partners: our suspects, then our removals and rumours within gone_s, newest first."""
        horizon = now - self.config.gone_s
        out = [pid for pid, e in self.view.items() if e.suspect_since is not None][:MAX_GONE]
        for peer_id in reversed(self.tombstones):
            if self.tombstones[peer_id][1] <= horizon or len(out) == MAX_GONE:
                return out
            out.append(peer_id)  # never a suspect: removal took it out of the view
        suspects = set(out)
        for peer_id in reversed(self.rumours):  # never in tombstones: _bury drops the rumour
            if self.rumours[peer_id] <= horizon or len(out) == MAX_GONE:
                return out
            if peer_id not in suspects:
                out.append(peer_id)
        return out

    def on_gone(self, peer_ids: Sequence[bytes], now: float) -> None:
        """A partner says these peers were removed: doubt the ones we hold, pass the news on."""
        for peer_id in peer_ids[:MAX_GONE]:
            if peer_id == self.self_id or peer_id in self.rumours or peer_id in self.tombstones:
                continue
            entry = self.view.get(peer_id)
            if entry is not None:
                if entry.heard_at >= now:
                    continue  # we heard from it this very moment: the news is wrong
                if entry.suspect_since is None and entry.doubted_at is None:
                    entry.doubted_at = now
                    self.stats.doubted += 1
            self.rumours[peer_id] = now
            if len(self.rumours) > MAX_RUMOURS:
                self.rumours.popitem(last=False)

    def on_leave(self, record: PeerRecord, now: float) -> bool:
        """A signed leave record from its own peer: drop it and refuse its older records."""
        if not record.left:
            raise RemoteProtocolError("a leave announcement must carry a leave record (no addresses)")
        entry = self.view.get(record.peer_id)
        if entry is not None and record.seq < entry.record.seq:
            self.stats.stale += 1
            return False
        tomb = self.tombstones.get(record.peer_id)
        if tomb is not None and tomb[0] >= record.seq:
            return False
        self.view.pop(record.peer_id, None)
        self.graveyard.pop(record.peer_id, None)  # it left on purpose: do not try it again
        self._bury(record.peer_id, record.seq, now)
        self.stats.left += 1
        return True

    # -- merging ---------------------------------------------------------------------------------

    def merge(
        self,
        received: list[tuple[PeerRecord, float]],
        now: float,
        wall: float,
        hop_s: float,
        victims: list[bytes],
        direct: bytes | None = None,
    ) -> None:
        """CYCLON's merge: update known peers, fill empty slots, then overwrite `victims`.

        `victims` (consumed in order) are entries we just gave away, so overwriting them loses
        nothing. `direct` is the peer we are talking to: its own record is fresh (heard now) and
        proves it alive even if we had removed it. Relayed entries are `hop_s` older than they say.
        """
        cfg = self.config
        view = self.view
        stats = self.stats
        latest_expiry = wall + cfg.record_ttl_s + cfg.max_clock_skew_s
        oldest = now - cfg.max_age_s
        for record, age in received:
            peer_id = record.peer_id
            if peer_id == self.self_id:
                self.own_seq_seen = max(self.own_seq_seen, record.seq)
                continue
            if record.expires <= wall:
                stats.stale += 1
                continue
            if record.expires > latest_expiry:
                stats.forged += 1  # no honest peer signs a record that far ahead
                continue
            if not record.addresses:  # a leave record
                self.on_leave(record, now)
                continue
            heard = now if peer_id == direct else now - age - hop_s
            entry = view.get(peer_id)
            if entry is not None:
                if record.seq != entry.record.seq:
                    if record.seq < entry.record.seq:
                        stats.stale += 1
                        continue
                    entry.record = record
                if heard > entry.heard_at:
                    self._alive(peer_id, entry, heard)
                continue
            if heard < oldest:
                stats.too_old += 1
                continue
            tomb = self.tombstones.get(peer_id)
            if tomb is not None:
                if record.seq <= tomb[0] and heard <= tomb[1]:
                    stats.buried += 1  # nothing new since we removed it
                    continue
                del self.tombstones[peer_id]
            if len(view) >= cfg.view_size:
                while victims:
                    victim = victims.pop(0)
                    if victim in view:
                        del view[victim]
                        break
                else:
                    continue  # view full and nothing of ours to overwrite: drop it
            if self.graveyard:
                self.graveyard.pop(peer_id, None)
            entry = view[peer_id] = _Entry(record, heard)
            if self.rumours:
                rumour = self.rumours.get(peer_id)
                if rumour is not None and heard <= rumour:
                    entry.doubted_at = now  # reported gone and no news since: check before relaying
                    stats.doubted += 1

    # -- removal ---------------------------------------------------------------------------------

    def _remove(self, peer_id: bytes, now: float, bury: bool) -> None:
        entry = self.view.pop(peer_id)
        if bury:
            self._bury(peer_id, entry.record.seq, now)
        if self.config.graveyard_size:
            self.graveyard[peer_id] = (entry.record, now)
            self.graveyard.move_to_end(peer_id)
            while len(self.graveyard) > self.config.graveyard_size:
                self.graveyard.popitem(last=False)

    def _bury(self, peer_id: bytes, seq: int, now: float) -> None:
        self.rumours.pop(peer_id, None)
        self.tombstones[peer_id] = (seq, now)
        self.tombstones.move_to_end(peer_id)
        while len(self.tombstones) > self.config.max_tombstones:
            self.tombstones.popitem(last=False)

    def _forget_old(self, now: float) -> None:
        horizon = now - self.config.tombstone_s
        for table in (self.tombstones, self.graveyard):
            while table:
                first = next(iter(table.values()))
                if first[1] > horizon:
                    break
                table.popitem(last=False)
        horizon = now - self.config.gone_s
        while self.rumours and next(iter(self.rumours.values())) <= horizon:
            self.rumours.popitem(last=False)
