"""Pairing for `pair_exchange`: who swaps payloads with whom in a round, without a coordinator.

A sans-IO core (no trio): `PairingCore` is fed events (a proposal arrived, our proposal was
answered, a timer passed) and answers with decisions; `gossip.collectives` pumps it. All of the
state machine lives here, and the core does not know whether it plays initiator or acceptor
until a proposal settles it.

The handshake for one round (PROTOCOL.md, "Collectives"), initiator I and acceptor A:

    I -> A  pair.propose {round}          A accepts only if it is in this round and unpaired
    I -> A  pair.swap    {round, body}    A stores I's payload, answers with its own
    I -> A  pair.commit  {round}          A marks the pair final; only now does A use I's payload
                                          and only on the reply does I use A's

Both sides use the payloads only after the commit (a two-phase commit; ALGORITHMS.md §3 asks
for all-or-nothing): if anything fails before the commit reaches A, neither side uses anything.
The commit is idempotent (A remembers recent rounds), so I retries it until its deadline. The one
outcome no protocol over a lossy network can exclude (two generals) is A committing while every
reply to I is lost until I's deadline: I reports it in `PairingStats.uncertain`.

Conflicts resolve deterministically:
- A node holds at most one partner per round: a proposal reaching a node that is proposing to,
  holding for, or committed with someone else is refused ("busy" / "paired").
- Crossing proposals (I proposes to A while A proposes to I): the proposal from the lower peer
  id wins. The higher node accepts it; the lower node refuses the other one with "crossed".
- An acceptor waits for the initiator's next message at most `hold_timeout`, then is open again;
  a commit arriving after that is refused, so the initiator does not use the payload either.

A random partner, not the next to arrive: the peer we propose to is our *target*. If it has not
reached the round yet ("not_ready") we keep proposing to it for up to `patience` seconds
(accepting anyone's proposal meanwhile) instead of moving on at once. Moving on at once pairs
nodes in order of arrival: the first two to reach a round pair, then the next two; and since a
pair resumes training at the same moment, it reaches the next round together and pairs again,
so a swarm running in step splits into pairs that never mix. Any other refusal (busy, paired,
crossed), or patience running out, makes us pick another target.

Nobody left: once every live peer has told us it already paired this round, we stop at once
(no partner can come) instead of waiting out the deadline. Waiting it out made the odd node of
a 3-node swarm fall a whole timeout behind; the other two, reaching the next round first, paired
again before it arrived, and it never paired again.
"""

from __future__ import annotations

import enum
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from gossip.errors import LocalProtocolError

# Reasons a node gives for refusing a pairing message (the `reason` field on the wire).
ACCEPTED = "accepted"
NOT_READY = "not_ready"  # not in pair_exchange for this round (not started yet, or finished)
BUSY = "busy"  # proposing to, holding for or committing with another peer
CROSSED = "crossed"  # we proposed to you too, and our lower id wins: wait for our proposal
PAIRED = "paired"  # already paired for this round
INVALID = "invalid"  # the payload was not a msgpack map (or had bad buffers)
REASONS = frozenset({ACCEPTED, NOT_READY, BUSY, CROSSED, PAIRED, INVALID})

REMEMBERED_ROUNDS = 64  # finished rounds kept to answer repeated commits (a bound, not a tunable)


class Phase(enum.Enum):
    IDLE = "idle"  # not in any round
    OPEN = "open"  # in a round, unpaired, not proposing: accepts proposals
    PROPOSING = "proposing"  # our proposal to `partner` is in flight
    COMMITTING = "committing"  # `partner` accepted our proposal; we swap and commit (initiator)
    HOLDING = "holding"  # we accepted `partner`'s proposal; waiting for its swap/commit (acceptor)
    PAIRED = "paired"  # committed: the round's outcome is final


@dataclass(frozen=True)
class Payload:
    """What one side sends: its msgpack body (packed) and raw buffers."""

    packed_body: bytes
    buffers: Sequence[bytes | bytearray | memoryview] = ()
    body: dict | None = None  # the unpacked body, for a payload received from a peer


@dataclass
class PairingStats:
    """Counters for metrics."""

    paired: int = 0  # rounds that ended with a committed partner
    unpaired: int = 0  # rounds that ended with no partner (timeout)
    refused: int = 0  # proposals of ours that were refused
    uncertain: int = 0  # rounds where our commit got no reply: the partner may have used our payload
    expired_holds: int = 0  # partners that accepted nothing further within hold_timeout
    by_reason: dict[str, int] = field(default_factory=dict)  # refusals we received, by reason


@dataclass(frozen=True)
class Decision:
    """The answer to an incoming pairing message."""

    ok: bool
    reason: str

    @staticmethod
    def accept() -> Decision:
        return Decision(True, ACCEPTED)

    @staticmethod
    def refuse(reason: str) -> Decision:
        return Decision(False, reason)


def choose_partner(
    candidates: Sequence[bytes], me: bytes, refused: set[bytes], rng: random.Random
) -> bytes | None:
    """A uniformly random candidate other than us that has not refused us this round.

    When every candidate has refused, the refusals are forgotten (they were about a moment that
    has passed: a busy peer may be open again) and the choice is made among all candidates.
    """
    pool = sorted({c for c in candidates if c != me})
    if not pool:
        return None
    fresh = [c for c in pool if c not in refused]
    if not fresh:
        refused.clear()
        fresh = pool
    return rng.choice(fresh)


class PairingCore:
    """The pairing state of one node. One round at a time; every method is a plain call."""

    def __init__(self, me: bytes, hold_timeout: float) -> None:
        if not me:
            raise ValueError("me must be this node's peer id (non-empty bytes)")
        if not hold_timeout > 0:
            raise ValueError("hold_timeout must be > 0 seconds (how long an acceptor waits)")
        self.me = me
        self.hold_timeout = hold_timeout
        self.stats = PairingStats()
        self.round: int | None = None
        self.phase = Phase.IDLE
        self.partner: bytes | None = None
        self.ours: Payload | None = None  # our payload for this round
        self.theirs: Payload | None = None  # the partner's payload, once swapped
        self.hold_until = 0.0  # acceptor: when we give up on `partner`
        self.patience = 0.0  # seconds we wait for a target that has not reached the round yet
        self.target: bytes | None = None  # the peer we propose to until it pairs or refuses
        self.target_until = 0.0  # when we stop waiting for `target`
        self.refused: set[bytes] = set()  # peers that refused us this round
        self.finished: set[bytes] = set()  # peers that told us they already paired this round
        self._history: OrderedDict[int, bytes] = OrderedDict()  # round -> committed partner

    # -- our own round ------------------------------------------------------------------------

    def start(self, round: int, ours: Payload, patience: float = 0.0) -> None:
        """Enter `round`; `patience`: how long we wait for a target not yet in the round."""
        if not patience >= 0:
            raise ValueError(f"patience must be >= 0 seconds, got {patience!r}")
        if self.phase is not Phase.IDLE:
            raise LocalProtocolError(f"pair_exchange for round {self.round} is still running")
        if round in self._history:
            raise LocalProtocolError(f"round {round} was already paired; use a new round number")
        self.round, self.phase, self.ours = round, Phase.OPEN, ours
        self.partner, self.theirs = None, None
        self.patience, self.target = patience, None
        self.refused, self.finished = set(), set()

    def finish(self) -> tuple[bytes, Payload] | None:
        """End the round: the committed partner and its payload, or None. Back to IDLE."""
        result = None
        if self.phase is Phase.PAIRED:
            assert self.partner is not None and self.theirs is not None
            result = (self.partner, self.theirs)
            self.stats.paired += 1
        else:
            self.stats.unpaired += 1
        self.round, self.phase, self.partner, self.target = None, Phase.IDLE, None, None
        self.ours = self.theirs = None
        self.refused, self.finished = set(), set()
        return result

    @property
    def done(self) -> bool:
        return self.phase is Phase.PAIRED

    # -- initiator side -----------------------------------------------------------------------

    def nobody_left(self, live: Iterable[bytes]) -> bool:
        """True when we are open and every live peer already paired this round: give up now."""
        others = [p for p in live if p != self.me]
        return self.phase is Phase.OPEN and bool(others) and all(p in self.finished for p in others)

    def waiting_for(self, now: float) -> bytes | None:
        """The target we keep proposing to (it had not reached the round), or None: choose one."""
        if self.target is not None and now < self.target_until:
            return self.target
        return None

    def begin_proposal(self, peer: bytes, now: float = 0.0) -> bool:
        """Start proposing to `peer`; False if we are no longer open (someone paired with us)."""
        if self.phase is not Phase.OPEN or peer == self.me:
            return False
        if peer != self.target:  # a new target: our patience with it starts now
            self.target, self.target_until = peer, now + self.patience
        self.phase, self.partner = Phase.PROPOSING, peer
        return True

    def proposal_answered(self, peer: bytes, decision: Decision | None, now: float = 0.0) -> bool:
        """Our proposal to `peer` got `decision` (None: no answer). True if we go on to swap."""
        if self.phase is not Phase.PROPOSING or self.partner != peer:
            return False  # a crossing proposal made us an acceptor meanwhile: ignore
        if decision is not None and decision.ok:
            self.phase = Phase.COMMITTING
            return True
        reason = decision.reason if decision is not None else "no_answer"
        if reason == NOT_READY and self.target == peer and now < self.target_until:
            self._count_refusal(reason)  # not in the round yet: we wait for it (see the module doc)
            self.phase, self.partner = Phase.OPEN, None
            return False
        self._refused_by(peer, reason)
        return False

    def swap_answered(self, peer: bytes, decision: Decision | None, theirs: Payload | None) -> bool:
        """The acceptor answered our swap. True if we go on to commit."""
        if self.phase is not Phase.COMMITTING or self.partner != peer:
            return False
        if decision is not None and decision.ok and theirs is not None:
            self.theirs = theirs
            return True
        self._refused_by(peer, decision.reason if decision is not None else "no_answer")
        return False

    def commit_answered(self, peer: bytes, decision: Decision) -> None:
        """The acceptor answered our commit: ok means both sides now use the payloads."""
        if self.phase is not Phase.COMMITTING or self.partner != peer:
            return
        if decision.ok:
            self._commit()
        else:  # the acceptor gave up on us before the commit: nobody uses anything
            self._refused_by(peer, decision.reason)

    def give_up(self, peer: bytes, reason: str) -> None:
        """Drop a partner before committing (e.g. too little time left for a commit round trip).

        Safe at any point before the commit is sent: the acceptor's hold expires and nobody
        uses anything.
        """
        if self.phase in (Phase.PROPOSING, Phase.COMMITTING) and self.partner == peer:
            self._refused_by(peer, reason)

    def commit_unanswered(self) -> None:
        """Our commit never got a reply before the deadline: the partner may have committed."""
        self.stats.uncertain += 1

    def _count_refusal(self, reason: str) -> None:
        self.stats.refused += 1
        self.stats.by_reason[reason] = self.stats.by_reason.get(reason, 0) + 1

    def _refused_by(self, peer: bytes, reason: str) -> None:
        self._count_refusal(reason)
        self.refused.add(peer)
        if reason == PAIRED:
            self.finished.add(peer)
        if self.target == peer:
            self.target = None
        self.phase, self.partner, self.theirs = Phase.OPEN, None, None

    # -- acceptor side ------------------------------------------------------------------------

    def on_propose(self, peer: bytes, round: int, now: float) -> Decision:
        if self.phase is Phase.IDLE or round != self.round or peer == self.me:
            return Decision.refuse(PAIRED if round in self._history else NOT_READY)
        if self.phase is Phase.PAIRED:
            return Decision.refuse(PAIRED)
        if self.phase is Phase.HOLDING:
            if self.partner == peer:  # a repeated proposal (its first answer was lost)
                self.hold_until = now + self.hold_timeout
                return Decision.accept()
            return Decision.refuse(BUSY)
        if self.phase is Phase.PROPOSING and self.partner == peer:
            if peer < self.me:  # crossing proposals: the lower id's proposal wins
                return self._hold(peer, now)
            return Decision.refuse(CROSSED)
        if self.phase is Phase.OPEN:
            return self._hold(peer, now)
        return Decision.refuse(BUSY)

    def on_swap(self, peer: bytes, round: int, theirs: Payload, now: float) -> Decision:
        """The initiator sent its payload; on accept the pump answers with `self.ours`."""
        if self.phase is not Phase.HOLDING or self.partner != peer or round != self.round:
            return Decision.refuse(self._why_not(peer, round))
        self.theirs = theirs
        self.hold_until = now + self.hold_timeout
        return Decision.accept()

    def on_commit(self, peer: bytes, round: int) -> Decision:
        if self._history.get(round) == peer:
            return Decision.accept()  # idempotent: the initiator retries after a lost reply
        if self.phase is not Phase.HOLDING or self.partner != peer or round != self.round:
            return Decision.refuse(self._why_not(peer, round))
        if self.theirs is None:
            return Decision.refuse(NOT_READY)  # a commit before any swap: nothing to commit
        self._commit()
        return Decision.accept()

    def expire(self, now: float) -> bool:
        """Give up on a partner that went quiet; True if a hold was dropped."""
        if self.phase is Phase.HOLDING and now >= self.hold_until:
            self.stats.expired_holds += 1
            self.phase, self.partner, self.theirs = Phase.OPEN, None, None
            return True
        return False

    def _hold(self, peer: bytes, now: float) -> Decision:
        self.phase, self.partner, self.theirs = Phase.HOLDING, peer, None
        self.hold_until = now + self.hold_timeout
        return Decision.accept()

    def _commit(self) -> None:
        assert self.round is not None and self.partner is not None
        self.phase = Phase.PAIRED
        self._history[self.round] = self.partner
        while len(self._history) > REMEMBERED_ROUNDS:
            self._history.popitem(last=False)

    def _why_not(self, peer: bytes, round: int) -> str:
        if round in self._history or (round == self.round and self.phase is Phase.PAIRED):
            return PAIRED
        if self.phase is Phase.IDLE or round != self.round:
            return NOT_READY
        return BUSY
