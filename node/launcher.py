"""Start N local processes, capture their output, and always stop every one of them.

    with Launcher(log_dir=Path("logs")) as launcher:
        a = launcher.start([sys.executable, "-m", "node.membership_node", "--listen", "127.0.0.1:0"])
        line = a.wait_for_line(lambda l: l.startswith("{"), timeout=10)
        ...
    # every process started above is stopped here, whatever happened inside the block

Each child runs in its own process group (a new session), so stopping it reaches whatever it
started in turn. Stopping is SIGTERM to the group, a wait with a deadline, then SIGKILL to the
group; the group is killed once more while the child is still unreaped (a zombie keeps its pid,
so the group id cannot have been reused by then). `stop_all` runs on leaving the block, on an
exception inside it and, for a launcher never closed, at interpreter exit. With
`die_with_parent=True` (Linux) the kernel also kills a child when the process that started it
dies, even by SIGKILL; the starting *thread* must then live as long as the child.

Output goes to one file per process under `log_dir` (stdout and stderr interleaved), or with
`output="pipe"` into a bounded in-memory buffer drained by a thread, so a chatty child never
blocks on a full pipe. Either way `lines()` and `wait_for_line()` read it.
"""

from __future__ import annotations

import collections
import ctypes
import os
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

MAX_PIPE_LINES = 10_000  # lines of a piped child's output kept in memory (oldest dropped)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ManagedProcess:
    """One started child: its output, its state, and signals to its process group."""

    def __init__(self, name: str, argv: list[str], popen: subprocess.Popen, log_path: Path | None) -> None:
        self.name = name
        self.argv = argv
        self.popen = popen
        self.log_path = log_path
        self._pipe_lines: collections.deque[str] = collections.deque(maxlen=MAX_PIPE_LINES)
        self._reader: threading.Thread | None = None
        if popen.stdout is not None:
            self._reader = threading.Thread(target=self._drain, name=f"launcher-{name}", daemon=True)
            self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """None while running; negative -N if it died from signal N."""
        return self.popen.poll()

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def lines(self) -> list[str]:
        """Everything it printed so far, as lines without their newline."""
        if self.log_path is not None:
            try:
                text = self.log_path.read_text(errors="replace")
            except FileNotFoundError:
                return []
            return text.splitlines()
        return list(self._pipe_lines)

    def output(self) -> str:
        return "\n".join(self.lines())

    def wait_for_line(self, predicate: Callable[[str], bool], timeout: float, start: int = 0) -> str:
        """The first line (from index `start`) matching `predicate`; TimeoutError after `timeout`
        seconds, or ChildProcessError if the process exits without printing one."""
        deadline = time.monotonic() + timeout
        while True:
            exited = not self.running
            for line in self.lines()[start:]:
                if predicate(line):
                    return line
            if exited:
                raise ChildProcessError(
                    f"{self.name} exited with {self.returncode} without the line; it printed:\n{self.tail()}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.name}: no matching line within {timeout:g}s; it printed:\n{self.tail()}")
            time.sleep(0.02)

    def tail(self, n: int = 20) -> str:
        return "\n".join(self.lines()[-n:])

    def signal(self, sig: int) -> None:
        """Send `sig` to its whole process group (no-op once it is gone)."""
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _drain(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            self._pipe_lines.append(raw.decode(errors="replace").rstrip("\n"))


class Launcher:
    """Starts processes and guarantees they are stopped: use it as a context manager."""

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        *,
        stop_timeout_s: float = 5.0,
        die_with_parent: bool = False,
    ) -> None:
        if not stop_timeout_s > 0:
            raise ValueError("stop_timeout_s must be > 0 seconds")
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="murmur-logs-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.stop_timeout_s = stop_timeout_s
        self.die_with_parent = die_with_parent
        self.processes: list[ManagedProcess] = []
        self._lock = threading.Lock()
        self._closed = False
        # A launcher that is never closed still stops its children when it is collected or,
        # at the latest, when the interpreter exits (finalize objects run at exit).
        self._finalizer = weakref.finalize(self, Launcher._stop_list, self.processes, stop_timeout_s)

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(
        self,
        argv: Sequence[str],
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        output: str = "file",
    ) -> ManagedProcess:
        """Start `argv` in a new process group. `env` is added to (not replacing) ours."""
        if self._closed:
            raise RuntimeError("this Launcher is closed; make a new one")
        if output not in ("file", "pipe"):
            raise ValueError("output must be 'file' (one log per process) or 'pipe' (in memory)")
        argv = [str(a) for a in argv]
        if not argv:
            raise ValueError("argv must name a program")
        with self._lock:
            index = len(self.processes)
        name = name or f"p{index}"
        full_env = {**os.environ, **(env or {})}
        log_path = None
        if output == "file":
            log_path = self.log_dir / f"{index:03d}-{name}.log"
            stdout = open(log_path, "wb")
        else:
            stdout = subprocess.PIPE
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=cwd,
                start_new_session=True,  # its own process group: stop reaches grandchildren
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        finally:
            if output == "file":
                stdout.close()  # the child holds its own descriptor
        proc = ManagedProcess(name, argv, popen, log_path)
        with self._lock:
            self.processes.append(proc)
        return proc

    def stop(self, proc: ManagedProcess, timeout: float | None = None) -> int:
        """SIGTERM its group, wait up to `timeout` (default stop_timeout_s), then SIGKILL."""
        return self._stop_list([proc], self.stop_timeout_s if timeout is None else timeout)[0]

    def kill(self, proc: ManagedProcess) -> int:
        """SIGKILL its group at once (a crash, for tests), and reap it."""
        return self._stop_list([proc], self.stop_timeout_s, first_signal=signal.SIGKILL)[0]

    def stop_all(self) -> list[int]:
        """Stop every process started here, all at once; their exit codes in start order."""
        return self._stop_list(list(self.processes), self.stop_timeout_s)

    def close(self) -> None:
        self._closed = True
        self.stop_all()
        self._finalizer.detach()

    @staticmethod
    def _stop_list(procs: list[ManagedProcess], timeout: float, first_signal: int = signal.SIGTERM) -> list[int]:
        """Signal all, wait together against one deadline, SIGKILL what is left, reap."""
        for proc in procs:
            if _unreaped_alive(proc.popen):
                proc.signal(first_signal)
        deadline = time.monotonic() + timeout
        while any(_unreaped_alive(p.popen) for p in procs) and time.monotonic() < deadline:
            time.sleep(0.01)
        codes = []
        for proc in procs:
            # Kill the group before reaping: until the leader is reaped its pid, and so the group
            # id, cannot be reused, and grandchildren that outlived it die here too.
            proc.signal(signal.SIGKILL)
            codes.append(proc.popen.wait())
            if proc._reader is not None:
                proc._reader.join(timeout=1.0)
        return codes


def _unreaped_alive(popen: subprocess.Popen) -> bool:
    """True while the child runs; it stays unreaped (a zombie) so its pid stays reserved."""
    if popen.returncode is not None:
        return False
    try:
        info = os.waitid(os.P_PID, popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return info is None
