"""Membership over SimNetwork, small swarms on virtual time: join, leave, restart, metadata,
and hostile input (forged, stale, oversized) counted and ignored without harm."""

import pytest
import trio
import trio.lowlevel

from gossip.errors import LocalProtocolError, RemoteError
from gossip.identity import Identity
from gossip.membership import MembershipConfig
from gossip.membership_driver import Membership
from gossip.membership_wire import JOIN, LEAVE, SHUFFLE, encode_entries
from gossip.peer_records import RECORD_DOMAIN, sign_record
from gossip.sim import LinkSpec, SimNetwork
from gossip.sim_swarm import WALL_EPOCH, SimSwarm

CONFIG = MembershipConfig(view_size=20, shuffle_len=8, round_s=1.0)


def others(swarm, node):
    return {n.peer_id for n in swarm.live() if n is not node}


async def start_swarm(nursery, n, seed=0, config=CONFIG):
    swarm = SimSwarm(SimNetwork(seed=seed), config, seed=seed)
    swarm.bind(nursery)
    seed_node = swarm.start()
    for _ in range(n - 1):
        swarm.start([seed_node.address])
    return swarm


async def test_ten_nodes_join_through_one_address_and_learn_everyone(autojump_clock):
    async with trio.open_nursery() as nursery:
        swarm = await start_swarm(nursery, 10)
        await trio.sleep(10)
        for node in swarm.live():
            assert {r.peer_id for r in node.membership.live_peers()} == others(swarm, node)
            assert node.peer_id not in {r.peer_id for r in node.membership.sample(20)}
            assert node.membership.stats.forged == node.membership.stats.stale == 0
        assert swarm.nodes["sim:0"].membership.stats.joins_answered == 9
        nursery.cancel_scope.cancel()


async def test_leave_is_announced_and_bounded(autojump_clock):
    async with trio.open_nursery() as nursery:
        swarm = await start_swarm(nursery, 10)
        await trio.sleep(10)
        leaver = swarm.nodes["sim:4"]
        t0 = trio.current_time()
        await swarm.leave(leaver.address)
        assert trio.current_time() - t0 <= CONFIG.leave_timeout_s
        for node in swarm.live():  # every view member got the announcement first-hand
            assert leaver.peer_id not in node.membership.core.view
            assert node.membership.core.tombstones[leaver.peer_id][0] == leaver.membership.record.seq
        assert sum(n.membership.stats.left for n in swarm.live()) == 9
        assert leaver.membership.record.left and leaver.membership.sample(3) == []
        with pytest.raises(LocalProtocolError):
            leaver.membership.update_metadata(round=1)
        await trio.sleep(30)  # its old record, still in flight nowhere, never comes back
        assert all(leaver.peer_id not in n.membership.core.view for n in swarm.live())
        nursery.cancel_scope.cancel()


async def test_leave_never_waits_past_its_deadline(autojump_clock):
    net = SimNetwork(default_link=LinkSpec(latency=0.01))
    swarm = SimSwarm(net, CONFIG)
    async with trio.open_nursery() as nursery:
        swarm.bind(nursery)
        a = swarm.start()
        b = swarm.start([a.address])
        await trio.sleep(5)
        net.partition([a.address], [b.address])  # b can no longer hear a: the call hangs
        t0 = trio.current_time()
        await a.membership.leave()
        assert trio.current_time() - t0 == pytest.approx(CONFIG.leave_timeout_s)
        nursery.cancel_scope.cancel()


async def test_restart_with_the_same_identity_supersedes_the_old_record(autojump_clock):
    async with trio.open_nursery() as nursery:
        swarm = await start_swarm(nursery, 8)
        await trio.sleep(10)
        victim = swarm.nodes["sim:5"]
        old_seq = victim.membership.record.seq
        swarm.kill(victim.address)
        await trio.sleep(CONFIG.max_age_s + CONFIG.round_s)
        assert all(victim.peer_id not in n.membership.core.view for n in swarm.live())
        assert any(victim.peer_id in n.membership.core.tombstones for n in swarm.live())
        reborn = swarm.start(["sim:0"], identity=victim.identity, address=victim.address)
        assert reborn.membership.record.seq > old_seq  # wall-clock seq: no saved state needed
        await trio.sleep(10)
        for node in swarm.live():
            if node is not reborn:
                records = {r.peer_id: r for r in node.membership.live_peers()}
                assert records[victim.peer_id].seq == reborn.membership.record.seq
        nursery.cancel_scope.cancel()


async def test_metadata_updates_reach_the_swarm_with_a_higher_seq(autojump_clock):
    async with trio.open_nursery() as nursery:
        swarm = await start_swarm(nursery, 8)
        await trio.sleep(5)
        node = swarm.nodes["sim:2"]
        before = node.membership.record.seq
        node.membership.update_metadata(round=42, algorithm="noloco", fingerprint=b"\xab" * 8, load=0.5)
        first = node.membership.record.seq
        node.membership.update_metadata(load=None)  # None removes a field
        assert first > before and node.membership.record.seq == first + 1  # same instant: +1
        assert dict(node.membership.record.metadata) == {"round": 42, "algorithm": "noloco", "fingerprint": b"\xab" * 8}
        with pytest.raises(ValueError, match="not one of"):
            node.membership.update_metadata(round=[1])
        await trio.sleep(10)
        for other in swarm.live():
            if other is not node:
                seen = {r.peer_id: r for r in other.membership.live_peers()}[node.peer_id]
                assert seen.seq == node.membership.record.seq and seen.metadata["round"] == 42
        nursery.cancel_scope.cancel()


async def test_forged_stale_and_oversized_messages_are_counted_and_ignored(autojump_clock):
    net = SimNetwork()
    swarm = SimSwarm(net, CONFIG)
    async with trio.open_nursery() as nursery:
        swarm.bind(nursery)
        honest = swarm.start()
        friend = swarm.start([honest.address])
        await trio.sleep(5)
        rogue_id = Identity.from_seed(b"r" * 32)
        rogue = net.add_host(rogue_id.peer_id)
        nursery.start_soon(rogue.run)
        await trio.lowlevel.checkpoint()
        stats = honest.membership.stats
        view_before = dict(honest.membership.core.view)
        wall = int(WALL_EPOCH + trio.current_time())
        mine = sign_record(rogue_id, (rogue.address,), 10, wall + 3600, {})

        def shuffle_body(records, ages=None):
            body = encode_entries([(r, 0.0) for r in records]) if records and not isinstance(records[0], bytes) else {
                "records": records, "ages": ages if ages is not None else [0] * len(records)}
            return {**body, "gone": []}

        # Forged: a record naming the friend's key but signed by the rogue, plus bit flips.
        fake = sign_record(rogue_id, ("sim:66",), 99, wall + 3600, {}).blob
        body = fake[64:].replace(rogue_id.public_key, friend.identity.public_key)
        forged = rogue_id.sign(RECORD_DOMAIN + body) + body
        flipped = mine.blob[:-1] + bytes([mine.blob[-1] ^ 1])
        await rogue.call(honest.address, SHUFFLE.name, shuffle_body([mine.blob, forged, flipped]), timeout=2)
        assert stats.forged == 2
        friend_entry = honest.membership.core.view[friend.peer_id]
        assert friend_entry.record == friend.membership.record  # untouched by the forgery

        # Stale: an older record of the friend, and an expired one of someone else.
        old = friend.membership.record
        friend.membership.update_metadata(round=1)
        await trio.sleep(3)
        assert honest.membership.core.view[friend.peer_id].record.seq == friend.membership.record.seq
        expired = sign_record(Identity.from_seed(b"x" * 32), ("sim:77",), 5, wall - 1, {})
        stale_before = stats.stale
        await rogue.call(honest.address, SHUFFLE.name, shuffle_body([mine, old, expired]), timeout=2)
        assert stats.stale == stale_before + 2
        assert honest.membership.core.view[friend.peer_id].record.seq == friend.membership.record.seq

        # Oversized: more entries than shuffle_len; refused whole, nothing merged.
        crowd = [sign_record(Identity.from_seed(bytes([i]) * 32), (f"sim:{100 + i}",), 1, wall + 3600, {})
                 for i in range(CONFIG.shuffle_len)]
        with pytest.raises(RemoteError, match="at most 8"):
            await rogue.call(honest.address, SHUFFLE.name, shuffle_body([mine] + crowd), timeout=2)
        assert stats.oversized == 1
        assert all(r.peer_id not in honest.membership.core.view for r in crowd)

        # A join or leave with somebody else's record; a leave record that is not one.
        with pytest.raises(RemoteError, match="caller's own"):
            await rogue.call(honest.address, JOIN.name, {"record": friend.membership.record.blob}, timeout=2)
        fake_leave = sign_record(friend.identity, (), friend.membership.record.seq + 1, wall + 60, {})
        with pytest.raises(RemoteError, match="caller's own"):
            await rogue.call(honest.address, LEAVE.name, {"record": fake_leave.blob}, timeout=2)
        with pytest.raises(RemoteError, match="leave record"):
            await rogue.call(honest.address, LEAVE.name, {"record": mine.blob}, timeout=2)
        assert stats.forged == 4
        assert friend.peer_id in honest.membership.core.view  # nobody can make it drop the friend
        # A shuffle without the caller's own record is a protocol error, not a crash.
        with pytest.raises(RemoteError, match="own record"):
            await rogue.call(honest.address, SHUFFLE.name, shuffle_body([old]), timeout=2)

        await trio.sleep(5)  # and the node carries on with its rounds
        assert honest.membership.stats.rounds > 5 and set(view_before) <= set(honest.membership.core.view) | {rogue_id.peer_id}
        nursery.cancel_scope.cancel()


async def test_constructor_checks_its_arguments():
    net = SimNetwork()
    identity = Identity.from_seed(b"i" * 32)
    host = net.add_host(identity.peer_id)
    with pytest.raises(ValueError, match="same Identity"):
        Membership(host, Identity.from_seed(b"j" * 32), CONFIG)
    with pytest.raises(ValueError, match="list of address strings"):
        Membership(host, identity, CONFIG, bootstrap="sim:1")
    with pytest.raises(ValueError, match="metadata"):
        Membership(host, identity, CONFIG, metadata={"k": object()})
    m = Membership(host, identity, CONFIG, bootstrap=["sim:0", host.address, "sim:0"])
    assert m.record.addresses == (host.address,) and m.sample(5) == [] and m.live_peers() == []
