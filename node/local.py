"""`murmur local --nodes N`: an N-process swarm on loopback, watched, stopped cleanly, summarised.

Each node is a real `murmur join` process (its own trio loop, TCP transport, identity and
checkpoint folder under the work folder). Node 0 starts first and writes its address to an
ready file; the others bootstrap from it. The parent only reads the nodes' metrics files to
show progress, so it never slows them down. At the end (every node reached its budget, or
Ctrl-C: each node gets SIGTERM, writes a checkpoint and leaves) it prints a per-node table and
optionally writes the summary JSON. Processes are started through `node.launcher.Launcher`, so
every one of them is stopped on the way out, whatever happens (SIGTERM, a grace period, then
SIGKILL of its process group; the kernel kills them too if this process dies).
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from node.config import NodeConfig, build_config, load_toml, to_toml
from node.launcher import Launcher, ManagedProcess
from node.metrics import improvement, read_metrics, summary_from_records
from node.progress import Progress, human_bytes, summary_table

# Defaults of `murmur local` that differ from a node's: a budget, so the demo ends by itself
# (~2-4 minutes for 4 nodes on 2 cores), and evals frequent enough to show the curve.
LOCAL_DEFAULTS: dict[str, Any] = {"steps": 400, "eval_every": 50, "checkpoint_every": 100, "log_every": 2.0}
START_TIMEOUT = 120.0  # seconds for node 0 to load its data and listen
STOP_GRACE = 60.0  # seconds a node gets after SIGTERM to checkpoint and leave before SIGKILL


def local_config(overrides: dict[str, Any], config_path: str | None) -> NodeConfig:
    """Node settings for the swarm: local defaults < TOML file < flags (validated at once)."""
    values = dict(LOCAL_DEFAULTS)
    if overrides.get("duration") is not None and "steps" not in overrides:
        values.pop("steps")  # a time budget alone replaces the default step budget
    if config_path is not None:
        values.update(load_toml(config_path))
    values.update(overrides)
    return build_config(values, checkpoint_dir="unused")


def _node_argv(cfg_file: Path, ready: Path | None) -> list[str]:
    argv = [sys.executable, "-m", "node", "join", "--config", str(cfg_file)]
    if ready is not None:
        argv += ["--ready-file", str(ready)]
    return argv


def _wait_for_ready(proc: ManagedProcess, path: Path, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())["addresses"]
        if not proc.running:
            raise RuntimeError(f"node 0 exited with code {proc.returncode} before listening: {_tail(proc)}")
        time.sleep(0.1)
    raise RuntimeError(f"node 0 did not start listening within {timeout:g}s (see {proc.log_path})")


def _tail(proc: ManagedProcess) -> str:
    return " | ".join(proc.tail(3).splitlines())


class _Tail:
    """Reads new whole records from a growing metrics file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.latest: dict[str, Any] = {}  # last record of each event kind

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                self.latest[rec.get("event")] = rec


def _swarm_line(tails: list[_Tail], steps: int | None, started: float) -> str:
    """`[  94s] steps 219 230 227 225 /400 | eval bpb 3.49 3.50 3.51 3.50 | syncs ... | up ... down ...`"""
    step_s, eval_s = [], []
    sent = received = done = missed = 0
    for t in tails:
        tr = t.latest.get("final") or t.latest.get("train") or {}
        ev = t.latest.get("eval", {})
        step_s.append(str(max(int(tr.get("step", 0)), int(ev.get("step", 0)))))
        eval_s.append("-" if ev.get("eval_bpb") is None else f"{ev['eval_bpb']:.2f}")
        sent += int(tr.get("bytes_sent", 0))
        received += int(tr.get("bytes_received", 0))
        done += int(tr.get("syncs_done", 0))
        missed += int(tr.get("syncs_missed", 0))
    budget = f" /{steps}" if steps else ""
    return (
        f"[{time.monotonic() - started:5.0f}s] steps {' '.join(step_s)}{budget} | eval bpb {' '.join(eval_s)} | "
        f"syncs {done} ok {missed} missed | up {human_bytes(sent)} down {human_bytes(received)}"
    )


def run_local(
    nodes: int,
    overrides: dict[str, Any],
    *,
    config_path: str | None = None,
    workdir: str | None = None,
    summary: str | None = None,
    progress: Progress | None = None,
) -> int:
    cfg = local_config(overrides, config_path)
    from node.trainer import check_algorithm

    check_algorithm(cfg)  # a setting the algorithm refuses fails once, here, not in N processes
    out = progress or Progress(sys.stderr)
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="murmur-local-"))
    root.mkdir(parents=True, exist_ok=True)
    out.log(f"murmur local: {nodes} nodes, {cfg.algorithm}, "
            + (f"{cfg.steps} steps" if cfg.steps else f"{cfg.duration:g}s") + f", work folder {root}")
    launcher = Launcher(log_dir=root / "logs", stop_timeout_s=STOP_GRACE, die_with_parent=True)
    procs: list[ManagedProcess] = []
    tails: list[_Tail] = []
    started = time.monotonic()
    interrupted = False
    codes: list[int] = []

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # SIGTERM to the parent stops the swarm like Ctrl-C does

    old_term = signal.signal(signal.SIGTERM, on_term)
    # Installed explicitly: a shell starts background jobs with SIGINT ignored, and Python then
    # keeps ignoring it, so Ctrl-C (or a harness's SIGINT) would not stop the swarm.
    old_int = signal.signal(signal.SIGINT, on_term)
    try:
        bootstrap: tuple[str, ...] = ()
        for i in range(nodes):
            node_dir = root / f"node-{i}"
            node_dir.mkdir(parents=True, exist_ok=True)
            node_cfg = build_config(
                {k: getattr(cfg, k) for k in cfg.__dataclass_fields__ if k not in ("checkpoint_dir", "metrics", "listen", "announce", "bootstrap", "identity")},
                listen=("127.0.0.1:0",), bootstrap=bootstrap, checkpoint_dir=str(node_dir),
                metrics=str(node_dir / "metrics.jsonl"),
                # Start together: every node waits for the swarm (as much of it as a partial
                # membership view holds) before its first step.
                min_peers=cfg.min_peers or min(nodes - 1, 16), join_timeout=max(cfg.join_timeout, START_TIMEOUT),
            )
            cfg_file = node_dir / "node.toml"
            cfg_file.write_text(to_toml(node_cfg))
            ready = node_dir / "address.json" if i == 0 else None
            if ready is not None:
                ready.unlink(missing_ok=True)
            procs.append(launcher.start(_node_argv(cfg_file, ready), name=f"node-{i}"))
            tails.append(_Tail(node_dir / "metrics.jsonl"))
            if i == 0:
                bootstrap = tuple(_wait_for_ready(procs[0], ready, START_TIMEOUT))
                out.log(f"murmur local: node 0 listens on {', '.join(bootstrap)}; starting {nodes - 1} more")
        last_plain = 0.0
        while any(p.running for p in procs):
            time.sleep(1.0)
            for t in tails:
                t.poll()
            line = _swarm_line(tails, cfg.steps, started)
            if out.live:
                out.update(line)
            elif time.monotonic() - last_plain >= 10.0:
                out.update(line)
                last_plain = time.monotonic()
    except KeyboardInterrupt:
        interrupted = True
        out.log("murmur local: interrupted; stopping every node (each writes a checkpoint)")
    finally:
        codes = launcher.stop_all()  # SIGTERM: each node checkpoints and leaves; SIGKILL after the grace
        launcher.close()
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
        out.close()
    rows = []
    for i, p in enumerate(procs):
        path = root / f"node-{i}" / "metrics.jsonl"
        row = summary_from_records(read_metrics(path)) if path.exists() else {"id": None}
        row["exit_code"] = codes[i]
        rows.append(row)
    wall = time.monotonic() - started
    print(summary_table(rows))
    improved = [improvement(r.get("eval_bpb_start"), r.get("eval_bpb_end")) for r in rows]
    ok = all(x is not None and x >= 0.10 for x in improved)
    print(f"{len(rows)} nodes in {wall:.0f}s; every node's eval loss at least 10% below its start: {'yes' if ok else 'no'}")
    print(f"checkpoints and metrics in {root}/node-*, logs in {root}/logs  (plot: murmur plot {root}/node-*/metrics.jsonl -o swarm.png)")
    if summary:
        payload = {"nodes": rows, "algorithm": cfg.algorithm, "steps": cfg.steps, "wall_s": round(wall, 1),
                   "workdir": str(root), "all_improved_10pct": ok}
        Path(summary).write_text(json.dumps(payload, indent=2) + "\n")
    failed = [i for i, c in enumerate(codes) if c != 0]
    if interrupted:
        return 130
    if failed:
        for i in failed:
            print(f"murmur: error: node {i} exited with code {codes[i]}: {_tail(procs[i])} (log: {procs[i].log_path})", file=sys.stderr)
        return 1
    return 0
