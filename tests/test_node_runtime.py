"""The node runtime in one process, over SimNetwork (real clock, tiny model): train and sync,
checkpoint and resume, a late joiner's state equals its donor's."""

import io
from contextlib import asynccontextmanager

import pytest
import trio

from gossip.sim import LinkSpec, SimNetwork
from node.checkpoint import CheckpointError, CheckpointStore
from node.config import NodeConfig
from node.metrics import read_metrics, summary_from_records
from node.progress import Progress
from node.runtime import Node

TINY = dict(d_model=16, n_layer=1, n_head=2, context=16, batch_size=2, eval_seqs=4, warmup=2, sync_timeout=5.0,
            sync_every=10, eval_every=10, checkpoint_every=20, log_every=0.2)


class Swarm:
    """Nodes on one SimNetwork. Node k (in order of `node()` calls) gets address sim:k, whatever
    order the nodes reach their transports in, so a bootstrap of "sim:0" means the first node."""

    def __init__(self, nursery, tmp_path):
        self.net = SimNetwork(seed=0, default_link=LinkSpec(latency=0.001))
        self.nursery = nursery
        self.tmp = tmp_path
        self.out = io.StringIO()
        self.addresses: dict[str, str] = {}

    def factory(self, address):
        def open_transport(identity, swarm, listen):
            @asynccontextmanager
            async def cm():
                host = self.net.add_host(identity.peer_id, address)
                self.nursery.start_soon(host.run)
                await trio.sleep(0)
                try:
                    yield host
                finally:
                    await host.aclose()

            return cm()

        return open_transport

    def node(self, name, **kw) -> Node:
        address = self.addresses.setdefault(name, f"sim:{len(self.addresses)}")
        cfg = NodeConfig(**{**TINY, "checkpoint_dir": str(self.tmp / name), **kw})
        return Node(cfg, Progress(self.out, live=False), open_transport=self.factory(address))


def records(tmp_path, name, event=None):
    recs = read_metrics(tmp_path / name / "metrics.jsonl")
    return [r for r in recs if event is None or r["event"] == event]


async def test_two_nodes_train_sync_and_checkpoint(tmp_path):
    async with trio.open_nursery() as nursery:
        swarm = Swarm(nursery, tmp_path)
        # a waits for b before its first step (a start barrier), so both train from step 0.
        a, b = swarm.node("a", steps=40, min_peers=1), swarm.node("b", steps=40, bootstrap=("sim:0",))
        async with trio.open_nursery() as inner:
            inner.start_soon(a.run)
            await trio.sleep(0.3)
            inner.start_soon(b.run)
        nursery.cancel_scope.cancel()
    for name, node in (("a", a), ("b", b)):
        final = records(tmp_path, name, "final")[-1]
        assert final["reason"] == "step budget reached" and final["step"] == 40
        assert final["syncs_done"] + final["syncs_missed"] == 4
        assert final["syncs_done"] >= 2  # the two met at least twice
        assert final["bytes_sent"] > 0 and final["bytes_received"] > 0
        evals = [r["eval_bpb"] for r in records(tmp_path, name, "eval")]
        assert [r["step"] for r in records(tmp_path, name, "eval")] == [0, 10, 20, 30, 40]
        assert evals[-1] < evals[0]
        assert [s for s, _ in CheckpointStore(tmp_path / name).paths()] == [40, 20]
        summary = summary_from_records(records(tmp_path, name))
        assert summary["eval_bpb_start"] == evals[0] and summary["eval_bpb_end"] == evals[-1]
        assert summary["syncs_done"] == final["syncs_done"] and summary["steps"] == 40
    assert "joined the swarm (1 peer known)" in swarm.out.getvalue()


async def test_restart_resumes_from_checkpoint_with_same_identity(tmp_path):
    async with trio.open_nursery() as nursery:
        swarm = Swarm(nursery, tmp_path)
        first = swarm.node("a", steps=20)
        await first.run()
        second = swarm.node("a", steps=30)
        await second.run()
        nursery.cancel_scope.cancel()
    assert second.identity.peer_id == first.identity.peer_id
    resume = records(tmp_path, "a", "resume")
    assert len(resume) == 1 and resume[0]["step"] == 20
    starts = records(tmp_path, "a", "start")
    assert [s["step"] for s in starts] == [0, 20]
    assert records(tmp_path, "a", "final")[-1]["step"] == 30
    assert summary_from_records(records(tmp_path, "a"))["runs"] == 2


async def test_checkpoint_of_another_identity_is_refused(tmp_path):
    async with trio.open_nursery() as nursery:
        swarm = Swarm(nursery, tmp_path)
        await swarm.node("a", steps=10, checkpoint_every=10).run()
        (tmp_path / "a" / "identity.key").rename(tmp_path / "old.key")
        with pytest.raises(CheckpointError, match="belong to node"):
            await swarm.node("a", steps=20).run()
        nursery.cancel_scope.cancel()


async def test_late_joiner_model_equals_donor_snapshot(tmp_path):
    async with trio.open_nursery() as nursery:
        swarm = Swarm(nursery, tmp_path)
        donor = swarm.node("donor", steps=400, checkpoint_every=10)
        async with trio.open_nursery() as inner:
            inner.start_soon(donor.run)
            with trio.fail_after(60):
                while donor.trainer is None or donor.trainer.counters.step < 25:
                    await trio.sleep(0.05)
            joiner = swarm.node("joiner", steps=60, bootstrap=("sim:0",))
            await joiner.run()
            donor.request_stop("test over")
        nursery.cancel_scope.cancel()
    sync = records(tmp_path, "joiner", "state_sync")
    assert len(sync) == 1 and sync[0]["step"] >= 20
    published = {r["snapshot"]: r for r in records(tmp_path, "donor", "publish")}
    donor_rec = published[sync[0]["snapshot"]]
    assert sync[0]["model_hash"] == donor_rec["model_hash"]
    assert sync[0]["step"] == donor_rec["step"]
    assert records(tmp_path, "joiner", "start")[0]["step"] == sync[0]["step"]  # it trains on from there
    assert not (tmp_path / "joiner" / "state-sync").exists()  # the download folder is cleaned up
    assert records(tmp_path, "donor", "final")[-1]["reason"] == "test over"


async def test_stop_wakes_a_step_blocked_on_a_sync(tmp_path):
    async with trio.open_nursery() as nursery:
        swarm = Swarm(nursery, tmp_path)
        # b's first exchange (its round 1) would come after 10**6 steps: it never pairs with a.
        b = swarm.node("b", sync_every=10**6)
        # a knows b before it trains, and starts from the seed's weights (no state sync from b).
        a = swarm.node("a", bootstrap=("sim:0",), sync_timeout=60.0, state_sync=False)
        async with trio.open_nursery() as inner:
            inner.start_soon(b.run)
            await trio.sleep(0.3)
            inner.start_soon(a.run)
            with trio.fail_after(30):  # a waits on its step-10 pair exchange, which b never joins
                while not (a.trainer and a.trainer.counters.step == 10):
                    await trio.sleep(0.05)
            await trio.sleep(1.0)
            assert a.trainer.counters.step == 10
            t0 = trio.current_time()
            a.request_stop("test stop")
            with trio.fail_after(10):  # far less than the 60 s sync deadline
                while records(tmp_path, "a", "final") == []:
                    await trio.sleep(0.05)
            stopped_in = trio.current_time() - t0
            b.request_stop("test over")
        nursery.cancel_scope.cancel()
    final = records(tmp_path, "a", "final")[-1]
    assert final["reason"] == "test stop" and final["syncs_missed"] == 1 and final["syncs_done"] == 0
    assert stopped_in < 5.0
    assert CheckpointStore(tmp_path / "a").paths()[0][0] == final["step"]
