"""Matchmaking for `group_average`: which peers average together for one key. Sans-IO.

Peers that call `group_average(key)` at about the same time must agree on one group and its
order, with no coordinator and with peers arriving, leaving and dying at any moment. The rule:
**the group's leader is the lowest peer id among the peers present for the key**.

How a node learns who is present: on entry it sends `avg.hello` to its live peers; every answer
"present" and every hello received adds a peer to `present` (two nodes in the same key at
overlapping times always learn of each other: the later one's hello reaches the earlier one).

What a node does (`Matchmaker`, one per key on a node; `gossip.collectives` pumps it):
- GATHERING: while no lower present peer is known, the node is a leader candidate and accepts
  `avg.join` long-polls from higher peers. When it learns of a lower peer it moves to FOLLOWING
  that peer and answers its own pending joiners with a redirect to it.
- FOLLOWING: it long-polls `avg.join` at its leader. The answer is the sealed group, a redirect
  to a lower leader, or a refusal (absent, full, sealed, mismatch, closed), after which the node
  excludes that leader and gathers again.
- The leader seals the group (SEALED) when every live peer it knew of at entry has joined, when
  the group is full (`max_group`), or when the window has passed since the earliest member's
  entry. The sealed group is every member sorted by peer id, a random group id, and the time
  budget left to the member with the least time.

Termination: redirects only point to lower ids and each failure grows the excluded set, so every
node ends, within its deadline, sealed in a group (possibly of one).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

GROUP = "group"  # the sealed group
WAIT = "wait"  # accepted as a follower; the answer comes when the group is sealed
REDIRECT = "redirect"  # join `leader` instead
REFUSE = "refuse"  # with a reason below

ABSENT = "absent"  # not in this key
FULL = "full"
SEALED = "sealed"
MISMATCH = "mismatch"  # different tensor shapes: cannot average together
CLOSED = "closed"  # the session ended (deadline or cancellation)
JOIN_REASONS = frozenset({ABSENT, FULL, SEALED, MISMATCH, CLOSED})


@dataclass(frozen=True, order=True)
class Member:
    """One member of a group: the id it authenticated with and where to reach it."""

    peer_id: bytes
    address: str


@dataclass(frozen=True)
class JoinAnswer:
    """The answer to a join: what the joiner does next."""

    kind: str  # GROUP, WAIT, REDIRECT or REFUSE
    reason: str = ""  # for REFUSE: one of JOIN_REASONS
    leader: Member | None = None  # for REDIRECT
    group: tuple[Member, ...] = ()  # for GROUP: sorted by peer id, leader included
    group_id: int = 0  # for GROUP: names this round of this key on the wire
    budget: float = 0.0  # for GROUP: seconds left for the all-reduce


class Role(enum.Enum):
    GATHERING = "gathering"
    FOLLOWING = "following"
    SEALED = "sealed"
    CLOSED = "closed"


@dataclass
class _Follower:
    address: str
    entered: float  # when it entered, on our clock (now - the time it says it has waited)
    deadline: float  # when it gives up, on our clock


@dataclass
class Matchmaker:
    """One node's matchmaking state for one key. Times are on the node's own clock."""

    me: Member
    fingerprint: bytes  # layout of the tensors; only equal layouts average together
    now: float  # when we entered
    deadline: float  # when our group_average returns, whatever happens
    window: float  # seconds from the earliest member's entry until the leader seals
    max_group: int  # members at most, leader included
    expected: frozenset[bytes]  # live peers when we entered: once all joined, seal at once
    regroup: float = 0.0  # s a node that lost its leader keeps gathering, so the others can rejoin it
    role: Role = Role.GATHERING
    present: dict[bytes, str] = field(default_factory=dict)  # peer id -> address, in this key
    excluded: set[bytes] = field(default_factory=set)  # leaders that refused or failed us
    followers: dict[bytes, _Follower] = field(default_factory=dict)
    answers: dict[bytes, JoinAnswer] = field(default_factory=dict)  # final answers to joiners
    leader: Member | None = None  # while FOLLOWING
    result: JoinAnswer | None = None  # once SEALED: our group
    regroup_until: float = 0.0  # no seal before this (set when a leader failed us)

    def __post_init__(self) -> None:
        if not self.window > 0:
            raise ValueError("window must be > 0 seconds")
        if self.max_group < 1:
            raise ValueError("max_group must be >= 1")
        self.entered = self.now

    # -- decisions ----------------------------------------------------------------------------

    @property
    def seal_at(self) -> float:
        earliest = min([self.entered] + [f.entered for f in self.followers.values()])
        return min(max(earliest + self.window, self.regroup_until), self.deadline)

    def target(self) -> Member | None:
        """The lower peer we should follow, if any (only while gathering)."""
        if self.role is not Role.GATHERING:
            return None
        lower = [p for p in self.present if p < self.me.peer_id and p not in self.excluded]
        if not lower:
            return None
        best = min(lower)
        return Member(best, self.present[best])

    def should_seal(self, now: float) -> bool:
        if self.role is not Role.GATHERING or self.target() is not None:
            return False
        if 1 + len(self.followers) >= self.max_group:
            return True
        if self.expected and self.expected <= self.followers.keys():
            return True
        return now >= self.seal_at

    # -- events -------------------------------------------------------------------------------

    def saw(self, peer_id: bytes, address: str) -> None:
        """`peer_id` is in this key (it said hello, or answered ours with "present")."""
        if peer_id != self.me.peer_id:
            self.present[peer_id] = address

    def on_join(
        self, peer: Member, fingerprint: bytes, waited: float, remaining: float, now: float
    ) -> JoinAnswer:
        if fingerprint != self.fingerprint:
            return JoinAnswer(REFUSE, MISMATCH)
        if self.role is Role.SEALED:
            assert self.result is not None
            if peer in self.result.group:  # its first answer was lost: same answer again
                return self.result
            return JoinAnswer(REFUSE, SEALED)
        if self.role is Role.CLOSED:
            return JoinAnswer(REFUSE, CLOSED)
        self.saw(peer.peer_id, peer.address)
        if self.role is Role.FOLLOWING:
            assert self.leader is not None
            return JoinAnswer(REDIRECT, leader=self.leader)
        if peer.peer_id < self.me.peer_id:
            # It is lower than us yet joins us (it must have excluded every lower peer it knew):
            # we are not its leader. We have now seen it, so we follow it instead.
            return JoinAnswer(REFUSE, ABSENT)
        lower = self.target()
        if lower is not None:
            return JoinAnswer(REDIRECT, leader=lower)
        if peer.peer_id not in self.followers and 1 + len(self.followers) >= self.max_group:
            return JoinAnswer(REFUSE, FULL)
        self.answers.pop(peer.peer_id, None)
        self.followers[peer.peer_id] = _Follower(peer.address, now - waited, now + remaining)
        return JoinAnswer(WAIT)

    def follow(self, leader: Member) -> None:
        """Start following `leader`: our own joiners are sent on to it."""
        self.role, self.leader = Role.FOLLOWING, leader
        for pid in self.followers:
            self.answers[pid] = JoinAnswer(REDIRECT, leader=leader)
        self.followers.clear()

    def join_answered(self, leader: Member, answer: JoinAnswer | None, now: float) -> None:
        """Our join at `leader` was answered (None: it failed or timed out).

        After a failure we gather again for at least `regroup` seconds even if our window has
        passed: the leader's other followers failed at about the same time and look for the
        next lowest peer, which may be us.
        """
        if self.role is not Role.FOLLOWING or self.leader != leader:
            return
        if answer is not None and answer.kind == GROUP:
            if any(m.peer_id == self.me.peer_id for m in answer.group):
                self.role, self.result = Role.SEALED, answer
                return
            answer = None  # a group without us is no answer
        self.role, self.leader = Role.GATHERING, None
        if (
            answer is not None
            and answer.kind == REDIRECT
            and answer.leader is not None
            and answer.leader.peer_id < leader.peer_id
            and answer.leader.peer_id not in self.excluded
        ):
            self.saw(answer.leader.peer_id, answer.leader.address)
            return
        self.excluded.add(leader.peer_id)
        self.regroup_until = now + self.regroup

    def seal(self, group_id: int, now: float) -> JoinAnswer:
        """Fix the group (we are its leader) and answer every joiner with it."""
        members = [self.me] + [Member(p, f.address) for p, f in self.followers.items()]
        deadlines = [self.deadline] + [f.deadline for f in self.followers.values()]
        budget = max(0.0, min(deadlines) - now)
        self.result = JoinAnswer(GROUP, group=tuple(sorted(members)), group_id=group_id, budget=budget)
        self.role = Role.SEALED
        for pid in self.followers:
            self.answers[pid] = self.result
        return self.result

    def withdraw(self, peer: bytes) -> JoinAnswer:
        """A joiner's long poll ran out before any answer: it is no longer counted on."""
        self.followers.pop(peer, None)
        return JoinAnswer(REFUSE, CLOSED)

    def close(self) -> None:
        """The session ends: joiners still waiting are refused."""
        if self.role is not Role.SEALED:
            for pid in self.followers:
                self.answers.setdefault(pid, JoinAnswer(REFUSE, CLOSED))
            self.role = Role.CLOSED
