"""One node: network services + the LM task + the outer algorithm, run until a budget or a signal.

The trio loop owns the network (transport, membership, collectives, state serving); every torch
call (inner steps, evaluation, snapshots) runs in a worker thread through
`trio.to_thread.run_sync`, one at a time, so heartbeats, probes and transfers keep flowing while
the model computes, and the outer algorithm's collectives (scheduled into this loop by
`TrioComm`) overlap the next inner steps.

Lifecycle of `Node.run`:
1. identity (created once in the checkpoint folder unless `--identity` is given), swarm key,
   corpus; the newest checkpoint that verifies (a corrupt one is refused and reported);
2. transport + membership; with bootstrap addresses, wait until we know a peer (else a clear error);
3. state: our checkpoint if there is one, else (a late joiner) a peer's state via
   `node.state_sync`, else the seed's initial weights like every fresh node;
4. train: eval at the start, every `eval_every` steps and at the end; a checkpoint (also
   published for late joiners) every `checkpoint_every` steps; a status line and a metrics
   record every `log_every` seconds;
5. on the step/time budget, SIGINT or SIGTERM: drop syncs in flight, write a final checkpoint,
   announce our leave, exit 0. A second signal aborts at once.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

import trio

from gossip.errors import MurmurError
from gossip.identity import Identity, format_peer_id
from node.checkpoint import CheckpointError, CheckpointStore, deserialize, write_atomic
from node.config import NodeConfig
from node.lm_task import load_corpus
from node.metrics import MetricsWriter, NodeStatus, RateMeter
from node.progress import Progress, status_line
from node.services import STATUS, Services, open_services, swarm_key_from, wait_for_peers
from node.state_sync import ChunkStore, StateSyncError, make_manifest
from node.state_transfer import fetch_state
from node.trainer import check_algorithm

log = logging.getLogger("murmur.node")


def load_or_create_identity(cfg: NodeConfig) -> Identity:
    """`--identity FILE` must exist; the default key in the checkpoint folder is made once."""
    path = cfg.identity_path()
    if cfg.identity is not None:
        if not path.is_file():
            raise FileNotFoundError(2, "identity file does not exist (create one with `murmur keygen --out FILE`)", str(path))
        return Identity.load(path)
    if path.is_file():
        return Identity.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ident = Identity.generate()
    ident.save(path)
    return ident


class Node:
    """A training node. `await node.run()` returns the process exit code."""

    def __init__(self, cfg: NodeConfig, progress: Progress | None = None, *, open_transport=None) -> None:
        self.cfg = cfg
        self._open_transport = open_transport  # None: TCP (see node.services.open_services)
        self.progress = progress or Progress(enabled=not cfg.quiet)
        self.identity: Identity | None = None
        self.trainer = None  # node.trainer.LMTrainer, built in a worker thread once the loop runs
        self.services: Services | None = None
        self.stop_reason: str | None = None
        self._stop = trio.Event()
        self._started = time.monotonic()
        self._train_started: float | None = None
        self._eval_bpb: float | None = None
        self._eval_start: float | None = None
        self._tokens_at_start = 0
        self._last_sync_time: float | None = None
        self._syncs_seen = 0
        self._syncs_base = (0, 0)  # (done, missed) restored from a checkpoint: not this run's
        self._rates = {k: RateMeter(10.0) for k in ("tokens", "sent", "received")}
        self.metrics: MetricsWriter | None = None
        self.store = CheckpointStore(cfg.checkpoint_path(), keep=cfg.keep_checkpoints)
        self._checkpointed_step: int | None = None  # step of the last checkpoint written

    # -- status ---------------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self._stop.set()

    def status(self) -> NodeStatus:
        t = self.trainer
        now = time.monotonic()
        outer = t.outer.stats if t is not None else None
        stats = self.services.transport.stats if self.services else None
        tokens = t.counters.tokens if t is not None else 0
        if outer is not None and outer.syncs_done != self._syncs_seen:
            self._syncs_seen = outer.syncs_done
            self._last_sync_time = now
        return NodeStatus(
            peer_id=format_peer_id(self.identity.peer_id) if self.identity else "?",
            algorithm=self.cfg.algorithm,
            step=t.counters.step if t is not None else 0,
            loss_bpb=t.last_loss_bpb if t is not None else None,
            eval_bpb=self._eval_bpb,
            eval_bpb_start=self._eval_start,
            tokens=tokens - self._tokens_at_start,
            tokens_per_s=self._rates["tokens"].update(now, tokens),
            peers=len(self.services.membership.live_peers()) if self.services else 0,
            last_sync_s=None if self._last_sync_time is None else now - self._last_sync_time,
            bytes_sent=stats.bytes_sent if stats else 0,
            bytes_received=stats.bytes_received if stats else 0,
            send_rate=self._rates["sent"].update(now, stats.bytes_sent if stats else 0),
            recv_rate=self._rates["received"].update(now, stats.bytes_received if stats else 0),
            syncs_done=outer.syncs_done - self._syncs_base[0] if outer else 0,
            syncs_missed=outer.syncs_missed - self._syncs_base[1] if outer else 0,
            elapsed_s=now - self._started,
        )

    def _record(self, event: str, **fields) -> None:
        if self.metrics is not None:
            self.metrics.write(event, **fields)

    # -- the run --------------------------------------------------------------------------------

    async def run(self, *, handle_signals: bool = False, ready_file: str | None = None) -> int:
        cfg = self.cfg
        self.identity = load_or_create_identity(cfg)
        swarm = swarm_key_from(cfg.swarm, cfg.swarm_key)
        # A bad --data or algorithm setting fails here, before any socket opens.
        await trio.to_thread.run_sync(load_corpus, cfg.data)
        await trio.to_thread.run_sync(check_algorithm, cfg)
        snap = await trio.to_thread.run_sync(self.store.load_latest)
        for path, why in self.store.refused:
            self.progress.log(f"murmur: {why}; using the previous checkpoint")
        me = format_peer_id(self.identity.peer_id)
        if snap is not None and snap.meta.get("peer") not in (None, me):
            raise CheckpointError(
                f"the checkpoints in {cfg.checkpoint_dir} belong to node {snap.meta.get('peer')}, not {me}; "
                "use that node's identity or another --checkpoint-dir"
            )
        self.metrics = MetricsWriter(cfg.metrics_path())
        try:
            async with trio.open_nursery() as outer_nursery:
                if handle_signals:
                    outer_nursery.start_soon(self._watch_signals, outer_nursery.cancel_scope)
                await self._run_with_services(swarm, snap, ready_file)
                outer_nursery.cancel_scope.cancel()
        finally:
            self.metrics.close()
        return 0 if self.stop_reason != "aborted" else 1

    async def _watch_signals(self, abort: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if self._stop.is_set():
                    self.progress.log("murmur: second signal, aborting without a final checkpoint")
                    self.stop_reason = "aborted"
                    abort.cancel()
                    return
                self.progress.log(f"murmur: {signal.Signals(signum).name}: finishing the step, writing a checkpoint, leaving")
                self.request_stop(signal.Signals(signum).name)

    async def _run_with_services(self, swarm, snap, ready_file: str | None) -> None:
        cfg = self.cfg
        async with open_services(
            self.identity, swarm, cfg.listen, cfg.bootstrap, status=self.status,
            metadata={"algorithm": cfg.algorithm}, announce=cfg.announce, open_transport=self._open_transport,
        ) as services:
            self.services = services
            if ready_file:  # tells `murmur local` (and tests) where we listen
                write_atomic(Path(ready_file), json.dumps(
                    {"peer_id": format_peer_id(self.identity.peer_id), "addresses": list(services.transport.addresses)}
                ).encode())
            self.progress.log(
                f"murmur: node {format_peer_id(self.identity.peer_id)[:12]} listening on {', '.join(services.transport.addresses)}"
            )
            async with trio.open_nursery() as nursery:
                comm_nursery = await nursery.start(self._host_collectives)
                with trio.CancelScope() as setup:
                    nursery.start_soon(self._cancel_on_stop, setup)
                    if cfg.bootstrap:
                        n = await wait_for_peers(services, cfg.bootstrap, cfg.join_timeout)
                        self.progress.log(f"murmur: joined the swarm ({n} peer{'s' if n != 1 else ''} known)")
                    if cfg.min_peers:
                        await self._wait_for_swarm(services, cfg.min_peers, cfg.join_timeout)
                    await self._build_trainer(services, comm_nursery, snap)
                if self.trainer is not None and not self._stop.is_set():
                    await self._train(nursery)
                if self.trainer is not None:
                    await self._finish()
                nursery.cancel_scope.cancel()

    async def _wait_for_swarm(self, services: Services, n: int, timeout: float) -> None:
        """A start barrier (e.g. `murmur local` starting together): wait until we know `n` peers
        that each say (`node.status`) they know `n` peers too.

        Knowing `n` peers alone is not enough: views fill by gossip, a few seconds apart on
        different nodes, and the nodes that filled theirs first would be that far ahead (DiLoCo's
        first average would then split into groups whose replicas never agree again). Asking the
        peers directly lets every node leave within about one poll of the last one."""
        ready: set[bytes] = set()  # peers that told us they know n peers
        with trio.move_on_after(timeout):
            while True:
                peers = [r for r in services.membership.live_peers() if r.addresses]
                if len(peers) >= n:
                    async with trio.open_nursery() as nursery:
                        for record in peers:
                            if record.peer_id not in ready:
                                nursery.start_soon(self._ask_if_ready, services, record, n, ready)
                    if len(ready & {r.peer_id for r in services.membership.live_peers()}) >= n:
                        return
                await trio.sleep(0.1)
        have = len(services.membership.live_peers())
        self.progress.log(f"murmur: {have} of {n} peers after {timeout:g}s ({len(ready)} of them ready); training anyway")

    async def _ask_if_ready(self, services: Services, record, n: int, ready: set[bytes]) -> None:
        try:
            reply = await services.transport.call(record.addresses[0], STATUS.name, {}, timeout=1.0, peer_id=record.peer_id)
        except MurmurError:
            return  # no answer yet: asked again on the next poll
        if reply.body["peers"] >= n:
            ready.add(record.peer_id)

    async def _cancel_on_stop(self, scope: trio.CancelScope) -> None:
        await self._stop.wait()
        scope.cancel()

    async def _host_collectives(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The nursery the outer algorithm's collectives run in. A stop cancels them, so a
        training thread waiting on a sync wakes at once (the sync counts as missed) and the node
        checkpoints and leaves without waiting out the sync's deadline."""
        async with trio.open_nursery() as comm_nursery:
            task_status.started(comm_nursery)
            await self._stop.wait()
            comm_nursery.cancel_scope.cancel()

    async def _build_trainer(self, services: Services, nursery: trio.Nursery, snap) -> None:
        from node.trainer import LMTrainer
        from optimizers.comm import TrioComm

        cfg = self.cfg
        comm = TrioComm(services.collectives, trio.lowlevel.current_trio_token(), nursery)
        trainer = await trio.to_thread.run_sync(LMTrainer, cfg, comm, self.identity.peer_id)
        if snap is not None:
            await trio.to_thread.run_sync(lambda: trainer.restore(snap, from_peer=False))
            self.progress.log(f"murmur: resumed from checkpoint at step {trainer.counters.step}")
            self._record("resume", step=trainer.counters.step, model_hash=await trio.to_thread.run_sync(trainer.model_hash))
        if cfg.state_sync and cfg.bootstrap:
            # A late joiner takes any trained state; a restarted node only catches up when the
            # swarm is more than one outer round ahead (its syncs would never find a partner
            # of its round, and DiLoCo-style "healing" loads the group's state the same way).
            behind = trainer.counters.step + cfg.h if snap is not None else 0
            await self._state_sync(services, trainer, min_step=behind)
        self.trainer = trainer
        self._tokens_at_start = trainer.counters.tokens
        # Sync counters in a checkpoint span every earlier run; status and metrics count this run's.
        self._syncs_base = (trainer.outer.stats.syncs_done, trainer.outer.stats.syncs_missed)

    async def _state_sync(self, services: Services, trainer, min_step: int = 0) -> None:
        store = ChunkStore(self.cfg.checkpoint_path() / "state-sync")
        try:
            result = await fetch_state(
                services.transport, services.peer_refs(), store, chunk_timeout=self.cfg.sync_timeout, min_step=min_step
            )
        except StateSyncError as exc:
            self.progress.log(f"murmur: could not fetch the swarm's state ({exc}); going on with what we have")
            return
        if result is None:
            return  # a fresh swarm: everyone starts from the seed's weights
        try:
            snap = await trio.to_thread.run_sync(lambda: deserialize(result.data, what="peer snapshot"))
            await trio.to_thread.run_sync(lambda: trainer.restore(snap, from_peer=True))
        except CheckpointError as exc:
            self.progress.log(f"murmur: refusing the peer's state ({exc}); going on with what we have")
            return
        finally:
            await trio.to_thread.run_sync(store.clear)
        model_hash = await trio.to_thread.run_sync(trainer.model_hash)
        donor = format_peer_id(result.sources[0]) if result.sources else "?"
        self.progress.log(f"murmur: fetched state at step {result.manifest.step} from {donor[:12]} ({len(result.manifest.chunks)} chunks)")
        self._record(
            "state_sync", step=result.manifest.step, donor=donor, snapshot=result.manifest.snapshot.hex(),
            model_hash=model_hash, chunks=len(result.manifest.chunks), chunks_fetched=result.chunks_fetched,
            chunks_resumed=result.chunks_resumed, dropped=[format_peer_id(p) for p, _ in result.dropped],
        )

    async def _train(self, nursery: trio.Nursery) -> None:
        cfg, trainer = self.cfg, self.trainer
        me = format_peer_id(self.identity.peer_id)
        self._record("start", id=me, algorithm=cfg.algorithm, step=trainer.counters.step,
                     addresses=list(self.services.transport.addresses))
        await self._publish_and_checkpoint(write=False)
        await self._evaluate()
        self._eval_start = self._eval_bpb
        trainer.attach()
        nursery.start_soon(self._report_loop)
        self._train_started = time.monotonic()
        while not self._stop.is_set():
            if cfg.steps is not None and trainer.counters.step >= cfg.steps:
                self.request_stop("step budget reached")
                break
            if cfg.duration is not None and time.monotonic() - self._train_started >= cfg.duration:
                self.request_stop("time budget reached")
                break
            await trio.to_thread.run_sync(trainer.train_one)
            step = trainer.counters.step
            if step % cfg.eval_every == 0:
                await self._evaluate()
            if step % cfg.checkpoint_every == 0:
                await self._publish_and_checkpoint(write=True)

    async def _finish(self) -> None:
        """Drop syncs in flight, evaluate (on a budget, not on a signal), checkpoint, report."""
        trainer = self.trainer
        await trio.to_thread.run_sync(lambda: trainer.detach(finish=False))
        if self.stop_reason in ("step budget reached", "time budget reached") and trainer.counters.step % self.cfg.eval_every:
            await self._evaluate()
        if self._checkpointed_step != trainer.counters.step:
            await self._publish_and_checkpoint(write=True)
        st = self.status()
        self._record("final", reason=self.stop_reason, **st.to_dict())
        self.progress.close()
        self.progress.log(f"murmur: stopped ({self.stop_reason}): " + status_line(st))

    async def _evaluate(self) -> None:
        bpb = await trio.to_thread.run_sync(self.trainer.evaluate)
        self._eval_bpb = bpb
        st = self.services.transport.stats
        self._record("eval", step=self.trainer.counters.step, eval_bpb=bpb, bytes_sent=st.bytes_sent, bytes_received=st.bytes_received)

    async def _publish_and_checkpoint(self, *, write: bool) -> None:
        """Snapshot the state; publish it for late joiners; with `write`, store it as a checkpoint."""
        trainer = self.trainer
        me = format_peer_id(self.identity.peer_id)

        def build():
            snap = trainer.snapshot(peer=me)
            data = snap.to_bytes()
            return snap.step, data, make_manifest(data, snap.step), trainer.model_hash()

        step, data, manifest, mhash = await trio.to_thread.run_sync(build)
        self.services.state_server.publish(manifest, data)
        self._record("publish", step=step, snapshot=manifest.snapshot.hex(), model_hash=mhash)
        if write:
            path = await trio.to_thread.run_sync(self.store.save_bytes, step, data)
            self._checkpointed_step = step
            self._record("checkpoint", step=step, path=str(path))

    async def _report_loop(self) -> None:
        while True:
            await trio.sleep(self.cfg.log_every)
            st = self.status()
            self.services.membership.update_metadata(step=st.step)  # partners see how far we are
            self._record("train", **st.to_dict())
            self.progress.update(status_line(st))


def run_join(cfg: NodeConfig, ready_file: str | None = None) -> int:
    """`murmur join`: run one node in this process until its budget or a signal."""
    return trio.run(lambda: Node(cfg).run(handle_signals=True, ready_file=ready_file))


__all__ = ["Node", "run_join", "load_or_create_identity"]
