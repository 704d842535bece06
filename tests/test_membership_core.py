"""MembershipCore without I/O: merges, rounds, suspicion, rumours, joins, bounds, by hand."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.errors import RemoteProtocolError
from gossip.identity import Identity
from gossip.membership import MembershipConfig, MembershipCore, MembershipStats, ShufflePlan, next_seq
from gossip.membership_wire import MAX_GONE, decode_entries, encode_entries
from gossip.peer_records import sign_record

WALL = 1_700_000_000.0
IDS = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(40)]
SELF = IDS[0]


def rec(i, seq=1, addresses=None, expires=int(WALL) + 3600, meta=None):
    return sign_record(IDS[i], (f"sim:{i}",) if addresses is None else addresses, seq, expires, meta or {})


def pid(i):
    return IDS[i].peer_id


def make_core(**overrides):
    fields = dict(view_size=4, shuffle_len=2, max_age_s=20.0, suspicion_s=3.0, gone_s=10.0)
    fields.update(overrides)
    return MembershipCore(MembershipConfig(**fields), SELF.peer_id, random.Random(0))


def fill(core, ids, now=10.0, age=0.0, hop=0.0):
    core.merge([(rec(i), age) for i in ids], now, WALL, hop, [])


def test_next_seq_beats_previous_and_the_clock():
    assert next_seq(5, 0.000001) == 6
    assert next_seq(0, 1_700_000_000.5) == 1_700_000_000_500_000
    assert next_seq(1_700_000_000_500_000, 1_700_000_000.5) == 1_700_000_000_500_001
    assert next_seq(1_700_000_000_500_000, 1_700_000_001.0) == 1_700_000_001_000_000


def test_merge_fills_empty_slots_then_overwrites_victims_in_order():
    core = make_core(view_size=3)
    fill(core, [1, 2, 3])
    assert list(core.view) == [pid(1), pid(2), pid(3)]
    # View full: 4 takes 2's slot, the absent victim 9 is skipped, 5 takes 3's, 6 finds none.
    core.merge([(rec(4), 0.0), (rec(5), 0.0), (rec(6), 0.0)], 11.0, WALL, 0.0, [pid(2), pid(9), pid(3)])
    assert set(core.view) == {pid(1), pid(4), pid(5)}


def test_ages_become_heard_at_and_born_and_duplicates_only_refresh_liveness():
    core = make_core()
    core.merge([(rec(1), 2.0)], 10.0, WALL, 0.5, [])  # relayed: 2 s old plus a 0.5 s hop
    entry = core.view[pid(1)]
    assert (entry.heard_at, entry.born) == (7.5, 7.5)
    core.merge([(rec(1), 0.0)], 11.0, WALL, 0.1, [])  # a fresher copy of the same pointer
    assert entry.heard_at == pytest.approx(10.9) and entry.born == 7.5
    core.merge([(rec(1), 3.0)], 12.0, WALL, 0.1, [], direct=pid(1))  # from the peer itself
    assert entry.heard_at == 12.0 and entry.born == 7.5


def test_newer_seq_replaces_older_is_stale_and_bad_expiry_is_refused():
    core = make_core()
    core.merge([(rec(1, seq=5), 0.0)], 10.0, WALL, 0.0, [])
    core.merge([(rec(1, seq=6, meta={"round": 3}), 0.0)], 10.0, WALL, 0.0, [])
    assert core.view[pid(1)].record.seq == 6 and core.view[pid(1)].record.metadata["round"] == 3
    core.merge([(rec(1, seq=4), 0.0)], 10.0, WALL, 0.0, [])
    assert core.view[pid(1)].record.seq == 6 and core.stats.stale == 1
    core.merge([(rec(2, expires=int(WALL)), 0.0)], 10.0, WALL, 0.0, [])  # expired at WALL
    assert core.stats.stale == 2 and pid(2) not in core.view
    far = int(WALL) + 3600 + 300 + 1  # beyond ttl + allowed clock skew
    core.merge([(rec(3, expires=far), 0.0)], 10.0, WALL, 0.0, [])
    assert core.stats.forged == 1 and pid(3) not in core.view


def test_our_own_record_is_never_in_the_view_but_its_seq_is_noted():
    core = make_core()
    core.merge([(sign_record(SELF, ("sim:0",), 99, int(WALL) + 60, {}), 0.0)], 10.0, WALL, 0.0, [])
    assert core.view == {} and core.own_seq_seen == 99


def test_entries_older_than_max_age_are_refused():
    core = make_core(max_age_s=20.0)
    core.merge([(rec(1), 19.9)], 100.0, WALL, 0.1, [])  # heard exactly 20 s ago: still in
    core.merge([(rec(2), 19.95)], 100.0, WALL, 0.1, [])  # 20.05 s: too old
    assert pid(1) in core.view and pid(2) not in core.view and core.stats.too_old == 1


def test_leave_tombstones_and_only_news_lifts_a_tombstone():
    core = make_core()
    fill(core, [1, 2])
    core.merge([(rec(1, seq=2, addresses=()), 0.0)], 20.0, WALL, 0.0, [])
    assert pid(1) not in core.view and core.tombstones[pid(1)] == (2, 20.0) and core.stats.left == 1
    core.merge([(rec(1, seq=1), 0.0)], 21.0, WALL, 1.5, [])  # old record, heard 19.5 < 20.0
    assert pid(1) not in core.view and core.stats.buried == 1
    core.merge([(rec(1, seq=3), 0.0)], 22.0, WALL, 0.0, [])  # a restart: higher seq
    assert pid(1) in core.view and pid(1) not in core.tombstones
    # A leave record must come from a leave; a replayed older leave changes nothing.
    assert core.on_leave(rec(1, seq=2, addresses=()), 23.0) is False
    with pytest.raises(RemoteProtocolError):
        core.on_leave(rec(1, seq=9), 23.0)


def test_a_removed_peer_heard_of_after_its_removal_comes_back():
    core = make_core()
    fill(core, [1])
    core.suspect(pid(1), 10.0)
    core.tick(13.0, rec(0))
    assert core.tombstones[pid(1)] == (1, 13.0)
    core.merge([(rec(1), 0.5)], 14.0, WALL, 0.1, [])  # someone heard from it at 13.4 > 13.0
    assert pid(1) in core.view and pid(1) not in core.tombstones


def test_suspects_are_removed_after_exactly_suspicion_s_and_old_entries_age_out():
    core = make_core(suspicion_s=3.0, max_age_s=20.0, revive_every=100)
    fill(core, [1, 2, 3], now=10.0)
    core.suspect(pid(1), 10.0)
    plan = core.tick(12.9, rec(0))
    assert [r.peer_id for r in plan.reprobe] == [pid(1)] and pid(1) in core.view
    assert pid(1) not in {r.peer_id for r in core.live()}
    core.tick(13.0, rec(0))
    assert pid(1) not in core.view and core.stats.removed == 1
    assert pid(1) in core.tombstones and pid(1) in core.graveyard
    core.tick(30.0, rec(0))  # 2 and 3 heard at 10.0: 20 s is still fine
    assert {pid(2), pid(3)} <= set(core.view)
    core.tick(30.1, rec(0))
    assert core.view == {} and core.stats.aged_out == 2
    assert pid(2) not in core.tombstones and pid(2) in core.graveyard  # dropped, not declared dead


def test_tick_targets_the_oldest_pointer_and_sends_us_first():
    core = make_core(view_size=5, shuffle_len=3, pings_per_round=1.0)
    for i, age in [(1, 1.0), (2, 4.0), (3, 2.0), (4, 0.5)]:
        core.merge([(rec(i), age)], 10.0, WALL, 0.0, [])
    core.suspect(pid(4), 10.0)
    plan = core.tick(10.0, rec(0))
    assert plan.shuffle.target.peer_id == pid(2)
    sent = [r.peer_id for r, _ in plan.shuffle.entries]
    assert sent[0] == pid(0) and plan.shuffle.entries[0][1] == 0.0
    assert sorted(sent[1:]) == sorted([pid(1), pid(3)])  # l - 1 = 2, never the target or a suspect
    assert dict((r.peer_id, a) for r, a in plan.shuffle.entries)[pid(1)] == 1.0
    assert len(plan.ping) == 1 and plan.ping[0].peer_id in {pid(1), pid(3)}
    assert [r.peer_id for r in plan.reprobe] == [pid(4)]


def test_fractional_pings_per_round():
    core = make_core(view_size=8, pings_per_round=0.5)
    fill(core, range(1, 9))
    pings = [len(core.tick(10.0, rec(0)).ping) for _ in range(400)]
    assert set(pings) == {0, 1} and 160 <= sum(pings) <= 240  # binomial(400, 0.5): +-4 sigma


def test_revive_every_and_rejoin_every():
    core = make_core(revive_every=4, rejoin_every=5)
    core.graveyard[pid(5)] = (rec(5), 10.0)
    plans = [core.tick(11.0 + r, rec(0)) for r in range(11)]
    # Round 4 takes the one removed peer out of the graveyard; nothing is left for round 8.
    assert [p.revive is not None for p in plans] == [r == 3 for r in range(11)]
    assert plans[3].revive.peer_id == pid(5) and core.graveyard == {}
    # The view is empty all along: call the bootstraps in rounds 1, 6, 11.
    assert [p.rejoin for p in plans] == [r % 5 == 0 for r in range(11)]
    assert all(p.shuffle is None for p in plans)


def test_shuffle_request_must_carry_the_caller_and_reply_skips_sender_and_doubted():
    core = make_core(view_size=6, shuffle_len=3)
    fill(core, [1, 2, 3, 4, 5])
    core.suspect(pid(2), 10.0)
    core.on_gone([pid(3)], 10.5)
    with pytest.raises(RemoteProtocolError, match="own record"):
        core.on_shuffle_request(pid(1), [(rec(9), 0.0)], 11.0, WALL)
    reply = core.on_shuffle_request(pid(1), [(rec(1), 0.0), (rec(6), 1.0), (rec(7), 1.0)], 11.0, WALL)
    assert sorted(r.peer_id for r, _ in reply) == sorted([pid(4), pid(5)])
    # The view was at 5 of 6: 6 fills the free slot, 7 overwrites one of the entries we sent.
    assert pid(6) in core.view and pid(7) in core.view and len(core.view) == 6
    assert len({pid(4), pid(5)} & set(core.view)) == 1
    assert core.view[pid(1)].heard_at == 11.0


def test_shuffle_reply_overwrites_the_target_first_or_keeps_it_fresh():
    core = make_core(view_size=3, shuffle_len=2)
    fill(core, [1, 2, 3])
    plan = ShufflePlan(rec(1), [(rec(0), 0.0), (rec(2), 0.0)])
    core.on_shuffle_reply(plan, [(rec(4), 0.0)], 0.05, 12.0, WALL)
    assert set(core.view) == {pid(2), pid(3), pid(4)}  # 4 took the target's slot
    plan = ShufflePlan(rec(3), [(rec(0), 0.0), (rec(2), 0.0)])
    core.on_shuffle_reply(plan, [], 0.05, 13.0, WALL)  # nothing came back: keep the target
    kept = core.view[pid(3)]
    assert (kept.heard_at, kept.due, kept.born) == (13.0, 13.0, 10.0)  # back of the queue, same pointer


def test_revived_peer_is_taken_back():
    core = make_core(view_size=2, shuffle_len=2)
    fill(core, [1, 2])
    plan = ShufflePlan(rec(5), [(rec(0), 0.0), (rec(2), 0.0)])
    core.on_shuffle_reply(plan, [], 0.05, 12.0, WALL, revive=True)
    assert set(core.view) == {pid(1), pid(5)} and core.stats.revived == 1


def test_bootstrap_hands_out_least_given_entries_and_evicts_the_most_given():
    core = make_core(view_size=4, shuffle_len=2)
    fill(core, [1, 2, 3, 4])
    first = core.on_join(rec(10), 11.0, WALL)
    given_first = {r.peer_id for r, _ in first}
    assert len(given_first) == 2 and pid(10) in core.view and len(core.view) == 4
    # 10 evicted one of the two handed out (given 1); 3 members with given 0 remain.
    assert len(given_first & set(core.view)) == 1
    never_given = {pid(i) for i in (1, 2, 3, 4)} - given_first
    second = core.on_join(rec(11), 12.0, WALL)
    assert {r.peer_id for r, _ in second} <= never_given | {pid(10)}  # least handed out first
    assert pid(11) in core.view and len(core.view) == 4 and core.stats.joins_answered == 2


def test_joiner_keeps_bootstraps_only_while_its_view_is_small():
    core = make_core(view_size=6, shuffle_len=2)
    replies = [
        (pid(1), [(rec(1), 0.0), (rec(3), 1.0), (rec(4), 1.0)], 0.1),
        (pid(2), [(rec(2), 0.0), (rec(5), 1.0)], 0.1),
    ]
    core.on_join_replies(replies, 10.0, WALL)
    assert set(core.view) == {pid(3), pid(4), pid(5)}
    lonely = make_core(view_size=6, shuffle_len=2)
    lonely.on_join_replies([(pid(1), [(rec(1), 0.0)], 0.1), (pid(2), [(rec(2), 0.0)], 0.1)], 10.0, WALL)
    assert set(lonely.view) == {pid(1), pid(2)} and lonely.view[pid(1)].heard_at == 10.0


def test_gone_news_makes_doubt_not_suspicion_and_spreads_until_refuted():
    core = make_core(view_size=6)
    fill(core, [1, 2, 3])
    core.on_gone([pid(1), pid(7), SELF.peer_id], 11.0)
    assert core.is_doubted(pid(1)) and not core.is_suspect(pid(1))
    assert pid(1) in {r.peer_id for r in core.sample(6, 11.0)}  # doubted members are still sampled
    assert core.gone(11.0) == [pid(7), pid(1)]  # rumours, newest first; never ourselves
    assert [r.peer_id for r in core.tick(11.5, rec(0)).reprobe] == [pid(1)]
    core.heard_from(pid(1), 12.0)  # our ping got through: the rumour was wrong
    assert not core.is_doubted(pid(1)) and core.gone(12.0) == [pid(7)]
    core.on_gone([pid(2)], 13.0)
    core.probe_failed(pid(2), 13.5)  # our own ping failed too
    assert core.is_suspect(pid(2)) and core.gone(13.5)[0] == pid(2)
    assert core.gone(21.1) == [pid(2)]  # the rumour about 7 is older than gone_s
    # A doubted peer relayed to us again stays doubted: nobody heard from it since.
    core.merge([(rec(2), 5.0)], 14.0, WALL, 0.1, [])
    assert core.is_suspect(pid(2))
    core.on_gone([pid(8)], 14.0)
    core.merge([(rec(8), 2.0)], 15.0, WALL, 0.1, [])  # heard at 12.9, before the rumour
    assert core.is_doubted(pid(8))


def test_gone_lists_are_bounded():
    core = make_core(view_size=40, max_age_s=60.0)
    core.on_gone([pid(i) for i in range(1, 40)], 10.0)
    assert len(core.rumours) == MAX_GONE  # only the first MAX_GONE of a message are read
    assert len(core.gone(10.5)) == MAX_GONE


def test_sample_draws_young_pointers_first_and_uniformly():
    core = make_core(view_size=8, sample_age_s=4.0)
    for i, age in [(1, 1.0), (2, 2.0), (3, 3.0), (4, 5.0), (5, 6.0), (6, 0.5)]:
        core.merge([(rec(i), age)], 10.0, WALL, 0.0, [])  # pointers born 9, 8, 7, 5, 4, 9.5
    core.suspect(pid(6), 10.0)  # young, but a suspect: never sampled
    young = {pid(1), pid(2), pid(3)}
    counts = dict.fromkeys(young, 0)
    for _ in range(3000):
        picked = [r.peer_id for r in core.sample(2, 10.0)]
        assert len(set(picked)) == 2 and set(picked) <= young
        for peer in picked:
            counts[peer] += 1
    assert all(1860 <= c <= 2140 for c in counts.values())  # 2000 each; binomial sd 26: +-5.4 sd
    wide = [r.peer_id for r in core.sample(5, 10.0)]
    assert set(wide[:3]) == young and set(wide[3:]) == {pid(4), pid(5)}  # fair draws come first
    assert len(core.sample(10, 10.0)) == 5 and core.sample(0, 10.0) == []
    assert {r.peer_id for r in core.sample(2, 12.0)} == {pid(1), pid(2)}  # at 12 s, born >= 8 is young
    with pytest.raises(ValueError):
        core.sample(-1, 10.0)


def test_a_shuffle_that_keeps_its_target_sends_it_to_the_back_of_the_queue():
    core = make_core(view_size=4, shuffle_len=2)
    for i, age in [(1, 3.0), (2, 2.0), (3, 1.0)]:
        core.merge([(rec(i), age)], 10.0, WALL, 0.0, [])
    plan = core.tick(10.0, rec(0)).shuffle
    assert plan.target.peer_id == pid(1)
    core.on_shuffle_reply(plan, [], 0.05, 10.5, WALL)  # nothing came back: 1 is kept
    assert core.tick(11.0, rec(0)).shuffle.target.peer_id == pid(2)


def test_entries_codec_counts_forged_and_oversized():
    stats = MembershipStats()
    body = encode_entries([(rec(1), 1.2345), (rec(2), 99999999.0)])
    assert body["ages"] == [1234, (1 << 32) - 1]
    forged = rec(3).blob[:-1] + b"\x00"
    body["records"].append(forged)
    body["ages"].append(0)
    out = decode_entries(body, limit=3, stats=stats)
    assert [(r.peer_id, a) for r, a in out] == [(pid(1), 1.234), (pid(2), 4294967.295)]
    assert stats.forged == 1
    with pytest.raises(RemoteProtocolError, match="at most 2"):
        decode_entries(body, limit=2, stats=stats)
    assert stats.oversized == 1
    with pytest.raises(RemoteProtocolError, match="ages"):
        decode_entries({"records": [rec(1).blob], "ages": []}, 4, stats)


def test_view_and_tables_stay_bounded():
    core = make_core(view_size=4, max_tombstones=5, graveyard_size=3)
    for i in range(1, 30):
        core.merge([(rec(i), 0.0)], 10.0, WALL, 0.0, [])
        core.suspect(pid(i), 10.0)
        core.tick(14.0, rec(0))
        assert len(core.view) <= 4
    assert len(core.tombstones) == 5 and len(core.graveyard) == 3
    core.tick(14.0 + 120.0, rec(0))  # tombstone_s later, everything is forgotten
    assert len(core.tombstones) == 0 and len(core.graveyard) == 0


@pytest.mark.parametrize(
    "fields, fix",
    [
        ({"view_size": 0}, "view_size"),
        ({"view_size": 64}, "view_size"),
        ({"shuffle_len": 21}, "shuffle_len"),
        ({"round_s": 0}, "round_s"),
        ({"max_age_s": 29.0}, "1.5 \\* view_size"),
        ({"hop_age_s": -1}, "hop_age_s"),
        ({"record_ttl_s": 30}, "record_ttl_s"),
        ({"pings_per_round": -1}, "pings_per_round"),
        ({"revive_every": 0}, "revive_every"),
    ],
)
def test_config_refuses_nonsense_and_says_how_to_fix_it(fields, fix):
    with pytest.raises(ValueError, match=fix):
        MembershipConfig(**fields)


POOL = [rec(i, seq=s) for i in range(1, 12) for s in (1, 2)] + [rec(i, seq=3, addresses=()) for i in (3, 4)]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, len(POOL) - 1), st.floats(0, 50)), max_size=60))
def test_random_event_sequences_keep_the_invariants(events):
    cfg_core = make_core(view_size=5, shuffle_len=3, max_tombstones=4, graveyard_size=3)
    now = 10.0
    for kind, index, x in events:
        record = POOL[index]
        now += x / 10
        if kind == 0:
            cfg_core.merge([(record, x)], now, WALL, 0.1, [])
        elif kind == 1:
            cfg_core.tick(now, rec(0))
        elif kind == 2:
            cfg_core.suspect(record.peer_id, now)
        elif kind == 3:
            cfg_core.on_gone([record.peer_id], now)
        elif kind == 4 and record.left:
            cfg_core.on_leave(record, now)
        elif kind == 5 and not record.left:
            cfg_core.on_join(record, now, WALL)
        elif kind == 6 and not record.left:
            cfg_core.on_shuffle_request(record.peer_id, [(record, 0.0), (POOL[(index + 1) % len(POOL)], x)], now, WALL)
        elif kind == 7:
            cfg_core.heard_from(record.peer_id, now, record, WALL)
        view = cfg_core.view
        assert len(view) <= 5 and SELF.peer_id not in view
        assert all(not e.record.left for e in view.values())  # leave records never enter a view
        assert all(e.heard_at <= now and e.born <= now for e in view.values())
        assert len(cfg_core.tombstones) <= 4 and len(cfg_core.graveyard) <= 3
        assert not set(cfg_core.tombstones) & set(view)
        sampled = cfg_core.sample(3, now)
        assert len({r.peer_id for r in sampled}) == len(sampled) <= 3
        assert all(not cfg_core.is_suspect(r.peer_id) for r in sampled)
        assert len(cfg_core.gone(now)) <= MAX_GONE
