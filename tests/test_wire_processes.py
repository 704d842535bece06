"""Two real processes handshake over loopback TCP and move 100 MB each way, checked by hash."""

import json
import subprocess
import sys
from pathlib import Path

import trio

from gossip.identity import Identity, SwarmKey
from gossip.tcp import open_tcp_transport

from wire_peer import GET, PUT, digests, get, make_payload

SIZE = 100_000_000
PEER = Path(__file__).resolve().parent / "wire_peer.py"


class Lines:
    """Lines from a child's stdout, each read under a deadline."""

    def __init__(self, stream):
        self.stream, self.buf = stream, b""

    async def next(self, timeout=60) -> dict:
        with trio.fail_after(timeout):
            while b"\n" not in self.buf:
                data = await self.stream.receive_some(4096)
                assert data, f"the peer process exited early; got {self.buf!r}"
                self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


async def test_two_processes_exchange_100_mb_each_way():
    swarm = "test-wire-processes"
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(PEER), "--swarm", swarm], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        out = Lines(proc.stdout)
        hello = await out.next(timeout=30)
        child_id = bytes.fromhex(hello["peer_id"])
        async with open_tcp_transport(Identity.generate(), SwarmKey.open(swarm)) as t:
            t.route(GET.name, get)
            # Parent -> child: 100 MB in four buffers; the child answers their hashes.
            payload = make_payload(1, SIZE)
            reply = await t.call(hello["address"], PUT.name, {}, payload, timeout=120, peer_id=child_id)
            assert reply.body == {"sha256": digests(payload), "total": SIZE}
            # Child -> parent: 100 MB generated over there, hashed here.
            reply = await t.call(hello["address"], GET.name, {"seed": 2, "size": SIZE}, timeout=120, peer_id=child_id)
            assert digests(reply.buffers) == digests(make_payload(2, SIZE))
            # The child calls us back (on the same connection) and hashes what it got.
            await proc.stdin.send_all(f"fetch {t.addresses[0]} 3 {SIZE}\n".encode())
            fetched = await out.next(timeout=120)
            assert fetched == {"sha256": [d.hex() for d in digests(make_payload(3, SIZE))], "bytes": SIZE}
            assert len(t.connections) == 1 and t.connections[0].initiator
            await proc.stdin.aclose()  # the child closes gracefully
            child = (await out.next(timeout=30))["stats"]
        with trio.fail_after(30):
            assert await proc.wait() == 0
        # Socket bytes, counted independently in two processes, agree exactly.
        assert child == {"bytes_sent": t.stats.bytes_received, "bytes_received": t.stats.bytes_sent,
                         "protocol_errors": 0}
        assert t.stats.bytes_sent > 2 * SIZE and t.stats.bytes_received > SIZE  # we served the fetch too
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
