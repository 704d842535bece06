"""Membership at scale: simulated swarms of 100 to 10,000 nodes on trio's virtual clock.

For each size: three bootstraps that know each other, every other node joining through them at
a random moment of the first 2 s, then `--rounds` rounds (1 s each, default config). Reported:

- wall_s: real seconds the simulation took for those rounds (graph checks excluded);
- msgs_per_node_round, bytes_per_node_round: messages (requests + responses) and bytes
  (bodies + buffers + per-message framing, as SimNetwork counts them) sent per node per round;
- rounds_to_connect: rounds (virtual seconds) until the view graph is strongly connected;
- detect_s: after the rounds, 1% of the nodes (at least one) crash at once; virtual seconds
  until no live node's view holds any of them (suspects included). detect_live_s: until no
  live node would still *sample* them (suspects excluded). The design bound is
  max_age_s + round_s (41 s with the defaults).
- indegree_sd: standard deviation of in-degrees at the end of the rounds (mean = view_size).

Per-node work per round is constant (no O(N) scans), so msgs_per_node_round should be flat
across sizes. Targets: 1,000 nodes x 100 rounds in under 60 s; msgs_per_node_round within 1.5x
from 100 to 10,000 nodes. Runs are deterministic for a seed (trio's scheduler RNG is seeded).

    python scripts/bench/membership.py [--sizes 100,1000,10000] [--rounds 100] [--seed 0]
                                       [--json PATH]

JSON: {"runs": [{"nodes", "wall_s", "msgs_per_node_round", "bytes_per_node_round",
"rounds_to_connect", "detect_s", "detect_live_s", "indegree_sd", "cpu_s"}], "config": {...},
"host": {"cpus", "loadavg_start", "loadavg_end"}}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without install

import trio  # noqa: E402
import trio._core._run as trio_run  # noqa: E402
import trio.testing  # noqa: E402

from gossip.membership import MembershipConfig  # noqa: E402
from gossip.sim import SimNetwork  # noqa: E402
from gossip.sim_swarm import SimSwarm, in_degrees, strongly_connected  # noqa: E402

BOOT = ["sim:0", "sim:1", "sim:2"]


async def run_one(n: int, rounds: int, seed: int, config: MembershipConfig) -> dict:
    swarm = SimSwarm(SimNetwork(seed=seed), config, seed=seed)
    wall_checks = 0.0
    connected_at = None
    async with trio.open_nursery() as nursery:
        swarm.bind(nursery)
        for _ in range(3):
            swarm.start(BOOT)
        for _ in range(n - 3):
            swarm.start(BOOT, delay=swarm.rng.uniform(0.0, 2.0))
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for r in range(1, rounds + 1):
            await trio.sleep_until(r * config.round_s)
            if connected_at is None:
                t = time.perf_counter()
                if strongly_connected(swarm.views()):
                    connected_at = r
                wall_checks += time.perf_counter() - t
        wall = time.perf_counter() - wall0 - wall_checks
        cpu = time.process_time() - cpu0
        hosts = [node.host for node in swarm.nodes.values()]
        messages = sum(h.stats.messages_sent for h in hosts)
        nbytes = sum(h.stats.bytes_sent for h in hosts)
        degrees = list(in_degrees(swarm.views()).values())

        victims = swarm.rng.sample(swarm.live()[3:], max(1, n // 100))
        dead = {v.peer_id for v in victims}
        for victim in victims:
            swarm.kill(victim.address)
        killed_at = trio.current_time()
        detect = detect_live = None
        while detect is None and trio.current_time() - killed_at < 10 * config.max_age_s:
            await trio.sleep(0.25)
            elapsed = trio.current_time() - killed_at
            live = swarm.live()
            if detect_live is None and not any(
                r.peer_id in dead for node in live for r in node.membership.live_peers()
            ):
                detect_live = elapsed
            if not any(p in dead for node in live for p in node.membership.core.view):
                detect = elapsed
        nursery.cancel_scope.cancel()
    return {
        "nodes": n,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "msgs_per_node_round": round(messages / (n * rounds), 3),
        "bytes_per_node_round": round(nbytes / (n * rounds), 1),
        "rounds_to_connect": connected_at,
        "detect_s": detect,
        "detect_live_s": detect_live,
        "indegree_sd": round(statistics.pstdev(degrees), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100,1000,10000", help="comma-separated swarm sizes")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if not sizes or min(sizes) < 10 or args.rounds < 5:
        parser.error("sizes must be >= 10 nodes each and rounds >= 5")
    config = MembershipConfig()
    load_start = os.getloadavg()
    runs = []
    print(f"{'nodes':>7} {'wall_s':>8} {'cpu_s':>8} {'msgs/n/r':>9} {'bytes/n/r':>10} "
          f"{'connect':>8} {'detect_s':>9} {'live_s':>7} {'indeg_sd':>9}", flush=True)
    for n in sizes:
        trio_run._r.seed(args.seed)  # trio shuffles its run queue: seed it for a replayable run
        run = trio.run(run_one, n, args.rounds, args.seed, config,
                       clock=trio.testing.MockClock(autojump_threshold=0))
        runs.append(run)
        print(f"{run['nodes']:>7} {run['wall_s']:>8.2f} {run['cpu_s']:>8.2f} {run['msgs_per_node_round']:>9.3f} "
              f"{run['bytes_per_node_round']:>10.1f} {str(run['rounds_to_connect']):>8} "
              f"{str(run['detect_s']):>9} {str(run['detect_live_s']):>7} {run['indegree_sd']:>9.2f}", flush=True)
    msgs = [r["msgs_per_node_round"] for r in runs]
    print(f"msgs/node/round max/min across sizes: {max(msgs) / min(msgs):.3f} (target <= 1.5)")
    report = {
        "runs": runs,
        "rounds": args.rounds,
        "seed": args.seed,
        "config": dataclasses.asdict(config),
        "host": {"cpus": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
