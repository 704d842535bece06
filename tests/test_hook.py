"""The embedded hook: `murmur.join` / `swarm.wrap` in an unchanged loop, the async API, errors,
and the runnable example."""

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import trio

import murmur
from gossip.errors import PeerUnreachable

REPO = Path(__file__).resolve().parents[1]


def model():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 1)


def loop(opt, m, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=g)
        loss = F.mse_loss(m(x), x.sum(1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def test_two_members_sync_through_wrapped_optimizers():
    with murmur.join() as a, murmur.join(bootstrap=list(a.addresses)) as b:
        assert a.peers() == 1 or b.peers() == 1
        ma, mb = model(), model()
        oa = a.wrap(ma, torch.optim.SGD(ma.parameters(), lr=0.05), algorithm="diloco", sync_every=5, timeout=10.0, codec="fp32")
        ob = b.wrap(mb, torch.optim.SGD(mb.parameters(), lr=0.05), algorithm="diloco", sync_every=5, timeout=10.0, codec="fp32")
        t = threading.Thread(target=loop, args=(ob, mb, 10, 2))
        t.start()
        loop(oa, ma, 10, 1)
        t.join()
        oa.detach()
        ob.detach()
        assert oa.stats.syncs_done == ob.stats.syncs_done == 2
        # DiLoCo's outer weights stay equal inside the group: after the last outer step both
        # models hold the same weights.
        assert torch.allclose(ma.weight, mb.weight, atol=1e-6)
        assert a.traffic.bytes_sent > 0
    with pytest.raises(RuntimeError, match="has been left"):
        a.wrap(ma, torch.optim.SGD(ma.parameters(), lr=0.1))


def test_leave_is_idempotent_and_stops_the_thread():
    s = murmur.join()
    thread = s._thread
    assert thread.is_alive()
    s.leave()
    s.leave()
    assert not thread.is_alive()


def test_join_errors_are_raised_in_the_caller():
    with pytest.raises(ValueError, match="malformed address"):
        murmur.join(bootstrap=["nowhere"])
    with pytest.raises(ValueError, match="lists of 'host:port' strings"):
        murmur.join(bootstrap="127.0.0.1:1")
    with pytest.raises(FileNotFoundError):
        murmur.join(identity="/nonexistent/id.key")
    with pytest.raises(PeerUnreachable, match="cannot join the swarm within 1s"):
        murmur.join(bootstrap=["127.0.0.1:9"], join_timeout=1.0)
    with murmur.join() as s:
        m = model()
        with pytest.raises(ValueError, match="algorithm must be one of"):
            s.wrap(m, torch.optim.SGD(m.parameters(), lr=0.1), algorithm="sgd")


async def test_async_api_in_a_trio_program():
    async with murmur.open_swarm() as a:
        async with murmur.open_swarm(bootstrap=list(a.addresses)) as b:
            ma, mb = model(), model()
            oa = a.wrap(ma, torch.optim.SGD(ma.parameters(), lr=0.05), algorithm="noloco", sync_every=5, timeout=10.0)
            ob = b.wrap(mb, torch.optim.SGD(mb.parameters(), lr=0.05), algorithm="noloco", sync_every=5, timeout=10.0)
            async with trio.open_nursery() as nursery:  # steps run in worker threads; the loop gossips
                nursery.start_soon(trio.to_thread.run_sync, loop, oa, ma, 5, 1)
                nursery.start_soon(trio.to_thread.run_sync, loop, ob, mb, 5, 2)
            await trio.to_thread.run_sync(oa.detach)
            await trio.to_thread.run_sync(ob.detach)
            assert oa.stats.syncs_done == ob.stats.syncs_done == 1


def test_hook_example_runs():
    # The repository on PYTHONPATH stands in for `pip install -e .` (which puts `murmur` on the path).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "examples/hook_example.py", "--steps", "40"], cwd=REPO,
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [m.groups() for m in (re.match(
        r"member (\d): loss ([\d.]+) -> ([\d.]+), syncs done (\d+), missed (\d+), bytes sent (\d+)", line)
        for line in proc.stdout.splitlines()) if m]
    assert [r[0] for r in rows] == ["0", "1"]
    for _, start, end, done, missed, sent in rows:
        assert float(end) < float(start)
        assert int(done) >= 1 and int(done) + int(missed) == 4
        assert int(sent) > 0
