"""End to end: the hooks in training threads, TrioComm, and the real `gossip.collectives` on a
SimNetwork (real clock: training runs in threads, so trio's virtual clock cannot be used)."""

from __future__ import annotations

import random

import numpy as np
import torch
import trio

from gossip.collectives import Collectives, CollectivesConfig, StaticPeer, StaticPeers
from gossip.sim import LinkSpec, SimNetwork
from optimizers.comm import LocalGroup, TrioComm
from optimizers.factory import make_outer

CONFIG = CollectivesConfig(matchmaking_window=3.0, max_group=2, join_slack=0.5, hello_timeout=1.0, pair_hold_timeout=1.0,
                           pair_call_timeout=2.0, pair_retry_delay=0.02)
ROUNDS, H = 2, 2


def train(comm, rank: int, algorithm: str, **options) -> tuple[list[float], object]:
    model = torch.nn.Linear(3, 2)
    gen = torch.Generator().manual_seed(0)  # same initial weights on every node (no global RNG:
    with torch.no_grad():                   # the nodes' threads run at once)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(rank))
    with make_outer(algorithm, model, opt, comm, sync_every=H, timeout=10.0, **options) as outer:
        for _ in range(ROUNDS * H):
            opt.zero_grad()
            (model(x) - x[:, :2]).pow(2).mean().backward()
            opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist(), outer.stats


async def swarm(n: int, algorithm: str, **options) -> dict[int, tuple]:
    net = SimNetwork(seed=0, default_link=LinkSpec(latency=0.001, bandwidth=1e9))
    hosts = [net.add_host(bytes([i + 1]) * 32) for i in range(n)]
    records = [StaticPeer(h.peer_id, h.addresses) for h in hosts]
    cols = [Collectives(h, StaticPeers([r for r in records if r.peer_id != h.peer_id], random.Random(i)), CONFIG,
                        rng=random.Random(100 + i)) for i, h in enumerate(hosts)]
    results: dict[int, tuple] = {}
    async with trio.open_nursery() as nursery:
        for i, host in enumerate(hosts):
            async def node(_host, i=i) -> None:
                async with trio.open_nursery() as comm_nursery:
                    comm = TrioComm(cols[i], trio.lowlevel.current_trio_token(), comm_nursery)
                    results[i] = await trio.to_thread.run_sync(lambda: train(comm, i, algorithm, **options))
            nursery.start_soon(host.run, node)
        while len(results) < n:
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    return results


async def test_diloco_over_trio_comm_and_real_collectives_matches_local_group() -> None:
    results = await swarm(2, "diloco", codec="fp32")
    (p0, s0), (p1, s1) = results[0], results[1]
    assert p0 == p1  # both applied the same averaged pseudo-gradients
    assert (s0.syncs_done, s0.syncs_missed, s0.rejected) == (ROUNDS, 0, 0)
    # The same run on the in-process LocalGroup lands on the same weights.
    group = LocalGroup(2)
    local = {}

    def run_local(r: int) -> None:
        local[r] = train(group.comm(r), r, "diloco", codec="fp32")

    async with trio.open_nursery() as n:
        for r in range(2):
            n.start_soon(trio.to_thread.run_sync, run_local, r)
    np.testing.assert_allclose(local[0][0], p0, rtol=0, atol=1e-6)


async def test_noloco_over_trio_comm_and_real_collectives_pairs_every_round() -> None:
    results = await swarm(2, "noloco", codec="bf16")
    for params, stats in results.values():
        assert (stats.syncs_done, stats.syncs_missed, stats.rejected) == (ROUNDS, 0, 0)
        assert stats.bytes_sent > 0 and all(np.isfinite(params))
