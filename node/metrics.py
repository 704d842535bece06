"""What a node reports: a status snapshot, a JSONL metrics file, and the per-node summary.

One record per line, each a JSON map with `event` and `t` (seconds since the epoch):
- `start`: the node's id, algorithm, config and starting step;
- `train`: step, train loss (bits per byte), tokens, tokens/s, peers, bytes up/down, syncs;
- `eval`: step and held-out loss in bits per byte (`eval_bpb`);
- `sync`, `checkpoint`, `state_sync`, `leave`: single events worth a line;
- `final`: the counters at a clean exit (a `train` record in all but name).
The writer flushes every line, so a killed node's file is whole up to its last record; the reader
skips a torn last line.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Iterable

LN2 = math.log(2.0)


@dataclass(frozen=True)
class NodeStatus:
    """A point-in-time view of one node: what the status line, `murmur status` and metrics show."""

    peer_id: str  # base32 peer id
    algorithm: str
    step: int  # inner steps done (counting steps before a restart)
    loss_bpb: float | None  # last training loss, bits per byte
    eval_bpb: float | None  # last held-out loss, bits per byte
    eval_bpb_start: float | None  # held-out loss at the start of this run
    tokens: int  # tokens trained on in this run
    tokens_per_s: float  # recent training throughput
    peers: int  # live peers in our membership view
    last_sync_s: float | None  # seconds since the last successful outer sync (None: never)
    bytes_sent: int  # bytes on the wire since start, framing included
    bytes_received: int
    send_rate: float  # recent bytes/s up
    recv_rate: float  # recent bytes/s down
    syncs_done: int
    syncs_missed: int
    elapsed_s: float  # seconds since the node started

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RateMeter:
    """Rate of a growing counter over the last `window` seconds (a pure class fed (t, value))."""

    def __init__(self, window: float = 10.0) -> None:
        if window <= 0:
            raise ValueError("window must be > 0 seconds")
        self.window = window
        self._points: list[tuple[float, float]] = []

    def update(self, t: float, value: float) -> float:
        self._points.append((t, value))
        # Keep one point older than the window so the rate spans the whole window.
        while len(self._points) > 2 and self._points[1][0] <= t - self.window:
            self._points.pop(0)
        return self.rate()

    def rate(self) -> float:
        if len(self._points) < 2:
            return 0.0
        (t0, v0), (t1, v1) = self._points[0], self._points[-1]
        return (v1 - v0) / (t1 - t0) if t1 > t0 else 0.0


class MetricsWriter:
    """Appends JSON records to a file, one per line, flushed at once. Closed with `close()`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f: IO[str] | None = open(self.path, "a", encoding="utf-8")

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"event": event, "t": round(time.time(), 3), **fields}
        if self._f is not None:
            self._f.write(json.dumps(record, separators=(",", ":"), allow_nan=False, default=_jsonable) + "\n")
            self._f.flush()
        return record

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    raise TypeError(f"cannot write {type(obj).__name__} to metrics")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every whole record in a metrics file (a torn last line from a killed node is skipped)."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "event" in rec:
                out.append(rec)
    return out


def summary_from_records(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The per-node summary `murmur local --summary` writes, from one node's metrics records.

    Over a file that holds several runs of one node (restarts append), the start loss is the
    first run's first eval and the end loss the last eval; bytes and syncs are summed over runs,
    since each run's counters start from zero.
    """
    node_id = None
    evals: list[float] = []
    runs: list[dict[str, Any]] = []
    last: dict[str, Any] = {}
    steps = 0
    for rec in records:
        ev = rec.get("event")
        if ev == "start":
            node_id = rec.get("id", node_id)
            if last:
                runs.append(last)
            last = {}
        elif ev in ("train", "final"):
            last = rec
            steps = max(steps, int(rec.get("step", 0)))
        elif ev == "eval" and rec.get("eval_bpb") is not None:
            evals.append(float(rec["eval_bpb"]))
            steps = max(steps, int(rec.get("step", 0)))
    if last:
        runs.append(last)

    def total(key: str) -> int:
        return int(sum(int(r.get(key, 0)) for r in runs))

    return {
        "id": node_id,
        "eval_bpb_start": evals[0] if evals else None,
        "eval_bpb_end": evals[-1] if evals else None,
        "bytes_sent": total("bytes_sent"),
        "bytes_received": total("bytes_received"),
        "syncs_done": total("syncs_done"),
        "syncs_missed": total("syncs_missed"),
        "steps": steps,
        "runs": len(runs),
    }


def improvement(start: float | None, end: float | None) -> float | None:
    """Relative drop of the eval loss: 0.25 = 25% below where it started."""
    if start is None or end is None or start <= 0:
        return None
    return (start - end) / start
