"""Bulk socket I/O for trio without `trio.socket`'s per-call overhead.

`trio.socket` wraps every `send`/`recv` in a cancellation check, a yield to the scheduler and a
context manager, which costs tens of microseconds per call: at a quarter-megabyte per call that is
a sizeable share of the CPU a gigabyte per second of bulk transfer needs. These functions call
the (already non-blocking) file descriptor directly and only wait when the kernel says so. They
do not yield when the data moves at once: their caller must be a checkpoint of its own (the
secure channel checkpoints once per `receive_some`/`send_all`).

Errors are those of `trio.SocketStream`: `trio.ClosedResourceError` once the socket is closed
(also when it is closed while we wait), `trio.BrokenResourceError` for any other OS error.
"""

from __future__ import annotations

import errno
import os

import trio

_CLOSED_ERRNOS = (errno.EBADF, errno.ENOTSOCK)


def _fileno(sock: trio.socket.SocketType) -> int:
    # Asked afresh before every call: a closed socket says -1, and a number kept across a close
    # could name some other file by then.
    fd = sock.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("this socket was already closed")
    return fd


def _broken(exc: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
    if exc.errno in _CLOSED_ERRNOS:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


def recv_into_nowait(sock: trio.socket.SocketType, buffer: memoryview) -> int:
    """Read what has arrived (1..len(buffer) bytes) into `buffer`; 0 at end of file.

    Raises `trio.WouldBlock` if nothing has arrived: `await trio.lowlevel.wait_readable(sock)`
    and try again.
    """
    try:
        return os.readv(_fileno(sock), (buffer,))
    except BlockingIOError:
        raise trio.WouldBlock from None
    except OSError as exc:
        raise _broken(exc) from exc


async def send_all(sock: trio.socket.SocketType, data: bytes | bytearray | memoryview) -> None:
    """Hand every byte of `data` to the kernel (waiting while its send buffer is full)."""
    with memoryview(data) as view:
        view = view.cast("B") if view.ndim != 1 or view.format != "B" else view
        sent, total = 0, len(view)
        while sent < total:
            try:
                sent += os.write(_fileno(sock), view[sent:])
                continue
            except BlockingIOError:
                pass
            except OSError as exc:
                raise _broken(exc) from exc
            await trio.lowlevel.wait_writable(sock)
