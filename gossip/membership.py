"""Swarm membership, sans-IO: the partial view, shuffles, suspicion and removal as plain data.

The view follows CYCLON's enhanced shuffle (Voulgaris, Gavidia, van Steen, "CYCLON: Inexpensive
Membership Management for Unstructured P2P Overlays", J. Netw. Syst. Manage. 2005, section 3.2):
every round a node swaps `shuffle_len` entries with the peer it has not heard from for longest;
received entries fill empty slots first, then the slots of entries it just sent away. Views
stay random samples of the swarm with a narrow in-degree spread, so sampling from one's view is
uniform over the swarm.

Failure detection adds SWIM's machinery (Das, Gupta, Motivala, DSN 2002, sections 3-4): a shuffle
that gets no answer is a failed direct probe; `indirect_probes` other peers are asked to ping the
target; if none can, the target is *suspected* (no longer sampled or shuffled out) and removed
after `suspicion_s` unless it shows a sign of life. Removed peers are tombstoned, so their old
records cannot be gossiped back in. News of a removal spreads as a rumour on shuffles ("gone"):
a peer that hears it only *doubts* that member (still samples it, stops relaying it) and pings
it next round itself; only its own failed ping makes it a suspect. A liar costs a few pings.

Ages make the bound. Each entry carries how long ago anyone heard from its peer directly; relays
pass ages on (plus a per-hop allowance for transit), so a dead peer's entries only grow older,
everywhere. An entry older than `max_age_s` is dropped on receipt and at every round: a peer
that died at time t is out of every view by t + max_age_s + round_s, whatever else happens.

This module does no I/O and never imports trio: `MembershipCore` is fed records, ages and times
(`now`: a monotonic clock; `wall`: unix seconds, for record expiry) and returns decisions. The
trio pump is `gossip.membership_driver.Membership`.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Sequence

from gossip import messages
from gossip.errors import RemoteProtocolError
from gossip.messages import Bool, Bytes, Int, List, Map, Nullable, Str
from gossip.peer_records import MAX_ADDRESS_LEN, MAX_RECORD_BYTES, SIGNATURE_LEN, PeerRecord, RecordError, decode_record

MAX_ENTRIES = 64  # hard cap on records in one membership message (view_size + 1 must fit)
MAX_GONE = 16  # peer ids a shuffle reports as recently removed
MAX_RUMOURS = 64  # removals heard from others that we pass on
MAX_AGE_MS = (1 << 32) - 1

_RECORD = Bytes(min_len=SIGNATURE_LEN + 1, max_len=MAX_RECORD_BYTES)
_ENTRIES = {"records": List(_RECORD, MAX_ENTRIES), "ages": List(Int(0, MAX_AGE_MS), MAX_ENTRIES)}
_SHUFFLE = Map({**_ENTRIES, "gone": List(Bytes(min_len=32, max_len=32), MAX_GONE)})

# Message types (PROTOCOL.md, "Membership"). Entries travel as two parallel arrays: signed record
# bytes and their ages in milliseconds; the first record of a shuffle request is the caller's own.
# "gone" lists peers the sender removed or heard were removed lately: the receiver only doubts
# them and probes them itself, so a lying sender costs a few pings, never a live peer.
SHUFFLE = messages.define("membership.shuffle", 1, _SHUFFLE, _SHUFFLE)
JOIN = messages.define("membership.join", 1, Map({"record": _RECORD}), Map(_ENTRIES))
PING = messages.define(
    "membership.ping",
    1,
    Map({"known": Int(0, (1 << 63) - 1)}),  # the callee's seq the caller holds (0: none)
    Map({"record": Nullable(_RECORD)}),  # the callee's record if newer than `known`
)
PROBE = messages.define(
    "membership.probe",
    1,
    Map({"target": Bytes(min_len=32, max_len=32), "address": Str(MAX_ADDRESS_LEN)}),
    Map({"alive": Bool()}),
)
LEAVE = messages.define("membership.leave", 1, Map({"record": _RECORD}), Map({}))


@dataclass(frozen=True)
class MembershipConfig:
    """Membership tuning. Defaults suit an internet swarm with ~1 s rounds."""

    view_size: int = 20  # peers in the partial view (CYCLON's c); average in-degree is the same
    shuffle_len: int = 8  # records swapped per shuffle (CYCLON's l), 1..view_size
    round_s: float = 1.0  # seconds between our shuffles
    call_timeout_s: float = 1.0  # deadline of a shuffle or join call
    probe_timeout_s: float = 0.5  # deadline of one ping; an indirect probe gets 3x (two hops)
    sample_age_s: float = 4.0  # sample() draws from pointers younger than this (fair by in-degree)
    pings_per_round: float = 0.25  # random members pinged per round besides the shuffle (SWIM's
    # probe); a fraction pings on that share of rounds
    indirect_probes: int = 3  # peers asked to ping a peer we could not reach (SWIM's k)
    suspicion_s: float = 3.0  # a suspect without a sign of life for this long is removed
    max_age_s: float = 40.0  # entries nobody heard from for this long are dropped (the dead-peer bound)
    gone_s: float = 10.0  # how long we pass on news that a peer was removed
    hop_age_s: float = 0.1  # age added per relay hop: an upper bound on one-way delay
    record_ttl_s: int = 3600  # lifetime of our signed record; re-signed with half of it left
    max_clock_skew_s: int = 300  # records expiring beyond now + ttl + this are refused as forged
    tombstone_s: float = 120.0  # how long a removed peer's old records stay refused
    max_tombstones: int = 256  # bound on remembered removals (oldest forgotten first)
    graveyard_size: int = 32  # removed peers kept to re-try, so a healed partition re-merges
    revive_every: int = 4  # rounds between re-tries of one removed peer
    rejoin_every: int = 5  # rounds between bootstrap attempts while our view is empty
    max_bootstrap: int = 8  # bootstrap addresses called at once when joining
    leave_timeout_s: float = 1.0  # the leave announcement never takes longer than this
    max_inflight_probes: int = 8  # indirect probes we run for others at once

    def __post_init__(self) -> None:
        if not 1 <= self.view_size < MAX_ENTRIES:
            raise ValueError(f"view_size must be in [1, {MAX_ENTRIES - 1}]")
        if not 1 <= self.shuffle_len <= self.view_size:
            raise ValueError("shuffle_len must be in [1, view_size]")
        for name in ("round_s", "call_timeout_s", "probe_timeout_s", "suspicion_s", "max_age_s",
                     "tombstone_s", "leave_timeout_s", "gone_s", "sample_age_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds")
        if self.hop_age_s < 0:
            raise ValueError("hop_age_s must be >= 0 seconds")
        if self.max_age_s < 1.5 * self.view_size * self.round_s:
            # A live peer's entries are refreshed about once per view_size rounds (CYCLON).
            raise ValueError("max_age_s must be >= 1.5 * view_size * round_s, or live peers age out")
        if type(self.record_ttl_s) is not int or self.record_ttl_s < 60:
            raise ValueError("record_ttl_s must be an int >= 60 seconds")
        for name in ("pings_per_round", "indirect_probes", "max_clock_skew_s", "max_tombstones",
                     "graveyard_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("revive_every", "rejoin_every", "max_bootstrap", "max_inflight_probes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


@dataclass
class MembershipStats:
    """Counters. Ignored input is counted by kind, never raised past the handler."""

    rounds: int = 0  # rounds run
    shuffles: int = 0  # our shuffles that got an answer
    shuffle_failures: int = 0  # our shuffles that did not (each starts an indirect check)
    shuffles_answered: int = 0  # shuffles of others we answered
    joins_answered: int = 0  # joiners we answered as a bootstrap
    join_failures: int = 0  # bootstrap calls of ours that failed
    forged: int = 0  # records with a bad signature, encoding or bounds
    stale: int = 0  # records older than what we hold, or expired
    oversized: int = 0  # messages with more entries than the protocol allows us
    buried: int = 0  # records of peers we removed, without news since: refused
    too_old: int = 0  # entries nobody heard from within max_age_s: refused
    indirect_probes: int = 0  # helpers we asked to ping a peer for us
    probes_answered: int = 0  # pings we ran for others
    doubted: int = 0  # members reported gone by a partner, to be pinged by us
    suspected: int = 0  # peers we started to suspect (no direct or indirect probe reached them)
    refuted: int = 0  # suspects that showed a sign of life in time
    removed: int = 0  # suspects removed as dead
    aged_out: int = 0  # view entries dropped for age
    left: int = 0  # leave announcements accepted
    revived: int = 0  # removed peers that answered again (a healed partition)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


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


def encode_entries(entries: Sequence[tuple[PeerRecord, float]]) -> dict:
    """The wire body of a list of (record, age seconds)."""
    return {
        "records": [r.blob for r, _ in entries],
        "ages": [min(MAX_AGE_MS, max(0, int(age * 1000))) for _, age in entries],
    }


def decode_entries(body: dict, limit: int, stats: MembershipStats) -> list[tuple[PeerRecord, float]]:
    """Records and ages from a checked body. Forged records are skipped and counted; more
    than `limit` entries is an oversized message: counted and refused whole."""
    blobs, ages = body["records"], body["ages"]
    if len(blobs) != len(ages):
        raise RemoteProtocolError(f"{len(blobs)} records but {len(ages)} ages")
    if len(blobs) > limit:
        stats.oversized += 1
        raise RemoteProtocolError(f"{len(blobs)} records, at most {limit} allowed")
    out = []
    for blob, age in zip(blobs, ages):
        try:
            out.append((decode_record(blob), age / 1000.0))
        except RecordError:
            stats.forged += 1
    return out


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
