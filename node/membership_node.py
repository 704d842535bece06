"""A process that runs only the TCP transport and membership, printing JSON status lines.

    python -m node.membership_node --listen 127.0.0.1:0 --bootstrap 127.0.0.1:7000 --round-s 0.2

Used by the multi-process membership test and handy for watching a swarm form by hand. Every
line on stdout is one JSON object:

    {"event": "listening", "peer_id": "<base32>", "addresses": ["127.0.0.1:40123"]}
    {"event": "status", "t": 1.2, "peer_id": ..., "live": [...], "view": [...], "suspects": [...],
     "seq": ..., "stats": {...membership counters...}, "traffic": {"bytes_sent": ..., ...}}
    {"event": "left", "peer_id": ...}

`live` are the peers `sample()` draws from; `view` also holds suspects not yet removed. On
SIGTERM or SIGINT it announces its leave (bounded by leave_timeout_s) and exits 0. A bad flag
exits 2 with argparse's message; a port in use or another start-up failure exits 1 with one line.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from typing import TextIO

import trio

from gossip.identity import Identity, SwarmKey, format_peer_id, load_swarm_secret
from gossip.membership import MembershipConfig
from gossip.membership_driver import Membership
from gossip.tcp import open_tcp_transport, parse_address


def _address(text: str) -> str:
    try:
        parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m node.membership_node", description=__doc__.split("\n")[0])
    p.add_argument("--listen", type=_address, action="append", required=True, help="HOST:PORT (repeatable; port 0 = any)")
    p.add_argument("--bootstrap", type=_address, action="append", default=[], help="HOST:PORT of a swarm member (repeatable)")
    p.add_argument("--announce", type=_address, action="append", help="address to put in our record (default: bound addresses)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--swarm", default="murmur-membership-test", help="open swarm name (default: %(default)s)")
    key.add_argument("--swarm-key", help="file with a private swarm secret")
    p.add_argument("--identity", help="identity key file (default: a fresh identity)")
    p.add_argument("--status-every-s", type=float, default=1.0, help="seconds between status lines")
    defaults = MembershipConfig()
    for name in ("round_s", "call_timeout_s", "probe_timeout_s", "suspicion_s", "max_age_s", "leave_timeout_s"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name), dest=name)
    for name in ("view_size", "shuffle_len"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name), dest=name)
    return p


def build_config(args: argparse.Namespace) -> MembershipConfig:
    fields = ("round_s", "call_timeout_s", "probe_timeout_s", "suspicion_s", "max_age_s", "leave_timeout_s",
              "view_size", "shuffle_len")
    return MembershipConfig(**{name: getattr(args, name) for name in fields})


def _emit(out: TextIO, event: dict) -> None:
    out.write(json.dumps(event, separators=(",", ":")) + "\n")
    out.flush()


def status(membership: Membership, transport, started: float) -> dict:
    core = membership.core
    return {
        "event": "status",
        "t": round(trio.current_time() - started, 3),
        "peer_id": format_peer_id(membership.peer_id),
        "live": sorted(format_peer_id(r.peer_id) for r in membership.live_peers()),
        "view": sorted(format_peer_id(p) for p in core.view),
        "suspects": sorted(format_peer_id(p) for p in core.view if core.is_suspect(p)),
        "seq": membership.record.seq,
        "stats": membership.stats.as_dict(),
        "traffic": {
            "bytes_sent": transport.stats.bytes_sent,
            "bytes_received": transport.stats.bytes_received,
            "messages_sent": transport.stats.messages_sent,
        },
    }


async def serve(args: argparse.Namespace, config: MembershipConfig, identity: Identity, swarm: SwarmKey,
                out: TextIO) -> None:
    started = trio.current_time()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_tcp_transport(identity, swarm, listen=args.listen, announce=args.announce) as transport:
            membership = Membership(transport, identity, config, bootstrap=args.bootstrap)
            peer = format_peer_id(identity.peer_id)
            _emit(out, {"event": "listening", "peer_id": peer, "addresses": list(transport.addresses)})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(membership.run)

                async def report() -> None:
                    while True:
                        await trio.sleep(args.status_every_s)
                        _emit(out, status(membership, transport, started))

                nursery.start_soon(report)
                async for _ in signals:
                    await membership.leave()
                    _emit(out, status(membership, transport, started))
                    _emit(out, {"event": "left", "peer_id": peer})
                    nursery.cancel_scope.cancel()
                    break


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        config = build_config(args)
        if not args.status_every_s > 0:
            raise ValueError("--status-every-s must be > 0")
        identity = Identity.load(args.identity) if args.identity else Identity.generate()
        swarm = SwarmKey.private(load_swarm_secret(args.swarm_key)) if args.swarm_key else SwarmKey.open(args.swarm)
    except (ValueError, OSError) as exc:
        p.error(str(exc))
    try:
        trio.run(serve, args, config, identity, swarm, out)
    except OSError as exc:  # e.g. the port is taken: one line, no traceback
        print(f"membership_node: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
