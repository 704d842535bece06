"""Membership tuning (`MembershipConfig`) and counters (`MembershipStats`)."""

from __future__ import annotations

from dataclasses import dataclass, fields

MAX_ENTRIES = 64  # hard cap on records in one membership message (view_size + 1 must fit)


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
