"""The `murmur` command.

    murmur keygen --out FILE               a new identity key (0600); prints the peer id
    murmur swarm-key --out FILE            a new private swarm secret (0600)
    murmur join --bootstrap HOST:PORT ...  run one node in a swarm until its budget or Ctrl-C
    murmur local --nodes N ...             run an N-process swarm on loopback and summarise it
    murmur status HOST:PORT                ask a running node how it is doing
    murmur plot METRICS... -o out.png      plot eval loss against steps, time and bytes

Every mistake a user can make (a bad flag, a missing file, a malformed or unreachable address, a
port in use) ends in one line `murmur: error: ...` on stderr and a non-zero exit, never a
traceback: expected errors are caught here, at the outermost boundary, and only here.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from gossip.errors import MurmurError
from node.config import ALGORITHMS, FIELD_NAMES, NodeConfig, build_config

EXIT_OK = 0
EXIT_ERROR = 1  # a runtime failure: missing file, unreachable peer, port in use, ...
EXIT_USAGE = 2  # a bad command line


class UsageError(Exception):
    """The command line is wrong (argparse's complaint, reduced to one line)."""


class _Parser(argparse.ArgumentParser):
    """argparse, except that a usage error raises instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# Flags of `join` and `local`, one per NodeConfig field: (metavar or None for a switch, help).
_CONFIG_FLAGS: dict[str, tuple[str | None, str]] = {
    "listen": ("HOST:PORT", "address to listen on (repeatable); port 0 picks a free port [127.0.0.1:0]"),
    "announce": ("HOST:PORT", "address peers should dial, e.g. your public IP:PORT when listening on 0.0.0.0 (repeatable)"),
    "bootstrap": ("HOST:PORT", "address of a node already in the swarm (repeatable)"),
    "swarm": ("NAME", "open swarm name: anyone who knows it can join [murmur]"),
    "swarm_key": ("FILE", "private swarm secret from `murmur swarm-key` (overrides --swarm)"),
    "identity": ("FILE", "identity key from `murmur keygen` [CHECKPOINT_DIR/identity.key, created once]"),
    "join_timeout": ("S", "seconds to reach a first peer through --bootstrap before giving up [20]"),
    "min_peers": ("N", "wait (up to --join-timeout) until N peers are known, each knowing N too, before training [0]"),
    "algorithm": ("NAME", f"outer algorithm: {', '.join(ALGORITHMS)} [noloco]"),
    "sync_every": ("H", "inner steps between outer syncs [noloco 50, diloco 100, streaming-diloco 100]"),
    "outer_lr": ("LR", "outer learning rate [the algorithm's default]"),
    "outer_momentum": ("M", "outer momentum [the algorithm's default]"),
    "codec": ("NAME", "payload codec: fp32, bf16, e3m0, ... [the algorithm's default]"),
    "fragments": ("P", "streaming-diloco: fragments synced in turn [4]"),
    "delay": ("TAU", "streaming-diloco: inner steps a fragment's sync overlaps [1]"),
    "merge_alpha": ("A", "streaming-diloco: weight of the local weights when merging [0.5]"),
    "sync_timeout": ("S", "seconds an outer sync may take before it counts as missed [30]"),
    "task": ("NAME", "training task: lm (byte-level language model) [lm]"),
    "data": ("PATH", "text file or folder to train on [the Python standard library's .py files]"),
    "seed": ("N", "model-init seed; every node of a swarm must use the same [0]"),
    "d_model": ("N", "model width [128]"),
    "n_layer": ("N", "transformer blocks [6]"),
    "n_head": ("N", "attention heads [4]"),
    "context": ("N", "bytes per training sequence [128]"),
    "batch_size": ("N", "sequences per inner step [8]"),
    "lr": ("LR", "inner AdamW learning rate [1e-3]"),
    "warmup": ("N", "inner steps of learning-rate warm-up [20]"),
    "weight_decay": ("WD", "inner AdamW weight decay [0]"),
    "threads": ("N", "torch threads per node [1]"),
    "steps": ("N", "stop after N inner steps in total [no limit]"),
    "duration": ("S", "stop after S seconds of training [no limit]"),
    "eval_every": ("N", "inner steps between held-out evaluations [100]"),
    "eval_seqs": ("N", "held-out sequences per evaluation [32]"),
    "checkpoint_dir": ("DIR", "where checkpoints (and by default identity and metrics) go"),
    "checkpoint_every": ("N", "inner steps between checkpoints [200]"),
    "keep_checkpoints": ("N", "checkpoints kept on disk [2]"),
    "state_sync": (None, "late joiners fetch the swarm's state before training [on]"),
    "metrics": ("FILE", "JSONL metrics file [CHECKPOINT_DIR/metrics.jsonl]"),
    "log_every": ("S", "seconds between progress updates [2]"),
    "quiet": (None, "no progress output"),
}
assert set(_CONFIG_FLAGS) == set(FIELD_NAMES), "every NodeConfig field needs a flag"


def _field_caster(name: str):
    kind = str(next(f.type for f in NodeConfig.__dataclass_fields__.values() if f.name == name))
    if "int" in kind:
        return int
    if "float" in kind:
        return float
    return str


def _add_config_flags(p: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    p.add_argument("--config", metavar="FILE.toml", help="TOML file with the same keys as the flags (flags win)")
    for name, (metavar, help_text) in _CONFIG_FLAGS.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        if metavar is None:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif name in ("listen", "announce", "bootstrap"):
            p.add_argument(flag, dest=name, metavar=metavar, nargs="+", action="extend", default=argparse.SUPPRESS, help=help_text)
        else:
            p.add_argument(flag, dest=name, metavar=metavar, type=_field_caster(name), default=argparse.SUPPRESS, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="murmur", description="Decentralized low-bandwidth training: peers train one model by gossiping with random partners.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("keygen", help="create an identity key file (never overwrites)")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the key (mode 0600)")

    p = sub.add_parser("swarm-key", help="create a private swarm secret (never overwrites)")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the secret (mode 0600)")

    p = sub.add_parser("join", help="run one training node in a swarm")
    _add_config_flags(p)
    p.add_argument("--ready-file", dest="ready_file", metavar="FILE", help=argparse.SUPPRESS)  # `murmur local`: our address goes here

    p = sub.add_parser("local", help="run an N-node swarm on this machine (loopback) and summarise it")
    p.add_argument("--nodes", type=int, default=4, metavar="N", help="number of node processes [4]")
    p.add_argument("--workdir", metavar="DIR", help="where node checkpoints and metrics go [a new temp folder]")
    p.add_argument("--summary", metavar="PATH", help="write the per-node summary as JSON here")
    _add_config_flags(p, skip=("listen", "announce", "bootstrap", "identity", "checkpoint_dir", "metrics"))

    p = sub.add_parser("status", help="ask a running node how it is doing (over the secure wire)")
    p.add_argument("address", metavar="HOST:PORT", help="the node's listen address")
    p.add_argument("--swarm", default="murmur", metavar="NAME", help="open swarm name [murmur]")
    p.add_argument("--swarm-key", dest="swarm_key", metavar="FILE", help="private swarm secret file")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds to wait for an answer [10]")
    p.add_argument("--json", action="store_true", help="print the raw answer as JSON")

    p = sub.add_parser("plot", help="plot eval loss vs steps, time and bytes from metrics files")
    p.add_argument("metrics", nargs="+", metavar="METRICS", help="JSONL metrics files (one per node)")
    p.add_argument("-o", "--out", required=True, metavar="OUT.png", help="image to write")
    return parser


def config_from_args(args: argparse.Namespace, **fixed: Any) -> NodeConfig:
    overrides = {k: v for k, v in vars(args).items() if k in FIELD_NAMES}
    return build_config(overrides, getattr(args, "config", None), **fixed)


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    from gossip.identity import Identity, format_peer_id

    ident = Identity.generate()
    ident.save(args.out)
    print(format_peer_id(ident.peer_id))
    return EXIT_OK


def cmd_swarm_key(args: argparse.Namespace) -> int:
    from gossip.identity import SwarmKey, generate_swarm_secret, save_swarm_secret

    secret = generate_swarm_secret()
    save_swarm_secret(secret, args.out)
    print(f"wrote a private swarm secret to {args.out} (swarm id {SwarmKey.private(secret).swarm_id.hex()[:16]})")
    print("share this file only with the nodes that may join; pass it as --swarm-key FILE")
    return EXIT_OK


def cmd_join(args: argparse.Namespace) -> int:
    from node.runtime import run_join

    cfg = config_from_args(args)
    if cfg.checkpoint_dir is None:
        raise ValueError("murmur join needs --checkpoint-dir DIR (checkpoints, and the identity key if --identity is not given)")
    return run_join(cfg, ready_file=args.ready_file)


def cmd_local(args: argparse.Namespace) -> int:
    if args.nodes < 1 or args.nodes > 64:
        raise ValueError(f"--nodes must be between 1 and 64, got {args.nodes}")
    from node.local import run_local

    overrides = {k: v for k, v in vars(args).items() if k in FIELD_NAMES}
    return run_local(args.nodes, overrides, config_path=args.config, workdir=args.workdir, summary=args.summary)


def cmd_status(args: argparse.Namespace) -> int:
    from node.services import query_status
    from node.progress import human_bytes, human_duration

    answer = query_status(args.address, swarm=args.swarm, swarm_key=args.swarm_key, timeout=args.timeout)
    if args.json:
        print(json.dumps(answer, indent=2))
        return EXIT_OK
    print(f"node       {answer['peer_id']}")
    print(f"algorithm  {answer['algorithm']}")
    print(f"step       {answer['step']}")
    print(f"loss       {_fmt(answer['loss_bpb'])} bpb (train), {_fmt(answer['eval_bpb'])} bpb (eval)")
    print(f"speed      {answer['tokens_per_s']:.0f} tokens/s")
    print(f"peers      {answer['peers']}")
    print(f"syncs      {answer['syncs_done']} done, {answer['syncs_missed']} missed")
    print(f"traffic    up {human_bytes(answer['bytes_sent'])}, down {human_bytes(answer['bytes_received'])}")
    print(f"uptime     {human_duration(answer['elapsed_s'])}")
    return EXIT_OK


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def cmd_plot(args: argparse.Namespace) -> int:
    from node.plot import plot_metrics

    for path in args.metrics:
        if not Path(path).is_file():
            raise FileNotFoundError(f"metrics file {path!r} does not exist")
    n = plot_metrics(args.metrics, args.out)
    print(f"wrote {args.out} ({n} node{'s' if n != 1 else ''})")
    return EXIT_OK


COMMANDS = {
    "keygen": cmd_keygen,
    "swarm-key": cmd_swarm_key,
    "join": cmd_join,
    "local": cmd_local,
    "status": cmd_status,
    "plot": cmd_plot,
}


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, FileExistsError):
        return f"{exc.filename} already exists; refusing to overwrite it (choose another path or remove it)"
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"{exc.filename}: no such file"
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())  # one line, whatever the exception's text held


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # name the subcommand's help, not the top-level one
            raise UsageError(f"unrecognized arguments: {' '.join(extra)} (see `murmur {args.command} --help`)")
    except UsageError as exc:
        print(f"murmur: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return COMMANDS[args.command](args)
    except BaseException as exc:
        # trio wraps errors raised inside nurseries in exception groups: report the real one.
        real = _collapse(exc)
        if isinstance(real, _EXPECTED):
            print(f"murmur: error: {_one_line(real)}", file=sys.stderr)
            return EXIT_ERROR
        if isinstance(real, KeyboardInterrupt):
            print("murmur: interrupted", file=sys.stderr)
            return 130
        raise


_EXPECTED = (ValueError, OSError, MurmurError, ImportError, RuntimeError)


def _collapse(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if type(e).__name__ != "Cancelled"] or list(exc.exceptions)
        exc = inner[0]
    return exc
