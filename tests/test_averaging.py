"""The sans-IO parts of group_average: shards, the reducer's bookkeeping, result claims, matchmaking."""

import numpy as np
import pytest

from gossip.averaging import (
    DUPLICATE,
    INVALID,
    LATE,
    NOT_MEMBER,
    OK,
    ShardReduction,
    all_finite,
    check_values,
    layout_fingerprint,
    shard_bounds,
    split_flat,
    summarize,
)
from gossip.collective_types import AverageResult, ShardReport
from gossip.matchmaking import (
    ABSENT,
    CLOSED,
    FULL,
    GROUP,
    MISMATCH,
    REDIRECT,
    REFUSE,
    SEALED,
    WAIT,
    JoinAnswer,
    Matchmaker,
    Member,
    Role,
)

P = [bytes([i + 1]) * 32 for i in range(6)]  # sorted: P[0] < P[1] < ...
M = [Member(p, f"sim:{i}") for i, p in enumerate(P)]
LAYOUT = layout_fingerprint([(10,)])


# -- shards and layouts ---------------------------------------------------------------------


def test_shard_bounds_by_hand():
    assert shard_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert shard_bounds(10, 4) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert shard_bounds(2, 4) == [(0, 0), (0, 1), (1, 1), (1, 2)]
    assert shard_bounds(0, 2) == [(0, 0), (0, 0)]
    assert shard_bounds(7, 1) == [(0, 7)]
    for numel, n in [(10_000_001, 7), (5, 5), (3, 8)]:
        b = shard_bounds(numel, n)
        assert b[0][0] == 0 and b[-1][1] == numel
        assert all(b[i][1] == b[i + 1][0] for i in range(n - 1))
        sizes = [hi - lo for lo, hi in b]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        shard_bounds(5, 0)


def test_layout_fingerprint():
    assert layout_fingerprint([(3, 4), (5,)]) == layout_fingerprint([[3, 4], [5]])
    assert layout_fingerprint([(3, 4), (5,)]) != layout_fingerprint([(4, 3), (5,)])
    assert layout_fingerprint([(12,)]) != layout_fingerprint([(3, 4)])
    assert len(layout_fingerprint([])) == 16


def test_check_values():
    ok = np.ones(4, np.float32)
    assert check_values(ok, 4) is None
    assert check_values(ok, 5) == "shape (4,), expected (5,)"
    assert check_values(ok.reshape(2, 2), 4) == "shape (2, 2), expected (4,)"
    assert check_values(ok.astype(np.float64), 4) == "dtype float64, expected float32"
    bad = ok.copy()
    bad[2] = np.inf
    assert check_values(bad, 4) == "non-finite values"
    bad[2] = np.nan
    assert check_values(bad, 4) == "non-finite values"


def test_all_finite_in_blocks():
    block = 1 << 16
    x = np.zeros(3 * block + 5, np.float32)
    assert all_finite(x) and all_finite(x[:0]) and all_finite(x[:10])
    for where in (0, block - 1, block, 2 * block + 7, x.size - 1):  # either side of block edges
        for bad in (np.nan, np.inf, -np.inf):
            y = x.copy()
            y[where] = bad
            assert not all_finite(y), (where, bad)
    assert all_finite(np.full(5, np.finfo(np.float32).max, np.float32))


def test_offer_of_a_slice_the_caller_checked_skips_the_check():
    red = ShardReduction(P[0], (P[0], P[1], P[2]), np.ones(2, np.float32), weight=1.0)
    assert red.offer(P[1], 1.0, np.array([3.0, 5.0], np.float32), None, checked=True) == OK
    assert red.offer(P[2], 1.0, np.array([np.nan, 5.0], np.float32), None) == INVALID  # unchecked: checked here
    assert red.finalize().tolist() == [2.0, 3.0]


# -- the reducer ----------------------------------------------------------------------------


def test_shard_reduction_weighted_mean_by_hand():
    group = (P[0], P[1], P[2])
    red = ShardReduction(P[1], group, np.array([1.0, 2.0], np.float32), weight=1.0)
    assert red.waiting_for == {P[0], P[2]} and not red.complete
    assert red.offer(P[0], 3.0, np.array([5.0, -2.0], np.float32), None) == OK
    assert red.offer(P[0], 3.0, np.array([5.0, -2.0], np.float32), None) == DUPLICATE
    assert red.offer(P[3], 1.0, np.array([0.0, 0.0], np.float32), None) == NOT_MEMBER
    assert red.offer(P[2], 1.0, np.array([np.nan, 0.0], np.float32), None) == INVALID
    assert red.rejected == {P[2]: "non-finite values"} and red.complete
    # (1*1 + 3*5) / 4 = 4 ; (1*2 + 3*-2) / 4 = -1
    assert red.finalize().tolist() == [4.0, -1.0]
    assert red.finalize().dtype == np.float32
    assert red.contributors == {P[0], P[1]} and red.total_weight == 4.0
    assert red.offer(P[2], 1.0, np.array([0.0, 0.0], np.float32), None) == LATE


def test_shard_reduction_stops_waiting_for_an_unreachable_member():
    red = ShardReduction(P[0], (P[0], P[1], P[2]), np.ones(2, np.float32), weight=1.0)
    red.give_up_on(P[2], "PeerUnreachable")
    assert red.waiting_for == {P[1]} and red.failed == {P[2]: "PeerUnreachable"}
    assert red.offer(P[1], 1.0, np.full(2, 3.0, np.float32), None) == OK
    assert red.complete and red.finalize().tolist() == [2.0, 2.0]
    red.give_up_on(P[1], "PeerUnreachable")  # it already contributed: nothing changes
    assert red.failed == {P[2]: "PeerUnreachable"} and red.contributors == {P[0], P[1]}
    fresh = ShardReduction(P[0], (P[0], P[1]), np.ones(2, np.float32), weight=1.0)
    fresh.give_up_on(P[1], "PeerUnreachable")
    assert fresh.offer(P[1], 1.0, np.ones(2, np.float32), None) == LATE  # too late for it


def test_shard_reduction_refuses_bad_slices_and_weights():
    group = (P[0], P[1], P[2], P[3])
    red = ShardReduction(P[0], group, np.zeros(3, np.float32), weight=2.0)
    assert red.offer(P[1], 1.0, np.zeros(4, np.float32), None) == INVALID  # wrong size
    assert red.offer(P[2], 1.0, None, "CodecError: short buffer") == INVALID
    assert red.offer(P[3], 0.0, np.zeros(3, np.float32), None) == INVALID  # weight must be > 0
    assert red.rejected == {
        P[1]: "shape (4,), expected (3,)",
        P[2]: "CodecError: short buffer",
        P[3]: "weight 0.0 is not a finite number > 0",
    }
    assert red.complete and red.contributors == {P[0]}
    with pytest.raises(ValueError):
        ShardReduction(P[5], group, np.zeros(3, np.float32), 1.0)


# -- what the result claims -----------------------------------------------------------------


def test_summarize_intersects_contributors_and_counts_fractions():
    # Two tensors of 4 and 6 elements = 10 values, 3 shards [0,3) [3,6) [6,10).
    shards = [
        ShardReport(0, 3, P[0], True, (P[0], P[1], P[2]), 3.0),
        ShardReport(3, 6, P[1], False, (), 0.0),  # reducer died
        ShardReport(6, 10, P[2], True, (P[0], P[2]), 2.0),  # P[1] died before sending this one
    ]
    contributors, fractions = summarize(P[0], shards, [4, 6])
    assert contributors == (P[0], P[2])
    assert fractions == (3 / 4, 4 / 6)  # tensor 0: [0,3) of [0,4); tensor 1: [6,10) of [4,10)
    r = AverageResult([], (P[0], P[1], P[2]), contributors, fractions, tuple(shards))
    assert not r.complete and not r.alone
    # All shards averaged over everyone: complete.
    full = [ShardReport(0, 5, P[0], True, (P[0], P[1]), 2.0), ShardReport(5, 10, P[1], True, (P[0], P[1]), 2.0)]
    contributors, fractions = summarize(P[0], full, [10, 0])
    assert contributors == (P[0], P[1]) and fractions == (1.0, 1.0)
    assert AverageResult([], (P[0], P[1]), contributors, fractions).complete
    # Nothing but our own empty shard: just us.
    assert summarize(P[1], [ShardReport(0, 0, P[1], True, (), 0.0)], [0]) == ((P[1],), (1.0,))


def test_split_flat():
    flat = np.arange(10, dtype=np.float32)
    a, b, c = split_flat(flat, [(2, 3), (0,), (4,)])
    assert a.tolist() == [[0, 1, 2], [3, 4, 5]] and b.shape == (0,) and c.tolist() == [6, 7, 8, 9]


# -- matchmaking ----------------------------------------------------------------------------


def mm(i, now=0.0, window=5.0, expected=(), max_group=8, deadline=100.0, regroup=0.0):
    return Matchmaker(M[i], LAYOUT, now, deadline, window, max_group, frozenset(P[j] for j in expected), regroup)


def test_lowest_present_peer_leads():
    m = mm(2)
    assert m.target() is None  # alone so far: a leader candidate
    m.saw(P[4], "sim:4")
    assert m.target() is None  # higher peers follow us
    m.saw(P[1], "sim:1")
    m.saw(P[0], "sim:0")
    assert m.target() == M[0]
    m.excluded.add(P[0])
    assert m.target() == M[1]
    m.saw(P[2], "sim:2")  # ourselves: ignored
    assert P[2] not in m.present


def test_join_decisions():
    m = mm(1)
    assert m.on_join(M[3], LAYOUT, waited=0.5, remaining=9.0, now=1.0) == JoinAnswer(WAIT)
    assert m.followers[P[3]].entered == 0.5 and m.followers[P[3]].deadline == 10.0
    assert m.seal_at == 5.0  # we entered first, at 0.0
    assert m.on_join(M[4], layout_fingerprint([(11,)]), 0, 9, 1.0) == JoinAnswer(REFUSE, MISMATCH)
    # A lower peer joining us means it is not ours to lead: we learn of it instead.
    assert m.on_join(M[0], LAYOUT, 0, 9, 1.0) == JoinAnswer(REFUSE, ABSENT)
    assert m.target() == M[0]
    # Now that a lower peer is known, new joiners are sent on to it.
    assert m.on_join(M[4], LAYOUT, 0, 9, 1.0) == JoinAnswer(REDIRECT, leader=M[0])
    m.follow(M[0])
    assert m.role is Role.FOLLOWING and m.answers[P[3]] == JoinAnswer(REDIRECT, leader=M[0])
    assert m.followers == {}
    assert m.on_join(M[5], LAYOUT, 0, 9, 1.0) == JoinAnswer(REDIRECT, leader=M[0])


def test_seal_when_everyone_expected_joined_or_full_or_window():
    m = mm(0, now=10.0, expected=(1, 2))
    m.on_join(M[1], LAYOUT, 0.0, 50.0, 10.1)
    assert not m.should_seal(10.1)
    m.on_join(M[2], LAYOUT, 0.0, 50.0, 10.2)
    assert m.should_seal(10.2)  # everyone we knew of is in
    g = m.seal(group_id=77, now=10.2)
    assert g == JoinAnswer(GROUP, group=(M[0], M[1], M[2]), group_id=77, budget=pytest.approx(50.0 - 0.1))
    assert m.answers == {P[1]: g, P[2]: g} and m.role is Role.SEALED
    assert m.on_join(M[1], LAYOUT, 0, 9, 11.0) == g  # a repeat gets the same answer
    assert m.on_join(M[3], LAYOUT, 0, 9, 11.0) == JoinAnswer(REFUSE, SEALED)

    full = mm(0, max_group=2, expected=(1, 2, 3))
    full.on_join(M[1], LAYOUT, 0, 9, 0.1)
    assert full.should_seal(0.1)
    assert full.on_join(M[2], LAYOUT, 0, 9, 0.1) == JoinAnswer(REFUSE, FULL)

    # The window runs from the earliest member's entry, on our clock.
    w = mm(0, now=3.0, window=5.0, expected=(1, 2))
    w.on_join(M[1], LAYOUT, waited=2.0, remaining=9.0, now=3.5)  # it entered at 1.5
    assert w.seal_at == 6.5
    assert not w.should_seal(6.49) and w.should_seal(6.5)
    # ...but never later than our own deadline.
    assert mm(0, now=0.0, window=5.0, deadline=2.0).seal_at == 2.0


def test_no_seal_while_a_lower_leader_is_known():
    m = mm(1, expected=(2,))
    m.on_join(M[2], LAYOUT, 0, 9, 0.1)
    m.saw(P[0], "sim:0")
    assert not m.should_seal(99.0)


def test_join_answers_drive_the_follower():
    m = mm(3)
    m.saw(P[2], "sim:2")
    m.follow(M[2])
    m.join_answered(M[2], JoinAnswer(REDIRECT, leader=M[0]), 1.0)  # P[2] follows P[0]
    assert m.role is Role.GATHERING and m.target() == M[0] and P[2] not in m.excluded
    m.follow(M[0])
    m.join_answered(M[0], JoinAnswer(REFUSE, SEALED), 1.0)
    assert m.excluded == {P[0]} and m.target() == M[2]
    m.follow(M[2])
    m.join_answered(M[2], JoinAnswer(REDIRECT, leader=M[0]), 1.0)  # to an excluded leader: a failure
    assert m.excluded == {P[0], P[2]} and m.target() is None
    m.saw(P[1], "sim:1")
    m.follow(M[1])
    m.join_answered(M[1], JoinAnswer(REDIRECT, leader=M[4]), 1.0)  # redirects must go down
    assert P[1] in m.excluded
    m.saw(P[0], "sim:0")
    m.excluded.discard(P[0])
    m.follow(M[0])
    m.join_answered(M[0], JoinAnswer(GROUP, group=(M[0], M[1]), group_id=5, budget=3.0), 1.0)  # without us
    assert m.role is Role.GATHERING and P[0] in m.excluded
    m.excluded.discard(P[0])
    m.follow(M[0])
    g = JoinAnswer(GROUP, group=(M[0], M[3]), group_id=5, budget=3.0)
    m.join_answered(M[0], g, 1.0)
    assert m.role is Role.SEALED and m.result == g
    m.join_answered(M[0], None, 1.0)  # a stale answer changes nothing
    assert m.role is Role.SEALED


def test_a_node_whose_leader_failed_keeps_gathering_for_the_regroup_time():
    m = mm(1, now=0.0, window=2.0, regroup=0.5, expected=(0, 2))
    m.saw(P[0], "sim:0")
    m.follow(M[0])
    m.join_answered(M[0], None, now=2.6)  # the leader died; our window ended at 2.0
    assert m.role is Role.GATHERING and m.target() is None
    assert m.seal_at == 3.1 and not m.should_seal(3.0)  # the others may now join us
    assert m.on_join(M[2], LAYOUT, 0.1, 5.0, 3.0) == JoinAnswer(WAIT)
    assert m.should_seal(3.1)
    capped = mm(1, now=0.0, window=2.0, regroup=5.0, deadline=4.0)
    capped.saw(P[0], "sim:0")
    capped.follow(M[0])
    capped.join_answered(M[0], None, now=2.0)
    assert capped.seal_at == 4.0  # never past our deadline


def test_withdraw_and_close():
    m = mm(0)
    m.on_join(M[1], LAYOUT, 0, 9, 0.0)
    m.on_join(M[2], LAYOUT, 0, 9, 0.0)
    assert m.withdraw(P[1]) == JoinAnswer(REFUSE, CLOSED) and list(m.followers) == [P[2]]
    m.close()
    assert m.answers == {P[2]: JoinAnswer(REFUSE, CLOSED)} and m.role is Role.CLOSED
    assert m.on_join(M[3], LAYOUT, 0, 9, 0.0) == JoinAnswer(REFUSE, CLOSED)
    with pytest.raises(ValueError):
        mm(0, window=0)
