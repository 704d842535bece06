"""The sans-IO pairing core: decisions for crossing proposals, holds, commits and refusals."""

import random

import pytest

from gossip.errors import LocalProtocolError
from gossip.pairing import (
    BUSY,
    CROSSED,
    NOT_READY,
    PAIRED,
    REMEMBERED_ROUNDS,
    Decision,
    PairingCore,
    Payload,
    Phase,
    choose_partner,
)

A, B, C = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
HOLD = 2.0


def core(me, round=7):
    c = PairingCore(me, hold_timeout=HOLD)
    c.start(round, Payload(b"\x80" + me[:1], [me[:4]]))
    return c


def payload_of(c):
    return Payload(c.ours.packed_body, c.ours.buffers, {})


def run_to_commit(initiator, acceptor, round=7, now=0.0):
    """Drive the swap and commit between two cores that already agreed on the proposal."""
    d = acceptor.on_swap(initiator.me, round, payload_of(initiator), now)
    assert d == Decision.accept()
    assert initiator.swap_answered(acceptor.me, d, payload_of(acceptor)) is True
    d = acceptor.on_commit(initiator.me, round)
    initiator.commit_answered(acceptor.me, d)
    return d


@pytest.mark.parametrize("a_first", [True, False])
def test_crossing_proposals_resolve_to_the_lower_id_as_initiator(a_first):
    a, b = core(A), core(B)
    assert a.begin_proposal(B) and b.begin_proposal(A)
    # The proposals cross; whichever arrives first, the outcome is the same.
    if a_first:
        at_b = b.on_propose(A, 7, 0.0)
        at_a = a.on_propose(B, 7, 0.0)
    else:
        at_a = a.on_propose(B, 7, 0.0)
        at_b = b.on_propose(A, 7, 0.0)
    assert at_a == Decision.refuse(CROSSED)  # A (lower) refuses B's proposal...
    assert at_b == Decision.accept()  # ...and B (higher) accepts A's
    assert b.phase is Phase.HOLDING and b.partner == A
    assert b.proposal_answered(A, at_a) is False  # B's own proposal is moot: it is holding for A
    assert b.phase is Phase.HOLDING
    assert a.proposal_answered(B, at_b) is True
    assert a.phase is Phase.COMMITTING
    assert run_to_commit(a, b) == Decision.accept()
    got_a, got_b = a.finish(), b.finish()
    assert got_a[0] == B and got_a[1].packed_body == b"\x80\x02"
    assert got_b[0] == A and got_b[1].packed_body == b"\x80\x01"
    assert a.stats.paired == b.stats.paired == 1


def test_a_node_holds_at_most_one_partner():
    a, b, c = core(A), core(B), core(C)
    assert b.on_propose(A, 7, 0.0) == Decision.accept()
    assert b.on_propose(C, 7, 0.0) == Decision.refuse(BUSY)  # holding for A
    assert b.on_propose(A, 7, 0.5) == Decision.accept()  # A repeating itself is fine
    assert b.hold_until == 0.5 + HOLD
    # A node that is proposing is busy for everyone but a crossing partner.
    assert c.begin_proposal(B)
    assert c.on_propose(A, 7, 0.0) == Decision.refuse(BUSY)
    # A node committing with its acceptor is busy too.
    assert a.begin_proposal(B) and a.proposal_answered(B, Decision.accept())
    assert a.on_propose(C, 7, 0.0) == Decision.refuse(BUSY)
    run_to_commit(a, b)
    assert a.done and b.done
    assert b.on_propose(C, 7, 0.0) == Decision.refuse(PAIRED)
    assert a.on_propose(C, 7, 0.0) == Decision.refuse(PAIRED)


def test_wrong_round_or_idle_is_not_ready():
    a = core(A, round=3)
    assert a.on_propose(B, 4, 0.0) == Decision.refuse(NOT_READY)
    idle = PairingCore(C, hold_timeout=HOLD)
    assert idle.on_propose(B, 3, 0.0) == Decision.refuse(NOT_READY)
    assert idle.on_commit(B, 3) == Decision.refuse(NOT_READY)
    assert a.on_swap(B, 3, Payload(b"\x80"), 0.0) == Decision.refuse(BUSY)  # in the round, not holding B


def test_expired_hold_means_neither_side_uses_the_payloads():
    a, b = core(A), core(B)
    assert a.begin_proposal(B) and a.proposal_answered(B, b.on_propose(A, 7, 0.0))
    d = b.on_swap(A, 7, payload_of(a), 1.0)
    assert a.swap_answered(B, d, payload_of(b))
    assert b.expire(1.0 + HOLD - 0.001) is False
    assert b.expire(1.0 + HOLD) is True  # A went quiet after the swap
    assert b.phase is Phase.OPEN and b.theirs is None
    late = b.on_commit(A, 7)
    assert late == Decision.refuse(BUSY)
    a.commit_answered(B, late)
    assert a.phase is Phase.OPEN and B in a.refused
    assert a.finish() is None and b.finish() is None
    assert b.stats.expired_holds == 1 and a.stats.unpaired == 1


def test_commit_is_idempotent_and_remembered_after_the_round():
    a, b = core(A), core(B)
    assert a.begin_proposal(B) and a.proposal_answered(B, b.on_propose(A, 7, 0.0))
    run_to_commit(a, b)
    assert b.on_commit(A, 7) == Decision.accept()  # a retry after a lost reply
    b.finish()
    assert b.on_commit(A, 7) == Decision.accept()  # still, after the round ended
    assert b.on_commit(C, 7) == Decision.refuse(PAIRED)
    assert b.on_propose(C, 7, 0.0) == Decision.refuse(PAIRED)
    with pytest.raises(LocalProtocolError):
        b.start(7, Payload(b"\x80"))  # a round pairs once
    for r in range(100, 100 + REMEMBERED_ROUNDS + 5):  # memory is bounded
        b.start(r, Payload(b"\x80"))
        b.on_propose(A, r, 0.0)
        b.on_swap(A, r, Payload(b"\x80"), 0.0)
        b.on_commit(A, r)
        b.finish()
    assert len(b._history) == REMEMBERED_ROUNDS and 7 not in b._history


def test_commit_before_swap_and_misuse():
    a, b = core(A), core(B)
    assert b.on_propose(A, 7, 0.0) == Decision.accept()
    assert b.on_commit(A, 7) == Decision.refuse(NOT_READY)  # nothing swapped yet
    assert not b.done
    with pytest.raises(LocalProtocolError):
        a.start(8, Payload(b"\x80"))  # round 7 is still running
    assert a.begin_proposal(A) is False  # never ourselves
    with pytest.raises(ValueError):
        PairingCore(A, hold_timeout=0)


def test_refusals_are_counted_by_reason_and_the_node_is_open_again():
    a = core(A)
    assert a.begin_proposal(B)
    assert a.proposal_answered(B, Decision.refuse(BUSY)) is False
    assert a.begin_proposal(C)
    assert a.proposal_answered(C, None) is False  # no answer
    assert a.phase is Phase.OPEN and a.refused == {B, C}
    assert a.stats.by_reason == {BUSY: 1, "no_answer": 1} and a.stats.refused == 2


def test_choose_partner():
    rng = random.Random(5)
    refused = set()
    picks = {choose_partner([A, B, C], A, refused, rng) for _ in range(50)}
    assert picks == {B, C}  # never ourselves, both others reachable
    refused = {B}
    assert all(choose_partner([A, B, C], A, refused, rng) == C for _ in range(20))
    refused = {B, C}
    assert choose_partner([A, B, C], A, refused, rng) in (B, C) and refused == set()  # forgotten
    assert choose_partner([A], A, set(), rng) is None
    assert choose_partner([], A, set(), rng) is None
    # Seeded: the same generator state gives the same choice, whatever the input order.
    assert choose_partner([C, B], A, set(), random.Random(1)) == choose_partner([B, C], A, set(), random.Random(1))


def test_a_target_not_yet_in_the_round_is_waited_for_until_patience_runs_out():
    a = PairingCore(A, hold_timeout=HOLD)
    a.start(7, Payload(b"\x80"), patience=1.0)
    assert a.waiting_for(0.0) is None  # no target yet: the pump picks one
    assert a.begin_proposal(B, now=0.0)
    assert a.proposal_answered(B, Decision.refuse(NOT_READY), now=0.4) is False
    # B has not reached round 7: A keeps it as its target (not refused) and stays open.
    assert a.phase is Phase.OPEN and a.refused == set() and a.waiting_for(0.4) == B
    assert a.stats.by_reason == {NOT_READY: 1} and a.stats.refused == 1
    # Meanwhile anyone may pair with A.
    assert a.on_propose(C, 7, 0.5) == Decision.accept() and a.phase is Phase.HOLDING
    assert a.expire(0.5 + HOLD) is True
    # Proposing to the same target again does not restart the patience (it started at 0.0).
    assert a.begin_proposal(B, now=0.9)
    assert a.proposal_answered(B, Decision.refuse(NOT_READY), now=0.99) is False and a.waiting_for(0.99) == B
    assert a.waiting_for(1.0) is None  # patience over: the pump picks another
    assert a.begin_proposal(B, now=1.0) and a.proposal_answered(B, Decision.refuse(NOT_READY), now=1.0) is False
    assert a.refused == {B} and a.target is None
    with pytest.raises(ValueError, match="patience must be >= 0"):
        PairingCore(A, hold_timeout=HOLD).start(7, Payload(b"\x80"), patience=-1.0)


@pytest.mark.parametrize("reason", [BUSY, PAIRED, CROSSED, None])
def test_any_other_refusal_drops_the_target_at_once(reason):
    a = PairingCore(A, hold_timeout=HOLD)
    a.start(7, Payload(b"\x80"), patience=5.0)
    assert a.begin_proposal(B, now=0.0)
    assert a.proposal_answered(B, None if reason is None else Decision.refuse(reason), now=0.1) is False
    assert a.waiting_for(0.1) is None and a.refused == {B}


def test_without_patience_not_ready_is_a_refusal():
    a = core(A)  # patience 0
    assert a.begin_proposal(B)
    assert a.proposal_answered(B, Decision.refuse(NOT_READY)) is False
    assert a.refused == {B} and a.waiting_for(0.0) is None


def test_nobody_left_once_every_live_peer_paired_this_round():
    a = core(A)
    assert a.nobody_left([B, C]) is False
    assert a.begin_proposal(B) and a.proposal_answered(B, Decision.refuse(PAIRED)) is False
    assert a.nobody_left([B, C]) is False  # C may still pair with us
    assert a.begin_proposal(C) and a.proposal_answered(C, Decision.refuse(BUSY)) is False
    assert a.nobody_left([B, C]) is False  # busy is not done: C's partner may fall through
    assert a.begin_proposal(C) and a.proposal_answered(C, Decision.refuse(PAIRED)) is False
    assert a.nobody_left([A, B, C]) is True  # ourselves in the list does not count
    assert a.nobody_left([B, C, b"\x04" * 32]) is False  # a peer we have not heard from
    assert a.nobody_left([]) is False  # nobody known: the pump keeps looking until its deadline
    assert a.on_propose(B, 7, 0.0) == Decision.accept()  # B's pair fell through after all
    assert a.nobody_left([B, C]) is False  # holding for B: not open
    a.finish()
    a.start(8, Payload(b"\x80"))
    assert a.finished == set() and a.nobody_left([B, C]) is False  # a new round forgets
