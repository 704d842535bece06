"""Metrics records, summaries, rates and the progress formatting, against exact values."""

import io
import json

import pytest

from node.metrics import MetricsWriter, NodeStatus, RateMeter, improvement, read_metrics, summary_from_records
from node.plot import series
from node.progress import Progress, human_bytes, human_duration, human_rate, status_line, summary_table


def test_human_units():
    assert [human_bytes(n) for n in (0, 999, 1000, 1536, 2_500_000, 3.2e9, 7e12, 9e15)] == [
        "0B", "999B", "1.0KB", "1.5KB", "2.5MB", "3.2GB", "7.0TB", "9000.0TB"]
    assert human_rate(12_300) == "12.3KB/s"
    assert [human_duration(s) for s in (None, 0, 59.4, 65, 3600, 7260)] == ["never", "0s", "59s", "1m05s", "1h00m", "2h01m"]


def test_rate_meter_spans_its_window():
    r = RateMeter(window=10)
    assert r.update(0.0, 0) == 0.0
    assert r.update(1.0, 100) == 100.0
    assert r.update(2.0, 300) == 150.0
    r.update(15.0, 1600)  # points older than 15 - 10 = 5 s drop out, but one before the window stays
    assert r._points[0] == (2.0, 300)
    assert r.rate() == pytest.approx(1300 / 13)
    with pytest.raises(ValueError):
        RateMeter(0)


STATUS = NodeStatus(
    peer_id="abcdefghijklmnop", algorithm="noloco", step=120, loss_bpb=3.14159, eval_bpb=3.5, eval_bpb_start=7.9,
    tokens=4096, tokens_per_s=812.4, peers=3, last_sync_s=65.0, bytes_sent=2_500_000, bytes_received=1_200,
    send_rate=12_300.0, recv_rate=0.0, syncs_done=4, syncs_missed=1, elapsed_s=100.0,
)


def test_status_line_exact():
    assert status_line(STATUS) == (
        "abcdefgh step 120 loss 3.142 eval 3.500 bpb | 812 tok/s | peers 3 | sync 4 ok 1 missed, last 1m05s ago | "
        "up 2.5MB (12.3KB/s) down 1.2KB (0B/s)"
    )
    fresh = NodeStatus(**{**STATUS.to_dict(), "loss_bpb": None, "eval_bpb": None, "last_sync_s": None})
    assert "loss - eval - bpb" in status_line(fresh) and "last never |" in status_line(fresh)


def test_progress_live_and_plain():
    tty = io.StringIO()
    p = Progress(tty, live=True)
    p.update("a")
    p.update("b")
    p.log("event")
    p.update("c")
    p.close()
    assert tty.getvalue() == "\r\x1b[2Ka\r\x1b[2Kb\r\x1b[2Kevent\n\r\x1b[2Kc\n"
    plain = io.StringIO()
    p = Progress(plain, live=False)
    p.update("a")
    p.log("event")
    p.close()
    assert plain.getvalue() == "a\nevent\n"
    off = io.StringIO()
    Progress(off, enabled=False).update("x")
    assert off.getvalue() == ""


def test_metrics_file_round_trip_skips_torn_line(tmp_path):
    path = tmp_path / "m" / "metrics.jsonl"
    with MetricsWriter(path) as w:
        rec = w.write("eval", step=3, eval_bpb=5.5)
    assert rec["event"] == "eval" and rec["step"] == 3 and isinstance(rec["t"], float)
    with open(path, "a") as f:
        f.write('{"event": "train", "st')  # a node killed mid-write
    assert read_metrics(path) == [rec]
    with MetricsWriter(path) as w:
        with pytest.raises(ValueError):
            w.write("eval", eval_bpb=float("nan"))  # never write a non-JSON number


def test_summary_over_a_restarted_node():
    recs = [
        {"event": "start", "id": "n0", "step": 0},
        {"event": "eval", "step": 0, "eval_bpb": 8.0},
        {"event": "train", "step": 50, "bytes_sent": 100, "bytes_received": 90, "syncs_done": 1, "syncs_missed": 0},
        {"event": "eval", "step": 50, "eval_bpb": 5.0},
        # killed here; the restart's counters start from zero again
        {"event": "start", "id": "n0", "step": 50},
        {"event": "eval", "step": 50, "eval_bpb": 5.0},
        {"event": "train", "step": 80, "bytes_sent": 40, "bytes_received": 30, "syncs_done": 0, "syncs_missed": 1},
        {"event": "final", "step": 100, "bytes_sent": 60, "bytes_received": 50, "syncs_done": 1, "syncs_missed": 1},
        {"event": "eval", "step": 100, "eval_bpb": 4.0},
    ]
    assert summary_from_records(recs) == {
        "id": "n0", "eval_bpb_start": 8.0, "eval_bpb_end": 4.0, "bytes_sent": 160, "bytes_received": 140,
        "syncs_done": 2, "syncs_missed": 1, "steps": 100, "runs": 2,
    }
    assert improvement(8.0, 4.0) == 0.5 and improvement(None, 4.0) is None


def test_summary_table_exact():
    rows = [{"id": "abcdefghijklmnopq", "steps": 400, "eval_bpb_start": 8.0, "eval_bpb_end": 4.0, "bytes_sent": 1_500_000,
             "bytes_received": 1_400_000, "syncs_done": 8, "syncs_missed": 0},
            {"id": None, "steps": 0, "eval_bpb_start": None, "eval_bpb_end": None, "bytes_sent": 0, "bytes_received": 0,
             "syncs_done": 0, "syncs_missed": 0}]
    assert summary_table(rows).splitlines() == [
        "node          steps  eval start  eval end  change   sent  received  syncs ok  missed",
        "------------  -----  ----------  --------  ------  -----  --------  --------  ------",
        "abcdefghijkl    400       8.000     4.000  -50.0%  1.5MB     1.4MB         8       0",
        "?                 0           -         -       -     0B        0B         0       0",
    ]


def test_plot_series_carries_bytes_over_restarts():
    recs = [
        {"event": "start", "t": 10.0},
        {"event": "eval", "t": 10.0, "step": 0, "eval_bpb": 8.0, "bytes_sent": 0, "bytes_received": 0},
        {"event": "eval", "t": 20.0, "step": 10, "eval_bpb": 6.0, "bytes_sent": 100, "bytes_received": 50},
        {"event": "start", "t": 30.0},
        {"event": "eval", "t": 31.0, "step": 10, "eval_bpb": 6.0, "bytes_sent": 0, "bytes_received": 0},
        {"event": "eval", "t": 40.0, "step": 20, "eval_bpb": 5.0, "bytes_sent": 10, "bytes_received": 20},
    ]
    s = series(recs)
    assert s == {"step": [0.0, 10.0, 10.0, 20.0], "time": [0.0, 10.0, 21.0, 30.0],
                 "bytes": [0.0, 150.0, 150.0, 180.0], "eval_bpb": [8.0, 6.0, 6.0, 5.0]}
