"""A murmur wire peer in its own process, driven by tests/test_wire_processes.py.

    python tests/wire_peer.py --swarm NAME [--listen 127.0.0.1:0]

It opens a TcpTransport, prints one JSON line {"address", "peer_id"} and serves two methods:
`test.wire_put` (answers the sha256 of every buffer it received) and `test.wire_get` (sends
`size` deterministic bytes made from `seed`). Commands arrive as lines on stdin:

    fetch ADDRESS SEED SIZE   call test.wire_get at ADDRESS, print {"sha256": [...], "bytes": n}

End of stdin closes the transport gracefully; the last line printed is {"stats": {...}}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when run as a script

import numpy as np  # noqa: E402
import trio  # noqa: E402

from gossip import messages  # noqa: E402
from gossip.identity import Identity, SwarmKey  # noqa: E402
from gossip.messages import Bytes, Int, List, Map  # noqa: E402
from gossip.tcp import open_tcp_transport  # noqa: E402
from gossip.transport import Response  # noqa: E402

PARTS = 4  # buffers per transfer
PUT = messages.define(
    "test.wire_put", 1, Map({}),
    Map({"sha256": List(Bytes(32, 32), max_len=PARTS), "total": Int(0, 1 << 40)}),
    max_request_buffers=PARTS, max_buffer_bytes=1 << 28,
)
GET = messages.define(
    "test.wire_get", 1, Map({"seed": Int(0, (1 << 32) - 1), "size": Int(0, 1 << 28)}), Map({}),
    max_response_buffers=PARTS, max_buffer_bytes=1 << 28,
)


def make_payload(seed: int, size: int) -> list[bytes]:
    """`size` pseudo-random bytes from `seed`, in PARTS buffers (the last takes the remainder)."""
    data = np.random.default_rng(seed).bytes(size)
    step = size // PARTS
    return [data[i * step : (i + 1) * step if i < PARTS - 1 else size] for i in range(PARTS)]


def digests(buffers) -> list[bytes]:
    return [hashlib.sha256(b).digest() for b in buffers]


async def put(request):
    return Response({"sha256": digests(request.buffers), "total": sum(len(b) for b in request.buffers)})


async def get(request):
    return Response({}, make_payload(request.body["seed"], request.body["size"]))


async def _lines(stream: trio.abc.ReceiveStream):
    buf = b""
    while True:
        data = await stream.receive_some(4096)
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode()


async def main(swarm: str, listen: str) -> None:
    async with open_tcp_transport(Identity.generate(), SwarmKey.open(swarm), [listen]) as transport:
        transport.route(PUT.name, put)
        transport.route(GET.name, get)
        print(json.dumps({"address": transport.addresses[0], "peer_id": transport.peer_id.hex()}), flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        async for line in _lines(stdin):
            cmd, address, seed, size = line.split()
            assert cmd == "fetch"
            reply = await transport.call(address, GET.name, {"seed": int(seed), "size": int(size)}, timeout=120)
            print(json.dumps({"sha256": [d.hex() for d in digests(reply.buffers)],
                              "bytes": sum(len(b) for b in reply.buffers)}), flush=True)
    stats = transport.stats
    print(json.dumps({"stats": {"bytes_sent": stats.bytes_sent, "bytes_received": stats.bytes_received,
                                "protocol_errors": stats.protocol_errors}}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swarm", required=True)
    parser.add_argument("--listen", default="127.0.0.1:0")
    args = parser.parse_args()
    trio.run(main, args.swarm, args.listen)
