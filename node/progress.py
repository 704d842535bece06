"""Human-readable progress: a live status line on a terminal, plain log lines elsewhere.

The formatting is pure functions of a `NodeStatus` (tested against exact strings); `Progress`
only decides how to put a line on the stream: on a terminal it rewrites one line in place
(carriage return + erase), so a long run does not scroll; in a pipe or file it prints whole lines.
"""

from __future__ import annotations

import sys
from typing import IO, Sequence

from node.metrics import NodeStatus

_UNITS = ("B", "KB", "MB", "GB", "TB")


def human_bytes(n: float) -> str:
    """1536 -> '1.5KB'; decimal units (1 KB = 1000 B), as network rates are quoted."""
    n = float(n)
    for unit in _UNITS:
        if abs(n) < 1000 or unit == _UNITS[-1]:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_rate(bytes_per_s: float) -> str:
    return human_bytes(bytes_per_s) + "/s"


def human_duration(seconds: float | None) -> str:
    """65 -> '1m05s'; None -> 'never'."""
    if seconds is None:
        return "never"
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def status_line(st: NodeStatus) -> str:
    """One line: step, losses, throughput, peers, last sync, bytes and rates."""
    return (
        f"{st.peer_id[:8]} step {st.step} loss {_num(st.loss_bpb)} eval {_num(st.eval_bpb)} bpb | "
        f"{st.tokens_per_s:.0f} tok/s | peers {st.peers} | sync {st.syncs_done} ok {st.syncs_missed} missed, "
        f"last {human_duration(st.last_sync_s)}{'' if st.last_sync_s is None else ' ago'} | "
        f"up {human_bytes(st.bytes_sent)} ({human_rate(st.send_rate)}) "
        f"down {human_bytes(st.bytes_received)} ({human_rate(st.recv_rate)})"
    )


def summary_table(rows: Sequence[dict]) -> str:
    """The table `murmur local` prints at exit, one row per node (`summary_from_records` rows)."""
    header = ("node", "steps", "eval start", "eval end", "change", "sent", "received", "syncs ok", "missed")
    lines = [header]
    for r in rows:
        start, end = r.get("eval_bpb_start"), r.get("eval_bpb_end")
        change = "-" if start is None or end is None or not start else f"{(end - start) / start * 100:+.1f}%"
        lines.append(
            (
                str(r.get("id") or "?")[:12],
                str(r.get("steps", "-")),
                _num(start),
                _num(end),
                change,
                human_bytes(r.get("bytes_sent", 0)),
                human_bytes(r.get("bytes_received", 0)),
                str(r.get("syncs_done", 0)),
                str(r.get("syncs_missed", 0)),
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = []
    for j, row in enumerate(lines):
        out.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


class Progress:
    """Writes status lines to `stream`: in place on a terminal, one per line otherwise."""

    def __init__(self, stream: IO[str] | None = None, live: bool | None = None, enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if live is None:
            isatty = getattr(self.stream, "isatty", None)
            live = bool(isatty and isatty())
        self.live = live
        self.enabled = enabled
        self._open_line = False  # a live line is on screen and not yet ended

    def update(self, line: str) -> None:
        if not self.enabled:
            return
        if self.live:
            self.stream.write("\r\x1b[2K" + line)
            self._open_line = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def log(self, line: str) -> None:
        """A message that must stay on screen (an event, a warning), above the live line."""
        if not self.enabled:
            return
        if self._open_line:
            self.stream.write("\r\x1b[2K")
            self._open_line = False
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False
