"""`murmur plot`: eval loss against steps, wall time and bytes, for one node or many.

matplotlib is an optional extra (`pip install 'murmur[plot]'`); without it `plot_metrics` raises
`PlotUnavailable` with that instruction, and the CLI prints it as a one-line error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from node.metrics import read_metrics


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def series(records: Sequence[dict]) -> dict[str, list[float]]:
    """Eval points of one node's records: step, seconds since its first record, bytes, loss.

    Bytes are sent + received, carried over restarts (each run's counters start from zero).
    """
    out: dict[str, list[float]] = {"step": [], "time": [], "bytes": [], "eval_bpb": []}
    t0 = None
    carried = 0  # bytes of earlier runs of the same node
    run_bytes = 0
    for rec in records:
        if t0 is None:
            t0 = rec.get("t", 0.0)
        ev = rec.get("event")
        if ev == "start":
            carried += run_bytes
            run_bytes = 0
        elif ev in ("train", "final"):
            run_bytes = int(rec.get("bytes_sent", 0)) + int(rec.get("bytes_received", 0))
        elif ev == "eval" and rec.get("eval_bpb") is not None:
            run_bytes = int(rec.get("bytes_sent", 0)) + int(rec.get("bytes_received", 0)) or run_bytes
            out["step"].append(float(rec.get("step", 0)))
            out["time"].append(float(rec.get("t", t0)) - t0)
            out["bytes"].append(float(carried + run_bytes))
            out["eval_bpb"].append(float(rec["eval_bpb"]))
    return out


def plot_metrics(paths: Sequence[str | Path], out: str | Path) -> int:
    """Write a 3-panel PNG (loss vs steps, time, bytes); returns how many curves were drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("plotting needs matplotlib: pip install 'murmur[plot]'") from None
    curves = []
    for p in paths:
        records = read_metrics(p)
        s = series(records)
        if not s["step"]:
            continue
        name = next((str(r.get("id"))[:8] for r in records if r.get("event") == "start"), Path(p).stem)
        curves.append((name, s))
    if not curves:
        raise ValueError("no eval records in the given metrics files (is the node still at its first eval?)")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for name, s in curves:
        axes[0].plot(s["step"], s["eval_bpb"], marker=".", label=name)
        axes[1].plot(s["time"], s["eval_bpb"], marker=".", label=name)
        axes[2].plot([b / 1e6 for b in s["bytes"]], s["eval_bpb"], marker=".", label=name)
    for ax, xlabel in zip(axes, ("inner steps", "seconds", "MB sent + received")):
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("eval loss (bits per byte)")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return len(curves)
