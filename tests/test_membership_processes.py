"""Eight real processes on loopback TCP form one swarm from one bootstrap address; the rest
detect two SIGKILLed members; a SIGTERMed member announces its leave and exits 0."""

import json
import sys
import time

from launcher_fixture import launcher  # noqa: F401  (the fixture)

NODES = 8
# Fast rounds so the whole test takes seconds: a dead peer is out of every view within
# max_age_s + round_s = 6.2 s at the latest, usually after probe + suspicion (~1.5 s).
TIMING = ["--round-s", "0.2", "--max-age-s", "6", "--suspicion-s", "1", "--probe-timeout-s", "0.3",
          "--call-timeout-s", "0.5", "--leave-timeout-s", "1", "--status-every-s", "0.2"]


def node_argv(*extra: str) -> list[str]:
    return [sys.executable, "-m", "node.membership_node", "--listen", "127.0.0.1:0", *TIMING, *extra]


def latest_status(proc, after: int = 0) -> dict | None:
    """The last status line `proc` printed, if it printed one after its first `after` lines."""
    for line in reversed(proc.lines()[after:]):
        if line.startswith('{"event":"status"'):
            return json.loads(line)
    return None


def wait_until(condition, timeout: float, what: str, procs) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.tail(3)}" for p in procs)
            raise AssertionError(f"not within {timeout}s: {what}\n{tails}")
        for p in procs:
            assert p.running, f"{p.name} exited with {p.returncode}:\n{p.tail()}"
        time.sleep(0.1)


def test_eight_processes_one_swarm_two_crashes_one_leave(launcher):
    first = launcher.start(node_argv(), name="node0")
    hello = json.loads(first.wait_for_line(lambda l: l.startswith('{"event":"listening"'), timeout=60))
    bootstrap = hello["addresses"][0]
    procs = [first] + [launcher.start(node_argv("--bootstrap", bootstrap), name=f"node{i}") for i in range(1, NODES)]
    ids = {first.name: hello["peer_id"]}
    for proc in procs[1:]:
        ids[proc.name] = json.loads(proc.wait_for_line(lambda l: l.startswith('{"event":"listening"'), timeout=60))["peer_id"]
    assert len(set(ids.values())) == NODES

    def knows_all(members) -> bool:
        for p in members:
            status = latest_status(p)
            if status is None or set(status["live"]) != {ids[q.name] for q in members if q is not p}:
                return False
        return True

    wait_until(lambda: knows_all(procs), 60, "every node lists the 7 others as live", procs)

    victims = [procs[3], procs[6]]
    dead = {ids[v.name] for v in victims}
    for victim in victims:
        launcher.kill(victim)
    survivors = [p for p in procs if p not in victims]
    seen = {p.name: len(p.lines()) for p in survivors}  # only statuses printed after the kill count

    def dead_gone() -> bool:
        statuses = [latest_status(p, seen[p.name]) for p in survivors]
        return all(s is not None and not dead & set(s["view"]) for s in statuses)

    wait_until(dead_gone, 30, "no survivor's view holds a killed node", survivors)
    assert knows_all(survivors)
    removed = sum(latest_status(p)["stats"]["removed"] + latest_status(p)["stats"]["aged_out"] for p in survivors)
    assert removed >= 2 * len(survivors)  # each survivor dropped both, by probes (or age)

    leaver = survivors.pop()
    left_before = sum(latest_status(p)["stats"]["left"] for p in survivors)
    assert launcher.stop(leaver) == 0
    assert leaver.lines()[-1] == json.dumps({"event": "left", "peer_id": ids[leaver.name]}, separators=(",", ":"))
    wait_until(lambda: knows_all(survivors), 30, "the leaver is out of every view", survivors)
    left_after = sum(latest_status(p)["stats"]["left"] for p in survivors)
    assert left_after > left_before  # its leave announcement arrived, not just a timeout
    assert all(latest_status(p)["stats"]["forged"] == 0 for p in survivors)


def test_bad_flags_and_a_taken_port_are_one_line_errors():
    import socket
    import subprocess

    bad = subprocess.run(node_argv("--bootstrap", "no-port"), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("no port; write host:port, e.g. 127.0.0.1:7000")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [sys.executable, "-m", "node.membership_node", "--listen", f"127.0.0.1:{port}"]
        busy = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert busy.returncode == 1 and busy.stdout == ""
    lines = busy.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("membership_node: error:") and "in use" in lines[0]
