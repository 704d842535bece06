"""gossip.sockio: direct socket reads and writes, and trio.SocketStream's errors."""

from __future__ import annotations

import socket
import struct

import pytest
import trio
import trio.testing

from gossip import sockio


async def tcp_socket_pair() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = trio.socket.socket()
    await client.connect(listener.getsockname())
    server, _ = await listener.accept()
    listener.close()
    return client, server


async def test_recv_into_nowait_reads_what_is_there_and_says_when_nothing_is() -> None:
    a, b = trio.socket.socketpair()
    with a, b:
        buf = bytearray(8)
        with pytest.raises(trio.WouldBlock):
            sockio.recv_into_nowait(b, memoryview(buf))
        await sockio.send_all(a, b"hello")
        await trio.lowlevel.wait_readable(b)
        assert sockio.recv_into_nowait(b, memoryview(buf)) == 5 and buf[:5] == b"hello"
        await sockio.send_all(a, b"0123456789")
        await trio.lowlevel.wait_readable(b)
        assert sockio.recv_into_nowait(b, memoryview(buf)[2:5]) == 3 and buf[:5] == b"he012"
        a.shutdown(socket.SHUT_WR)
        got = bytearray()
        while True:
            try:
                n = sockio.recv_into_nowait(b, memoryview(buf))
            except trio.WouldBlock:
                await trio.lowlevel.wait_readable(b)
                continue
            if n == 0:
                break  # end of file
            got += buf[:n]
        assert got == b"3456789"


async def test_send_all_waits_for_room_and_delivers_every_byte() -> None:
    a, b = await tcp_socket_pair()
    with a, b:
        data = bytes(range(256)) * 40_000  # 10 MB: far more than the socket buffers hold
        got = bytearray()

        async def reader() -> None:
            buf = memoryview(bytearray(1 << 16))
            while len(got) < len(data):
                try:
                    n = sockio.recv_into_nowait(b, buf)
                except trio.WouldBlock:
                    await trio.lowlevel.wait_readable(b)
                    continue
                assert n
                got.extend(buf[:n])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await sockio.send_all(a, memoryview(data).cast("I"))  # any contiguous format
        assert got == data


async def test_closed_and_broken_sockets_raise_trio_stream_errors() -> None:
    a, b = await tcp_socket_pair()
    a.close()
    with pytest.raises(trio.ClosedResourceError, match="already closed"):
        sockio.recv_into_nowait(a, memoryview(bytearray(4)))
    with pytest.raises(trio.ClosedResourceError, match="already closed"):
        await sockio.send_all(a, b"x")
    b.close()
    # A peer that resets the connection (linger 0) breaks both directions.
    c, d = await tcp_socket_pair()
    d.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    d.close()
    with c:
        await trio.lowlevel.wait_readable(c)
        with pytest.raises(trio.BrokenResourceError, match="connection broken"):
            sockio.recv_into_nowait(c, memoryview(bytearray(4)))
        with pytest.raises(trio.BrokenResourceError, match="connection broken"):
            await sockio.send_all(c, b"x" * 100_000)


async def test_closing_while_waiting_wakes_the_waiter() -> None:
    a, b = trio.socket.socketpair()
    with a:

        async def wait_then_read() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await trio.lowlevel.wait_readable(b)
                sockio.recv_into_nowait(b, memoryview(bytearray(1)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_then_read)
            await trio.testing.wait_all_tasks_blocked()
            trio.lowlevel.notify_closing(b)
            b.close()
