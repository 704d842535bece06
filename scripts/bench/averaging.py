"""group_average over loopback TCP: N node processes average one float32 vector, round after round.

Each node is one process (spawned with multiprocessing): a real TCP transport (Noise channel,
RPC), a `Collectives` on a static peer list, and the project codec given by `--codec`. Node i
averages `default_rng(i).standard_normal(numel)` with weight 1. A launcher process starts the
rounds together (a barrier over pipes) so a round's time is from the first node's call to the
last node's return (CLOCK_MONOTONIC is shared by the processes of one machine).

Reported: the first round (connections and handshakes included), the steady-state round (median
of the later rounds), a baseline measured in the same run (after each round, every node swaps
with every other node exactly the bytes group_average moves with fp32, over the same connections,
with no averaging: what the machine and the transport allow), node processes, their total peak RSS (VmHWM, read right after the rounds,
before the check below allocates anything), whether every round was `complete` on every node, and
the largest |error| of the last round's result against the exact float64 mean, computed by each
node after the timing.

For comparison (from the issue): hivemind 1.1.12 averaging 10M floats among 4 peers took
0.9-1.1 s per steady-state round and 1.1-2.0 s for the first, with 13 processes and ~1.2 GB.

    python scripts/bench/averaging.py [--peers 4] [--numel 10000000] [--rounds 6]
                                      [--codec fp32] [--json PATH]

JSON keys: peers, numel, codec, first_round_s, steady_round_s, rounds_s (list), baseline_round_s,
baseline_rounds_s (list), ratio_to_baseline (steady_round_s / baseline_round_s), processes,
total_rss_mb, per_node_rss_mb (list), per_node_base_rss_mb (list: RSS before the first round),
launcher_rss_mb, all_complete (every node, every round: `AverageResult.complete` over all peers),
min_fraction and min_contributors (the lowest coverage any node reported), max_abs_error,
cpu_s_per_node_round (median CPU time of one node in a steady round, all its threads),
hivemind_steady_round_s (1.0, midpoint of the reported range), speedup_vs_hivemind.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without install

import numpy as np  # noqa: E402

from gossip import messages  # noqa: E402
from gossip.averaging import shard_bounds  # noqa: E402
from gossip.transport import Request, Response  # noqa: E402

# The baseline's one message: a slice out, a slice back (the bytes of group_average, fp32).
SWAP = messages.define(
    "bench.swap", 1, messages.Map({}), messages.Map({}),
    max_request_buffers=1, max_response_buffers=1, max_buffer_bytes=1 << 31,
)

HIVEMIND_STEADY_S = 1.0  # midpoint of 0.9-1.1 s (issue 5)
HIVEMIND_FIRST_S = (1.1, 2.0)
HIVEMIND_PROCESSES = 13
HIVEMIND_RSS_MB = 1200


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _node(index: int, args: argparse.Namespace, conn: Any) -> None:
    """One node process: serve, then run the rounds the launcher starts."""
    import trio

    trio.run(_node_main, index, args, conn)


async def _node_main(index: int, args: argparse.Namespace, conn: Any) -> None:
    import trio

    from compression.base import get_codec
    from gossip.collectives import Collectives, CollectivesConfig, StaticPeer, StaticPeers
    from gossip.identity import Identity, SwarmKey
    from gossip.tcp import open_tcp_transport

    x = np.random.default_rng(index).standard_normal(args.numel, dtype=np.float32)
    codec = get_codec(args.codec)
    config = CollectivesConfig(matchmaking_window=args.window)
    async with open_tcp_transport(Identity.generate(), SwarmKey.open("bench-averaging"), listen=["127.0.0.1:0"]) as transport:
        conn.send((transport.peer_id, list(transport.addresses)))
        peers = await trio.to_thread.run_sync(conn.recv)
        others = [StaticPeer(pid, tuple(addrs)) for pid, addrs in peers if pid != transport.peer_id]
        col = Collectives(transport, StaticPeers(others), config)
        # The baseline: the same bytes on the same connections with no averaging at all. Node i
        # sends every other node j the slice j of its vector and gets j's own slice j back.
        ids = sorted(pid for pid, _ in peers)
        me = ids.index(transport.peer_id)
        bounds = shard_bounds(args.numel, len(ids))
        mine = memoryview(x[bounds[me][0] : bounds[me][1]]).cast("B")

        async def swap(req: Request) -> Response:
            return Response({}, [mine])

        transport.route(SWAP.name, swap)

        async def baseline() -> None:
            async def one(pid: bytes, addrs: tuple[str, ...]) -> None:
                lo, hi = bounds[ids.index(pid)]
                reply = await transport.call(addrs[0], SWAP.name, {}, [memoryview(x[lo:hi]).cast("B")],
                                             timeout=args.timeout, peer_id=pid)
                assert sum(len(b) for b in reply.buffers) == 4 * (hi - lo)

            async with trio.open_nursery() as nursery:
                for peer in others:
                    nursery.start_soon(one, peer.peer_id, peer.addresses)

        base_kb = _status_kb("VmRSS")  # interpreter, torch, the transport and our input
        rounds, base_rounds = [], []
        result = None
        for r in range(args.rounds):
            await trio.to_thread.run_sync(conn.recv)  # the barrier: "go"
            cpu0 = time.process_time()
            start = time.monotonic()
            result = await col.group_average(f"bench/{r}", [x], codec, timeout=args.timeout)
            end = time.monotonic()
            rounds.append((
                start, end, result.complete, len(result.group), time.process_time() - cpu0,
                min(result.fractions), len(result.contributors),
            ))
            conn.send(("done", r))
            await trio.to_thread.run_sync(conn.recv)  # the barrier: "go"
            start = time.monotonic()
            await baseline()
            base_rounds.append((start, time.monotonic()))
            conn.send(("done", r))
        peak_kb = _status_kb("VmHWM")
        assert result is not None
        exact = np.zeros(args.numel, np.float64)
        for j in range(args.peers):
            exact += np.random.default_rng(j).standard_normal(args.numel, dtype=np.float32)
        exact /= args.peers
        error = float(np.max(np.abs(result.tensors[0].astype(np.float64) - exact)))
        conn.send(("result", {
            "rounds": rounds, "base_rounds": base_rounds, "peak_kb": peak_kb, "base_kb": base_kb, "error": error,
        }))
        await trio.to_thread.run_sync(conn.recv)  # stay up until everyone is done


def run(args: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for i in range(args.peers):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_node, args=(i, args, child), daemon=True)
        p.start()
        pipes.append(parent)
        procs.append(p)
    try:
        peers = [_recv(p, 120) for p in pipes]
        for p in pipes:
            p.send(peers)
        for r in range(2 * args.rounds):  # each round: group_average, then the baseline
            for p in pipes:
                p.send("go")
            for p in pipes:
                _recv(p, args.timeout + 60)
        results = [_recv(p, 600)[1] for p in pipes]
        for p in pipes:
            p.send("bye")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    def spans(key: str) -> list[float]:
        return [max(res[key][r][1] for res in results) - min(res[key][r][0] for res in results)
                for r in range(args.rounds)]

    rounds_s, base_s = spans("rounds"), spans("base_rounds")
    steady = statistics.median(rounds_s[1:]) if len(rounds_s) > 1 else rounds_s[0]
    base_steady = statistics.median(base_s[1:]) if len(base_s) > 1 else base_s[0]
    rss = [res["peak_kb"] / 1024 for res in results]
    # CPU seconds (all threads) one node spends in a steady-state round, median over nodes and rounds.
    cpu = statistics.median(res["rounds"][r][4] for res in results for r in range(min(1, args.rounds - 1), args.rounds))
    return {
        "peers": args.peers,
        "numel": args.numel,
        "codec": args.codec,
        "first_round_s": rounds_s[0],
        "steady_round_s": steady,
        "rounds_s": rounds_s,
        "baseline_round_s": base_steady,
        "baseline_rounds_s": base_s,
        "ratio_to_baseline": steady / base_steady,
        "processes": len(procs),
        "total_rss_mb": sum(rss),
        "per_node_rss_mb": rss,
        "per_node_base_rss_mb": [res["base_kb"] / 1024 for res in results],
        "launcher_rss_mb": _status_kb("VmHWM") / 1024,
        "all_complete": all(row[2] and row[3] == args.peers for res in results for row in res["rounds"]),
        "min_fraction": min(row[5] for res in results for row in res["rounds"]),
        "min_contributors": min(row[6] for res in results for row in res["rounds"]),
        "cpu_s_per_node_round": cpu,
        "max_abs_error": max(res["error"] for res in results),
        "hivemind_steady_round_s": HIVEMIND_STEADY_S,
        "speedup_vs_hivemind": HIVEMIND_STEADY_S / steady,
    }


def _recv(conn: Any, timeout: float) -> Any:
    if not conn.poll(timeout):
        raise SystemExit(f"a node process did not answer within {timeout:g} s")
    return conn.recv()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=int, default=4, help="node processes (>= 2)")
    ap.add_argument("--numel", type=int, default=10_000_000, help="float32 values per node")
    ap.add_argument("--rounds", type=int, default=6, help="rounds; the first is reported apart")
    ap.add_argument("--codec", default="fp32", help="a compression codec name (fp32, bf16, int8, ...)")
    ap.add_argument("--window", type=float, default=5.0, help="matchmaking window, s")
    ap.add_argument("--timeout", type=float, default=60.0, help="group_average timeout, s")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.peers < 2 or args.numel < 1 or args.rounds < 1:
        ap.error("need --peers >= 2, --numel >= 1, --rounds >= 1")
    out = run(args)
    print(f"group_average over loopback TCP: {out['peers']} node processes, "
          f"{out['numel']:,} float32 each, codec {out['codec']}")
    rows = [
        ("first round", f"{out['first_round_s']:.3f} s", f"{HIVEMIND_FIRST_S[0]}-{HIVEMIND_FIRST_S[1]} s"),
        ("steady-state round (median)", f"{out['steady_round_s']:.3f} s", "0.9-1.1 s"),
        ("  same bytes, no averaging", f"{out['baseline_round_s']:.3f} s", ""),
        ("processes", str(out["processes"]), str(HIVEMIND_PROCESSES)),
        ("total peak RSS (nodes)", f"{out['total_rss_mb']:.0f} MB", f"~{HIVEMIND_RSS_MB} MB"),
        ("  of which before round 1", f"{sum(out['per_node_base_rss_mb']):.0f} MB", ""),
        ("every round complete", str(out["all_complete"]), "(reported success on partial rounds)"),
        ("lowest coverage reported", f"{out['min_fraction']:.0%}, {out['min_contributors']}/{out['peers']} peers", ""),
        ("max |error| vs exact mean", f"{out['max_abs_error']:.2e}", ""),
        ("CPU s per node per round", f"{out['cpu_s_per_node_round']:.3f} s", ""),
    ]
    print(f"{'':30} {'murmur':>14}   {'hivemind 1.1.12':>20}")
    for name, ours, theirs in rows:
        print(f"{name:30} {ours:>14}   {theirs:>20}")
    print(f"rounds: {', '.join(f'{t:.3f}' for t in out['rounds_s'])} s;"
          f" baseline: {', '.join(f'{t:.3f}' for t in out['baseline_rounds_s'])} s")
    print(f"group_average / baseline: {out['ratio_to_baseline']:.2f}x;"
          f" speed-up vs hivemind steady state: {out['speedup_vs_hivemind']:.1f}x")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
