"""Real `murmur` processes on loopback: a 3-node swarm trains, survives a SIGKILL, the killed node
resumes from its checkpoint, a late joiner copies a donor's model, SIGTERM checkpoints and exits
0, `murmur status` answers, and network mistakes are one-line errors.

Tiny models and step budgets keep each process test well under a minute on two busy cores."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.checkpoint import CheckpointStore
from node.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
TINY = ["--d-model", "32", "--n-layer", "1", "--n-head", "2", "--context", "32", "--batch-size", "4",
        "--eval-seqs", "8", "--warmup", "5", "--lr", "3e-3", "--sync-timeout", "5", "--log-every", "0.5"]


class Procs:
    """Starts `python -m node ...` processes in their own process groups; kills them all at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []

    def start(self, *argv: str, log: str) -> subprocess.Popen:
        out = open(self.tmp / log, "wb")
        proc = subprocess.Popen([sys.executable, "-m", "node", *argv], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        proc.log_path = self.tmp / log
        self.procs.append(proc)
        return proc

    def node(self, name: str, *extra: str, announce: bool = False) -> subprocess.Popen:
        argv = ["join", "--checkpoint-dir", str(self.tmp / name), "--listen", "127.0.0.1:0", *TINY, *extra]
        if announce:
            argv += ["--ready-file", str(self.tmp / f"{name}.addr")]
        return self.start(*argv, log=f"{name}.log")

    def address(self, name: str, proc: subprocess.Popen, timeout: float = 60.0) -> str:
        path = self.tmp / f"{name}.addr"
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert proc.poll() is None, f"{name} exited early: {proc.log_path.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"{name} did not start listening"
            time.sleep(0.1)
        return json.loads(path.read_text())["addresses"][0]

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()


@pytest.fixture
def procs(tmp_path):
    ps = Procs(tmp_path)
    try:
        yield ps
    finally:
        ps.kill_all()


def metrics(tmp: Path, name: str, event: str | None = None) -> list[dict]:
    path = tmp / name / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in read_metrics(path) if event is None or r["event"] == event]


def step_of(tmp: Path, name: str) -> int:
    recs = metrics(tmp, name, "train") + metrics(tmp, name, "eval")
    return max((int(r["step"]) for r in recs), default=-1)


def wait_until(cond, timeout: float, what: str, proc_list=()) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for p in proc_list:
            assert p.poll() is None, f"a process exited early ({what}): {p.log_path.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def finish(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"process did not exit in {timeout}s: {proc.log_path.read_text()[-2000:]}")


def test_three_node_swarm_survives_a_kill_and_the_node_resumes(procs, tmp_path):
    # No step budget: the test decides when the run ends (SIGTERM), so the speed of this busy
    # machine does not matter.
    common = ["--sync-every", "10", "--eval-every", "40", "--checkpoint-every", "20", "--sync-timeout", "2"]
    a = procs.node("a", *common, "--min-peers", "2", "--join-timeout", "60", announce=True)  # all start at step 0
    boot = procs.address("a", a)
    b = procs.node("b", *common, "--bootstrap", boot, "--min-peers", "2", "--join-timeout", "60")
    c = procs.node("c", *common, "--bootstrap", boot)
    wait_until(lambda: CheckpointStore(tmp_path / "c").paths(), 120, "c's first checkpoint", [a, b, c])
    assert metrics(tmp_path, "c", "start")[0]["step"] == 0
    os.killpg(c.pid, signal.SIGKILL)
    c.wait()
    saved = CheckpointStore(tmp_path / "c").paths()[0][0]
    # The others keep training without c.
    before = {n: step_of(tmp_path, n) for n in ("a", "b")}
    wait_until(lambda: all(step_of(tmp_path, n) >= before[n] + 40 for n in ("a", "b")), 120, "a and b to go on", [a, b])
    c2 = procs.node("c", *common, "--bootstrap", boot)
    def c_trained_on() -> bool:
        starts = metrics(tmp_path, "c", "start")
        return len(starts) == 2 and step_of(tmp_path, "c") >= starts[1]["step"] + 20

    wait_until(c_trained_on, 120, "c to train on after its restart", [a, b, c2])
    for p in (a, b, c2):
        p.send_signal(signal.SIGTERM)
    for p in (a, b, c2):
        assert finish(p, 120) == 0, p.log_path.read_text()[-2000:]
    resume = metrics(tmp_path, "c", "resume")
    assert len(resume) == 1 and resume[0]["step"] == saved >= 20
    # The swarm went on by more than one outer round meanwhile: c caught up from a peer.
    catch_up = metrics(tmp_path, "c", "state_sync")
    assert len(catch_up) == 1 and catch_up[0]["step"] > saved + 10
    assert metrics(tmp_path, "c", "start")[-1]["step"] == catch_up[0]["step"]
    for name in ("a", "b", "c"):
        evals = metrics(tmp_path, name, "eval")
        assert len(evals) >= 2 and evals[-1]["eval_bpb"] < 0.9 * evals[0]["eval_bpb"], (name, evals)
        assert metrics(tmp_path, name, "final")[-1]["reason"] == "SIGTERM"
    assert sum(metrics(tmp_path, n, "final")[-1]["syncs_done"] for n in ("a", "b", "c")) >= 6


def test_late_joiner_copies_donor_and_sigterm_checkpoints(procs, tmp_path):
    donor = procs.node("donor", "--sync-every", "10", "--checkpoint-every", "10", "--eval-every", "50", announce=True)
    boot = procs.address("donor", donor)
    wait_until(lambda: len(CheckpointStore(tmp_path / "donor").paths()) >= 2, 120, "donor checkpoints", [donor])
    joiner = procs.node("joiner", "--steps", "5", "--bootstrap", boot, "--sync-every", "100")
    assert finish(joiner, 120) == 0, joiner.log_path.read_text()[-2000:]
    sync = metrics(tmp_path, "joiner", "state_sync")
    assert len(sync) == 1 and sync[0]["step"] >= 10
    published = {r["snapshot"]: r for r in metrics(tmp_path, "donor", "publish")}
    assert sync[0]["model_hash"] == published[sync[0]["snapshot"]]["model_hash"]
    # `murmur status` asks the donor over the secure wire.
    status = subprocess.run([sys.executable, "-m", "node", "status", boot, "--json"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    answer = json.loads(status.stdout)
    assert answer["algorithm"] == "noloco" and answer["step"] >= 10 and answer["peer_id"] == metrics(tmp_path, "donor", "start")[0]["id"]
    # SIGTERM: a final checkpoint at the step it stopped at, and exit code 0.
    donor.send_signal(signal.SIGTERM)
    assert finish(donor, 60) == 0
    final = metrics(tmp_path, "donor", "final")[-1]
    assert final["reason"] == "SIGTERM"
    assert CheckpointStore(tmp_path / "donor").paths()[0][0] == final["step"]
    assert CheckpointStore(tmp_path / "donor").load_latest().step == final["step"]


def test_network_mistakes_are_one_line_errors(procs, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = procs.start("join", "--checkpoint-dir", str(tmp_path / "x"), "--listen", f"127.0.0.1:{port}", *TINY, log="busy.log")
        assert finish(p, 60) == 1
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]  # bound, never listening: connections are refused
        q = procs.start("join", "--checkpoint-dir", str(tmp_path / "y"), "--bootstrap", f"127.0.0.1:{dead}",
                        "--join-timeout", "2", *TINY, log="refused.log")
        assert finish(q, 60) == 1
    busy_err = p.log_path.read_text().strip().splitlines()
    assert busy_err[-1].startswith("murmur: error: ") and "address already in use" in busy_err[-1].lower()
    refused = q.log_path.read_text().strip().splitlines()
    assert refused[-1].startswith(f"murmur: error: cannot join the swarm within 2s: 127.0.0.1:{dead}")
    for text in (p.log_path.read_text(), q.log_path.read_text()):
        assert "Traceback" not in text


def test_murmur_local_runs_a_swarm_and_writes_the_summary(tmp_path):
    summary = tmp_path / "summary.json"
    proc = subprocess.run(
        [sys.executable, "-m", "node", "local", "--nodes", "2", "--steps", "40", "--sync-every", "10", "--eval-every", "20",
         *TINY, "--workdir", str(tmp_path / "swarm"), "--summary", str(summary)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(summary.read_text())
    assert len(data["nodes"]) == 2 and data["steps"] == 40
    for row in data["nodes"]:
        assert set(row) >= {"id", "eval_bpb_start", "eval_bpb_end", "bytes_sent", "bytes_received", "syncs_done", "syncs_missed"}
        assert row["eval_bpb_end"] < row["eval_bpb_start"] and row["exit_code"] == 0
        assert row["bytes_sent"] > 0 and row["syncs_done"] + row["syncs_missed"] == 4
    assert "eval start" in proc.stdout and "every node's eval loss" in proc.stdout


def test_murmur_local_ctrl_c_stops_every_node_cleanly(procs, tmp_path):
    work = tmp_path / "swarm"
    parent = procs.start("local", "--nodes", "2", "--duration", "600", "--sync-every", "10", *TINY,
                         "--workdir", str(work), "--summary", str(tmp_path / "s.json"), log="local.log")
    wait_until(lambda: all(step_of(work, f"node-{i}") >= 20 for i in range(2)), 120, "both nodes to train", [parent])
    parent.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
    assert finish(parent, 90) == 130
    for i in range(2):
        final = metrics(work, f"node-{i}", "final")
        assert len(final) == 1 and final[0]["reason"] == "SIGTERM"
        assert CheckpointStore(work / f"node-{i}").paths()[0][0] == final[0]["step"]
    out = parent.log_path.read_text()
    assert "interrupted; stopping every node" in out and "Traceback" not in out
    assert [r["exit_code"] for r in json.loads((tmp_path / "s.json").read_text())["nodes"]] == [0, 0]
