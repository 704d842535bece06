"""Transport throughput over loopback TCP: raw trio TCP vs. the secure channel vs. RPC.

Each measurement runs the receiver in this process and the sender in a separate process (spawned
with multiprocessing), so the two sides use two cores as two real peers would. The receiver times
from the first byte it gets to the last; a one-byte acknowledgement keeps the sender from closing
early. Every figure is the best of `--trials` runs (highest GB/s, lowest CPU per byte): on a
shared machine other work only ever slows a run down, so the best run is the least disturbed
one. Raw and secure runs are interleaved, and the ratio compares figures from the same
invocation.

    python scripts/bench/transport.py [--mib 256] [--trials 7] [--frame-sizes 65536,262144]
                                       [--json PATH]

RPC (gossip.tcp.TcpTransport, the whole stack: handshake, frames, RPC chunks, validation) is
measured against a server in a separate process: `rpc_bulk_gbps` times one call carrying the
transfer as 16 MiB buffers (from the call to its reply; the receiver allocates the buffers it
hands to the handler), after one untimed warm-up call of the same size (steady state: the
receiver's allocator reuses memory instead of faulting in fresh pages), and `rpc_p50_us` / `rpc_p99_us` are the round-trip times of `--pings`
sequential wire.ping calls on an open connection.

The secure channel is measured twice at the default frame size: reading with `receive_some`
(a fresh bytes object per frame, as any trio stream) and with `receive_into` one reused buffer
(each frame decrypted straight into it: the channel's own cost, as the RPC layer uses it).

JSON keys: raw_gbps, secure_gbps (at the default frame size), ratio (secure/raw),
secure_by_frame_size ({frame size: GB/s}), secure_into_gbps, rpc_bulk_gbps, rpc_ratio (rpc/raw),
rpc_p50_us, rpc_p99_us, and CPU ns per byte of each side: raw_cpu_ns_per_byte,
secure_cpu_ns_per_byte, secure_into_cpu_ns_per_byte, rpc_cpu_ns_per_byte. GB = 1e9 bytes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without install

import trio  # noqa: E402

from gossip.channel import open_secure_channel  # noqa: E402
from gossip.frames import DEFAULT_FRAME_PLAINTEXT  # noqa: E402
from gossip.identity import Identity, SwarmKey  # noqa: E402
from gossip import messages  # noqa: E402
from gossip.tcp import open_tcp_transport  # noqa: E402
from gossip.transport import Response  # noqa: E402

SWARM = SwarmKey.open("bench-transport")
SEND_CHUNK = 4 << 20  # bytes per send_all call: an application handing over large tensors
RAW_READ = 1 << 18  # raw receiver's read size (the best of 64 KiB..1 MiB on this machine)

Wrap = Callable[[trio.abc.Stream, bool], Awaitable[trio.abc.Stream]]


def _wrapper(kind: str, frame_size: int) -> Wrap:
    async def raw(stream: trio.abc.Stream, initiator: bool) -> trio.abc.Stream:
        return stream

    async def secure(stream: trio.abc.Stream, initiator: bool) -> trio.abc.Stream:
        return await open_secure_channel(
            stream, identity=Identity.generate(), swarm=SWARM, initiator=initiator, frame_size=frame_size
        )

    return raw if kind == "raw" else secure


async def _sender(kind: str, frame_size: int, port: int, nbytes: int, cpu: Any) -> None:
    stream = await _wrapper(kind, frame_size)(await trio.open_tcp_stream("127.0.0.1", port), True)
    payload = memoryview(os.urandom(SEND_CHUNK))
    sent = 0
    c0 = time.process_time()
    while sent < nbytes:
        n = min(SEND_CHUNK, nbytes - sent)
        await stream.send_all(payload[:n])
        sent += n
    cpu.value = time.process_time() - c0
    await stream.receive_some(1)  # the receiver's acknowledgement
    await stream.aclose()


def _sender_process(kind: str, frame_size: int, port: int, nbytes: int, cpu: Any) -> None:
    trio.run(_sender, kind, frame_size, port, nbytes, cpu)


@dataclass
class Run:
    gbps: float  # receiver-side throughput, 1e9 bytes/s
    send_cpu_ns: float  # sender CPU time per byte (user + system), ns
    recv_cpu_ns: float  # receiver CPU time per byte, ns


async def _receive_run(kind: str, frame_size: int, nbytes: int, into: bool = False) -> Run:
    """One transfer of `nbytes` from a separate sender process (`into`: SecureStream.receive_into
    one reused buffer instead of a fresh bytes object per frame)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    ctx = mp.get_context("spawn")
    send_cpu = ctx.Value("d", 0.0)
    proc = ctx.Process(target=_sender_process, args=(kind, frame_size, port, nbytes, send_cpu))
    proc.start()
    try:
        with trio.fail_after(120):
            tcp = await listeners[0].accept()
            stream = await _wrapper(kind, frame_size)(tcp, False)
            read = RAW_READ if kind == "raw" else None  # None: one whole frame per call
            buffer = memoryview(bytearray(frame_size)) if into else None
            got, t0 = 0, 0.0
            while got < nbytes:
                if buffer is not None:
                    n = await stream.receive_into(buffer)  # type: ignore[attr-defined]
                else:
                    n = len(await stream.receive_some(read))
                if not n:
                    raise RuntimeError(f"sender closed after {got} of {nbytes} bytes")
                if not got:
                    t0, c0 = time.perf_counter(), time.process_time()
                got += n
            elapsed = time.perf_counter() - t0
            recv_cpu = time.process_time() - c0
            await stream.send_all(b"k")
            await stream.aclose()
    finally:
        for listener in listeners:
            await listener.aclose()
        await trio.to_thread.run_sync(proc.join, 30)
    return Run(nbytes / elapsed / 1e9, send_cpu.value / nbytes * 1e9, recv_cpu / nbytes * 1e9)


def measure_raw(nbytes: int) -> Run:
    """One transfer over a raw trio TCP stream (the baseline)."""
    return trio.run(_receive_run, "raw", 0, nbytes)


def measure_secure(nbytes: int, frame_size: int = DEFAULT_FRAME_PLAINTEXT, into: bool = False) -> Run:
    """One transfer over SecureStream on TCP (handshake excluded)."""
    return trio.run(_receive_run, "secure", frame_size, nbytes, into)


RPC_BUFFER = 16 << 20  # bytes per buffer of the bulk call
RPC_BULK = messages.define(
    "bench.rpc_bulk", 1, messages.Map({}), messages.Map({"cpu_s": messages.Float(0.0)}),
    max_request_buffers=messages.MAX_BUFFERS, max_buffer_bytes=messages.MAX_BUFFER_BYTES,
)


async def _rpc_server(address: Any, stop: Any, cpu_mark: list) -> None:
    async with open_tcp_transport(Identity.generate(), SWARM) as transport:

        async def ping(request: Any) -> Response:  # marks the start of the receiver's CPU time
            cpu_mark[:] = [time.process_time()]
            return Response({"nonce": request.body["nonce"]})

        async def bulk(request: Any) -> Response:
            return Response({"cpu_s": time.process_time() - cpu_mark[0]})

        transport.route(messages.PING.name, ping)
        transport.route(RPC_BULK.name, bulk)
        address.put(transport.addresses[0])
        await trio.to_thread.run_sync(stop.wait)


def _rpc_server_process(address: Any, stop: Any) -> None:
    trio.run(_rpc_server, address, stop, [0.0])


async def _with_rpc_server(client: Callable[[Any, str], Awaitable[Any]]) -> Any:
    """Run `client(transport, server_address)` against an RPC server in a separate process."""
    ctx = mp.get_context("spawn")
    address, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_rpc_server_process, args=(address, stop))
    proc.start()
    try:
        server = await trio.to_thread.run_sync(address.get, True, 60)
        async with open_tcp_transport(Identity.generate(), SWARM, listen=[]) as transport:
            with trio.fail_after(300):
                return await client(transport, server)
    finally:
        stop.set()
        await trio.to_thread.run_sync(proc.join, 30)


async def _rpc_bulk(transport: Any, server: str, nbytes: int) -> Run:
    payload = memoryview(os.urandom(RPC_BUFFER))
    buffers = [payload[: min(RPC_BUFFER, nbytes - at)] for at in range(0, nbytes, RPC_BUFFER)]
    # A warm-up call of the same size first: a long-running node receives into memory its
    # allocator has had before, while a fresh process pays for first-touch page faults (on a VM
    # several ns per byte), which would measure the machine rather than the transport.
    await transport.call(server, RPC_BULK.name, {}, buffers, timeout=300)
    await transport.call(server, messages.PING.name, {"nonce": 0}, timeout=30)  # mark CPU
    t0, c0 = time.perf_counter(), time.process_time()
    reply = await transport.call(server, RPC_BULK.name, {}, buffers, timeout=300)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    return Run(nbytes / elapsed / 1e9, cpu / nbytes * 1e9, reply.body["cpu_s"] / nbytes * 1e9)


async def _rpc_pings(transport: Any, server: str, pings: int) -> tuple[float, float]:
    for i in range(100):  # connect and warm up
        await transport.call(server, messages.PING.name, {"nonce": i}, timeout=30)
    rtts = []
    for i in range(pings):
        t0 = time.perf_counter()
        await transport.call(server, messages.PING.name, {"nonce": i}, timeout=30)
        rtts.append(time.perf_counter() - t0)
    rtts.sort()
    return rtts[len(rtts) // 2] * 1e6, rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))] * 1e6


def measure_rpc_bulk(nbytes: int) -> Run:
    """One RPC call carrying `nbytes` in 16 MiB buffers over TcpTransport (connection already open)."""
    return trio.run(_with_rpc_server, lambda t, server: _rpc_bulk(t, server, nbytes))


def measure_rpc_latency(pings: int) -> tuple[float, float]:
    """(p50, p99) round-trip microseconds of `pings` sequential wire.ping calls over TcpTransport."""
    return trio.run(_with_rpc_server, lambda t, server: _rpc_pings(t, server, pings))


def _best(runs: list[Run]) -> Run:
    return Run(
        gbps=max(r.gbps for r in runs),
        send_cpu_ns=min(r.send_cpu_ns for r in runs),
        recv_cpu_ns=min(r.recv_cpu_ns for r in runs),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB per transfer (default 256)")
    parser.add_argument("--trials", type=int, default=7, help="transfers per figure; the best is kept")
    parser.add_argument("--frame-sizes", default="", help="comma-separated extra frame sizes to compare")
    parser.add_argument("--pings", type=int, default=2000, help="pings per RPC latency run (default 2000)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    nbytes = args.mib << 20

    sizes = [DEFAULT_FRAME_PLAINTEXT] + [int(x) for x in args.frame_sizes.split(",") if x and int(x) != DEFAULT_FRAME_PLAINTEXT]
    raw_runs: list[Run] = []
    secure_runs: dict[int, list[Run]] = {size: [] for size in sizes}
    into_runs: list[Run] = []
    rpc_runs: list[Run] = []
    latencies: list[tuple[float, float]] = []
    # Interleave the measurements so slow drifts of a shared machine hit all of them alike.
    for _ in range(args.trials):
        raw_runs.append(measure_raw(nbytes))
        for size in sizes:
            secure_runs[size].append(measure_secure(nbytes, size))
        into_runs.append(measure_secure(nbytes, into=True))
        rpc_runs.append(measure_rpc_bulk(nbytes))
        latencies.append(measure_rpc_latency(args.pings))
    raw = _best(raw_runs)
    secure = {size: _best(runs) for size, runs in secure_runs.items()}
    default = secure[DEFAULT_FRAME_PLAINTEXT]
    into = _best(into_runs)
    rpc = _best(rpc_runs)
    p50, p99 = min(p for p, _ in latencies), min(p for _, p in latencies)

    print(f"loopback TCP, {args.mib} MiB per transfer, best of {args.trials}; "
          "sender and receiver in separate processes")
    print(f"{'measurement':<34} {'GB/s':>7} {'vs raw':>7} {'send ns/B':>10} {'recv ns/B':>10}")
    rows = [("raw trio TCP", raw)] + [
        (f"secure, {size // 1024} KiB frames" + (" (default)" if size == DEFAULT_FRAME_PLAINTEXT else ""), secure[size])
        for size in sorted(secure)
    ]
    rows.append(("secure, receive_into one buffer", into))
    rows.append((f"RPC call, {RPC_BUFFER >> 20} MiB buffers", rpc))
    for label, run in rows:
        print(f"{label:<34} {run.gbps:>7.3f} {run.gbps / raw.gbps:>7.2f} {run.send_cpu_ns:>10.3f} {run.recv_cpu_ns:>10.3f}")
    print(f"RPC round trip (wire.ping, {args.pings} sequential calls): p50 {p50:.0f} us, p99 {p99:.0f} us")
    if args.json:
        results = {
            "raw_gbps": raw.gbps,
            "secure_gbps": default.gbps,
            "ratio": default.gbps / raw.gbps,
            "raw_cpu_ns_per_byte": {"send": raw.send_cpu_ns, "recv": raw.recv_cpu_ns},
            "secure_cpu_ns_per_byte": {"send": default.send_cpu_ns, "recv": default.recv_cpu_ns},
            "secure_by_frame_size": {str(size): run.gbps for size, run in sorted(secure.items())},
            "secure_into_gbps": into.gbps,
            "secure_into_cpu_ns_per_byte": {"send": into.send_cpu_ns, "recv": into.recv_cpu_ns},
            "rpc_bulk_gbps": rpc.gbps,
            "rpc_ratio": rpc.gbps / raw.gbps,
            "rpc_cpu_ns_per_byte": {"send": rpc.send_cpu_ns, "recv": rpc.recv_cpu_ns},
            "rpc_p50_us": p50,
            "rpc_p99_us": p99,
        }
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
