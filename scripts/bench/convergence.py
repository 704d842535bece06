#!/usr/bin/env python3
"""Convergence benchmark: eval loss and bytes sent, DDP vs DiLoCo vs streaming DiLoCo vs NoLoCo.

W workers train the built-in byte-level LM (node/lm_task.py) in one process, each method from the
same initial weights on the same tokens: worker r reads batch k of `Batcher(rank=r, seed)` at its
k-th step under every method, with the same inner AdamW and the same warmup-cosine schedule.

Protocol (DiLoCo paper, §3: it starts DiLoCo from a model pretrained for 24k steps): every method
branches from one shared checkpoint, `pretrain_steps` of DDP on batches [0, pretrain_steps) of
each worker's stream, AdamW moments included. Tokens and bytes are counted from the branch on,
for every method alike. `--pretrain-steps 0` trains from scratch instead.

Eval loss is bits per byte on fixed held-out windows. For the methods whose replicas differ
(streaming DiLoCo between fragment syncs, NoLoCo always), the figure is the mean over workers of
each worker's own model: what a node of the swarm would actually hold ("avg-model" is the loss
of the average of their weights, for information).

Measured (`--quick`, 2-core shared VM, one core, 443-694 s; deterministic, so reruns match):

    method            eval bpb  loss/DDP  DDP/bytes   from scratch (--pretrain-steps 0): loss/DDP
    ddp                 2.2478    1.0000      1.0x      1.0000 (2.5957 bpb)
    diloco              2.3112    1.0282    120.5x      1.3204
    streaming-diloco    2.3985    1.0670    481.9x      1.2370
    noloco              2.4973    1.1110    105.1x      1.2550

At this scale (512 bytes per worker per step; 16 outer rounds for DiLoCo and NoLoCo, 8 per
fragment for streaming) the local methods trail DDP at equal tokens: each worker's inner AdamW
sees batch-8 gradients, so its normalised steps are noisier than DDP's batch-64 steps, and
averaging every H steps recovers only part of that. DiLoCo runs from the same checkpoint (outer
lr 1.0) show the gap shrinking with more rounds: H=128 bf16 10.6%, H=64 bf16 6.5%, H=32 int8
2.8%; and with larger per-worker batches: batch 32 x 128 steps at H=32 gave 5.0% against 10.6%
for batch 8 x 512 steps at H=128 (same tokens, 4 rounds each). From scratch (loss 4-8 bpb) every
gap is far larger, and the outer lr tuned on the checkpoint (1.0) is worse there than 0.7.

    .venv/bin/python scripts/bench/convergence.py --quick --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from node.ddp import DataParallel  # noqa: E402
from node.lm_task import (  # noqa: E402
    Batcher,
    LMConfig,
    build_model,
    count_params,
    evaluate_bpb,
    load_corpus,
    train_step,
    warmup_cosine,
)

METHODS = ("ddp", "diloco", "streaming-diloco", "noloco")


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run. `--quick` and the full run differ only in these numbers."""

    workers: int = 8  # W simulated workers
    steps: int = 512  # inner steps per worker (DDP: synchronous steps); equal tokens for all
    batch: int = 8  # sequences per worker per step
    context: int = 128  # bytes per sequence
    d_model: int = 128  # model width (LMConfig)
    n_layer: int = 6  # transformer blocks (LMConfig)
    n_head: int = 4  # attention heads (LMConfig)
    lr: float = 2e-3  # peak AdamW lr of DDP (and of the pretraining)
    local_lr: float = 0.0  # peak inner AdamW lr of DiLoCo, streaming DiLoCo and NoLoCo (0: = lr)
    warmup: int = 20  # inner lr warmup steps, then cosine to 10% at `steps`
    weight_decay: float = 0.1  # AdamW decoupled weight decay on matrices (not norms/biases)
    clip: float = 1.0  # global grad-norm clip of every inner step
    # Each method's H and codec are chosen to clear its bytes target with the smallest H (more
    # outer rounds = closer to DDP at equal tokens); ratios vs DDP's 7P bytes/step at W=8:
    # DiLoCo 7H / (1.75 * 1.0625) = 120x at H=32 (int8 = 8.5 bits/value incl. block scales),
    # streaming 7H / (1.75 * 0.53) = 482x at H=64 (e3m0 = 4.25 bits), NoLoCo 7H / 2.125 = 105x at H=32 (int8).
    diloco_sync_every: int = 32  # H of DiLoCo
    diloco_codec: str = "int8"  # pseudo-gradient payload of DiLoCo (blockwise int8, 64-value blocks)
    diloco_outer_lr: float = 1.0  # outer Nesterov lr (paper: 0.7; here 1.0 beat 0.7, 1.6 diverged)
    diloco_outer_momentum: float = 0.9  # outer Nesterov momentum (paper: 0.9; 0.95 was no better)
    streaming_sync_every: int = 64  # H of streaming DiLoCo: each fragment syncs once per H steps
    streaming_fragments: int = 4  # fragment 0 = embeddings + final norm, then blocks b -> 1 + b mod 3
    streaming_codec: str = "e3m0"  # 4-bit payload of streaming DiLoCo
    streaming_delay: int = 1  # tau: inner steps a fragment sync overlaps (paper headline: 1)
    streaming_merge_alpha: float = 0.0  # merge theta <- a*local + (1-a)*global; 0 (torchft default) beat 0.5 here
    streaming_outer_lr: float = 1.0  # outer Nesterov lr (1.0 beat 0.7 here)
    streaming_outer_momentum: float = 0.9  # outer Nesterov momentum
    noloco_sync_every: int = 32  # H of NoLoCo
    noloco_codec: str = "int8"  # (phi, delta) payload of NoLoCo
    noloco_outer_lr: float = 1.0  # alpha (= gamma) (authors: 0.7; 1.0 with beta 0.7 was best of 4 here)
    noloco_outer_momentum: float = 0.7  # beta (authors' noloco_mean configs: 0.5)
    eval_every: int = 64  # inner steps between eval points of the curves
    eval_seqs: int = 64  # eval windows (of `context` bytes) per model evaluation
    pretrain_steps: int = 256  # DDP steps to a shared checkpoint every method starts from (DiLoCo
    #                          paper protocol); its tokens and bytes are not counted for anyone
    seed: int = 0  # model init, batches and eval positions all derive from it
    threads: int = 1  # torch intra-op threads; 1 is fastest on a shared 2-core machine (0: torch's default)

    def lm(self) -> LMConfig:
        return LMConfig(context=self.context, d_model=self.d_model, n_layer=self.n_layer, n_head=self.n_head)


# --quick: a 474,816-parameter model (d 96, 4 layers, context 64) instead of the task's default
# 1.23M, and half the steps, so the whole run takes ~8 min on one free core of this machine.
QUICK = BenchConfig(steps=512, pretrain_steps=256, context=64, d_model=96, n_layer=4, eval_seqs=48)


@dataclass
class Run:
    """What one method produced."""

    method: str
    eval_bpb: float = math.nan  # final eval loss, mean over workers of each worker's model
    eval_bpb_worker_avg: float = math.nan  # final eval loss of the average of the workers' weights
    bytes_per_worker: float = 0.0  # mean over workers of bytes each sent
    tokens: int = 0  # tokens trained on, summed over workers
    seconds: float = 0.0  # wall time of training + eval
    curve: list[dict] = field(default_factory=list)  # {"step", "tokens", "bytes_per_worker", "eval_bpb"}
    outer_stats: dict = field(default_factory=dict)  # summed OuterStats over workers


def make_inner(
    model: torch.nn.Module, cfg: BenchConfig, offset: int, lr: float
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (betas 0.9/0.95, as DiLoCo and torchft) with decay on matrices only, and the schedule.

    The warmup-cosine schedule spans pretrain_steps + steps; its step 0 is step `offset` of it
    (the pretraining starts at 0, a branch from the shared checkpoint at pretrain_steps).
    """
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    total = cfg.pretrain_steps + cfg.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(offset + s, cfg.warmup, total))
    return opt, sched


@dataclass(frozen=True)
class StartPoint:
    """Where every method starts: fresh weights, or the shared checkpoint after pretrain_steps."""

    model_state: dict  # parameters (a copy)
    opt_state: dict | None  # the pretraining AdamW state, or None when starting from scratch
    bpb: float  # its eval loss, the first point of every curve


def start_point(cfg: BenchConfig, corpus, progress) -> StartPoint:
    """Build the initial weights; with pretrain_steps > 0, train them with DDP first.

    The pretraining reads batches [0, pretrain_steps) of each worker's stream; every method then
    reads batches from pretrain_steps on, so no method sees the pretraining data twice.
    """
    lm = cfg.lm()
    model = build_model(lm, cfg.seed)
    opt_state = None
    if cfg.pretrain_steps > 0:
        opt, sched = make_inner(model, cfg, offset=0, lr=cfg.lr)
        streams = [Batcher(corpus, cfg.batch, cfg.context, r, cfg.seed) for r in range(cfg.workers)]
        ddp = DataParallel(model, opt, streams, clip=cfg.clip, scheduler=sched)
        t0 = time.perf_counter()
        for _ in range(cfg.pretrain_steps):
            ddp.step()
        opt_state = copy.deepcopy(opt.state_dict())
        progress("pretrain (DDP)", cfg.pretrain_steps, evaluate_bpb(model, corpus, lm, cfg.eval_seqs, seed=cfg.seed),
                 time.perf_counter() - t0)
    bpb = evaluate_bpb(model, corpus, lm, cfg.eval_seqs, seed=cfg.seed)
    return StartPoint({k: v.detach().clone() for k, v in model.state_dict().items()}, opt_state, bpb)


def make_worker(
    cfg: BenchConfig, start: StartPoint, lr: float
) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    model = build_model(cfg.lm(), cfg.seed)
    model.load_state_dict(start.model_state)
    opt, sched = make_inner(model, cfg, offset=cfg.pretrain_steps, lr=lr)
    if start.opt_state is not None:
        # The pretraining's moments carry over; the lr (and the schedule's base lr) are ours.
        opt.load_state_dict(copy.deepcopy(start.opt_state))
        for group in opt.param_groups:
            group["initial_lr"] = lr
            group["lr"] = lr * warmup_cosine(cfg.pretrain_steps, cfg.warmup, cfg.pretrain_steps + cfg.steps)
    return model, opt, sched


def outer_options(method: str, cfg: BenchConfig, model: torch.nn.Module) -> dict:
    if method == "diloco":
        return dict(sync_every=cfg.diloco_sync_every, codec=cfg.diloco_codec, outer_lr=cfg.diloco_outer_lr,
                    outer_momentum=cfg.diloco_outer_momentum)
    if method == "streaming-diloco":
        return dict(sync_every=cfg.streaming_sync_every, fragments=cfg.streaming_fragments, codec=cfg.streaming_codec,
                    delay=cfg.streaming_delay, merge_alpha=cfg.streaming_merge_alpha,
                    outer_lr=cfg.streaming_outer_lr, outer_momentum=cfg.streaming_outer_momentum,
                    blocks=list(model.blocks))
    if method == "noloco":
        return dict(sync_every=cfg.noloco_sync_every, codec=cfg.noloco_codec, outer_lr=cfg.noloco_outer_lr,
                    outer_momentum=cfg.noloco_outer_momentum)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def averaged_model(models: list[torch.nn.Module], lm: LMConfig) -> torch.nn.Module:
    avg = build_model(lm, 0)  # a fresh module: the workers' carry the outer optimizers' hooks
    with torch.no_grad():
        for name, p in avg.named_parameters():
            p.copy_(torch.stack([dict(m.named_parameters())[name].detach() for m in models]).mean(dim=0))
    return avg


def batchers(cfg: BenchConfig, corpus) -> list[Batcher]:
    return [Batcher(corpus, cfg.batch, cfg.context, r, cfg.seed, start=cfg.pretrain_steps) for r in range(cfg.workers)]


def run_ddp(cfg: BenchConfig, corpus, start: StartPoint, progress) -> Run:
    lm = cfg.lm()
    model, opt, sched = make_worker(cfg, start, cfg.lr)
    ddp = DataParallel(model, opt, batchers(cfg, corpus), clip=cfg.clip, scheduler=sched)
    run = Run("ddp")
    run.curve.append({"step": 0, "tokens": 0, "bytes_per_worker": 0.0, "eval_bpb": start.bpb})
    t0 = time.perf_counter()
    for t in range(1, cfg.steps + 1):
        ddp.step()
        if t % cfg.eval_every == 0 or t == cfg.steps:
            bpb = evaluate_bpb(model, corpus, lm, cfg.eval_seqs, seed=cfg.seed)
            run.curve.append({"step": t, "tokens": ddp.tokens, "bytes_per_worker": ddp.bytes_per_worker, "eval_bpb": bpb})
            progress("ddp", t, bpb, time.perf_counter() - t0)
    run.eval_bpb = run.eval_bpb_worker_avg = run.curve[-1]["eval_bpb"]
    run.bytes_per_worker, run.tokens = ddp.bytes_per_worker, ddp.tokens
    run.seconds = time.perf_counter() - t0
    return run


def run_outer(method: str, cfg: BenchConfig, corpus, start: StartPoint, progress) -> Run:
    from optimizers.comm import LocalGroup
    from optimizers.factory import make_outer

    lm = cfg.lm()
    group = LocalGroup(cfg.workers, seed=cfg.seed)
    models, inners, outers = [], [], []
    for r in range(cfg.workers):
        m, opt, sched = make_worker(cfg, start, cfg.local_lr or cfg.lr)
        outer = make_outer(method, m, opt, group.comm(r), **outer_options(method, cfg, m)).attach()
        models.append(m)
        inners.append((opt, sched))
        outers.append(outer)
    streams = batchers(cfg, corpus)
    run = Run(method)
    run.curve.append({"step": 0, "tokens": 0, "bytes_per_worker": 0.0, "eval_bpb": start.bpb})
    t0 = time.perf_counter()
    tokens = 0

    def evaluate(final: bool) -> tuple[float, list[float]]:
        # Mid-run, a sync that lands before the next forward (DiLoCo, NoLoCo) is applied by the
        # eval forward itself, and a streaming sync still overlapping (tau) stays in flight: we
        # score what each node holds at that moment. At the end every sync in flight lands.
        if final:
            for o in outers:
                o.finish_pending()
        per = [evaluate_bpb(m, corpus, lm, cfg.eval_seqs, seed=cfg.seed) for m in models]
        return sum(per) / len(per), per

    try:
        for t in range(1, cfg.steps + 1):
            # Round-robin: every worker takes its step t before anyone takes t+1, so a collective
            # launched at step t has all W submissions before any worker needs its result.
            for m, (opt, sched), b in zip(models, inners, streams):
                x, y = b.next()
                train_step(m, opt, x, y, clip=cfg.clip)
                sched.step()
                tokens += x.numel()
            if t % cfg.eval_every == 0 or t == cfg.steps:
                bpb, _ = evaluate(final=t == cfg.steps)
                bytes_pw = sum(group.bytes_sent) / cfg.workers
                run.curve.append({"step": t, "tokens": tokens, "bytes_per_worker": bytes_pw, "eval_bpb": bpb})
                progress(method, t, bpb, time.perf_counter() - t0)
        run.eval_bpb = run.curve[-1]["eval_bpb"]
        run.eval_bpb_worker_avg = evaluate_bpb(averaged_model(models, lm), corpus, lm, cfg.eval_seqs, seed=cfg.seed)
    finally:
        for o in outers:
            o.detach(finish=False)
    run.bytes_per_worker = sum(group.bytes_sent) / cfg.workers
    run.tokens = tokens
    run.seconds = time.perf_counter() - t0
    for o in outers:
        for k, v in o.stats.as_dict().items():
            if k != "last_sync_step":
                run.outer_stats[k] = run.outer_stats.get(k, 0) + v
    return run


def summarize(runs: dict[str, Run]) -> dict[str, dict]:
    ddp = runs.get("ddp")
    out = {}
    for name, r in runs.items():
        entry = {
            "eval_bpb": round(r.eval_bpb, 5),
            "eval_bpb_worker_avg": round(r.eval_bpb_worker_avg, 5),
            "bytes_per_worker": r.bytes_per_worker,
            "tokens": r.tokens,
            "seconds": round(r.seconds, 1),
            "loss_ratio_vs_ddp": None,
            "bytes_ratio_vs_ddp": None,
            "curve": r.curve,
        }
        if r.outer_stats:
            entry["outer_stats"] = r.outer_stats
        if ddp is not None:
            entry["loss_ratio_vs_ddp"] = round(r.eval_bpb / ddp.eval_bpb, 5)
            entry["bytes_ratio_vs_ddp"] = (
                round(ddp.bytes_per_worker / r.bytes_per_worker, 2) if r.bytes_per_worker > 0 else math.inf
            )
        out[name] = entry
    return out


TARGETS = {"diloco": 100.0, "streaming-diloco": 400.0, "noloco": 100.0}  # min bytes ratio vs DDP
LOSS_TARGET = 1.03  # every method's eval bpb within 3% of DDP's


def table(summary: dict[str, dict]) -> str:
    lines = [
        f"{'method':<18}{'eval bpb':>10}{'avg-model':>11}{'loss/DDP':>10}{'MB/worker':>12}{'DDP/bytes':>11}"
        f"{'secs':>8}  targets"
    ]
    for name, e in summary.items():
        ratio = e["loss_ratio_vs_ddp"]
        bratio = e["bytes_ratio_vs_ddp"]
        verdict = ""
        if name != "ddp" and ratio is not None:
            ok_loss = ratio <= LOSS_TARGET
            ok_bytes = bratio >= TARGETS[name]
            verdict = f"loss {'ok' if ok_loss else 'MISS'}, bytes>={TARGETS[name]:.0f}x {'ok' if ok_bytes else 'MISS'}"
        lines.append(
            f"{name:<18}{e['eval_bpb']:>10.4f}{e['eval_bpb_worker_avg']:>11.4f}"
            f"{(f'{ratio:.4f}' if ratio is not None else '-'):>10}{e['bytes_per_worker'] / 1e6:>12.3f}"
            f"{(f'{bratio:.1f}x' if bratio is not None else '-'):>11}{e['seconds']:>8.0f}  {verdict}"
        )
    return "\n".join(lines)


def plot(summary: dict[str, dict], cfg: BenchConfig, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping the plot {path} (pip install 'murmur[plot]')")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for name, e in summary.items():
        c = e["curve"]
        ax1.plot([p["tokens"] / 1e6 for p in c], [p["eval_bpb"] for p in c], marker="o", label=name)
        sent = [p for p in c if p["bytes_per_worker"] > 0]  # a log axis has no 0
        ax2.plot([p["bytes_per_worker"] for p in sent], [p["eval_bpb"] for p in sent], marker="o", label=name)
    ax1.set_xlabel("tokens trained on, all workers (millions)")
    ax2.set_xlabel("bytes sent per worker (log scale)")
    ax2.set_xscale("log")
    ax1.set_ylabel("eval loss (bits per byte)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(fontsize=10, t=f"murmur convergence: {cfg.workers} workers, equal tokens from a shared checkpoint after "
                 f"{cfg.pretrain_steps} DDP steps; H = {cfg.diloco_sync_every} / {cfg.streaming_sync_every} / "
                 f"{cfg.noloco_sync_every} (DiLoCo / streaming / NoLoCo)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot written to {path}")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, BenchConfig]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller model and run (~10 min on 2 CPU cores)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    p.add_argument("--plot", metavar="PNG", help="write loss vs tokens and vs bytes here (needs matplotlib)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    for f in BenchConfig.__dataclass_fields__.values():
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default) if f.default is not None else str,
                       default=None, help=f"(default {f.default}; --quick: {getattr(QUICK, f.name)})")
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else BenchConfig()
    overrides = {k: getattr(args, k) for k in BenchConfig.__dataclass_fields__ if getattr(args, k) is not None}
    cfg = replace(cfg, **overrides)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        p.error(f"unknown method(s) {bad}; choose from {','.join(METHODS)}")
    args.methods = methods
    return args, cfg


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    corpus = load_corpus(None)
    n_params = count_params(build_model(cfg.lm(), cfg.seed))
    print(f"{cfg.workers} workers x {cfg.steps} steps x {cfg.batch} x {cfg.context} bytes, model {n_params:,} params, "
          f"H={cfg.diloco_sync_every}/{cfg.streaming_sync_every}/{cfg.noloco_sync_every}, torch threads {torch.get_num_threads()}")

    def progress(method: str, step: int, bpb: float, secs: float) -> None:
        print(f"  {method:<17} step {step:>5}/{cfg.steps}  eval {bpb:.4f} bpb  {secs:7.1f} s", flush=True)

    runs: dict[str, Run] = {}
    t0 = time.perf_counter()
    start = start_point(cfg, corpus, progress)
    for m in args.methods:
        runs[m] = run_ddp(cfg, corpus, start, progress) if m == "ddp" else run_outer(m, cfg, corpus, start, progress)
    summary = summarize(runs)
    print()
    print(table(summary))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    result = {
        "methods": summary,
        "config": {**asdict(cfg), "params": n_params, "corpus": corpus.source, "collectives": "optimizers.comm.LocalGroup (in-process)",
                   "quick": bool(args.quick), "loss_target_ratio": LOSS_TARGET, "bytes_targets": TARGETS},
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"results written to {args.json}")
    if args.plot:
        plot(summary, cfg, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
