"""node.launcher: output capture, SIGTERM then SIGKILL, process groups, cleanup on failure."""

import os
import signal
import sys
import textwrap
import time

import pytest
from launcher_fixture import launcher  # noqa: F401  (the fixture)

from node.launcher import Launcher

PY = sys.executable


def script(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


def gone(pid: int, timeout: float = 10.0) -> bool:
    """True once no process `pid` exists (a zombie counts as gone: it runs nothing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


def test_output_is_captured_to_a_file_and_to_a_pipe(launcher):
    to_file = launcher.start(script("print('hello'); print('bye', flush=True)"), name="filed")
    piped = launcher.start(script("import sys; print('out'); print('err', file=sys.stderr)"), output="pipe")
    assert to_file.wait_for_line(lambda line: line == "bye", timeout=20) == "bye"
    assert piped.wait_for_line(lambda line: line == "err", timeout=20) == "err"
    assert to_file.popen.wait(timeout=20) == 0 and piped.popen.wait(timeout=20) == 0
    assert to_file.lines() == ["hello", "bye"]
    assert to_file.log_path.name == "000-filed.log" and to_file.log_path.parent == launcher.log_dir
    assert sorted(piped.lines()) == ["err", "out"] and piped.log_path is None


def test_sigterm_first_then_sigkill_after_the_deadline(launcher):
    polite = launcher.start(script("""
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
        print('ready', flush=True)
        time.sleep(600)
    """))
    stubborn = launcher.start(script("""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print('ready', flush=True)
        time.sleep(600)
    """))
    for proc in (polite, stubborn):
        proc.wait_for_line(lambda line: line == "ready", timeout=20)
    assert launcher.stop(polite, timeout=10) == 0  # it handled SIGTERM and exited cleanly
    assert launcher.stop(stubborn, timeout=0.5) == -signal.SIGKILL
    assert not polite.running and not stubborn.running


def test_stopping_reaches_grandchildren_in_the_group(launcher):
    parent = launcher.start(script(f"""
        import subprocess, time
        child = subprocess.Popen([{PY!r}, "-c", "import time; time.sleep(600)"])
        print(child.pid, flush=True)
        time.sleep(600)
    """))
    grandchild = int(parent.wait_for_line(str.isdigit, timeout=20))
    assert not gone(grandchild, timeout=0.1)
    assert launcher.stop(parent) == -signal.SIGTERM
    assert gone(grandchild)


def test_a_failing_block_still_stops_everything(tmp_path):
    with pytest.raises(RuntimeError, match="test failed"):
        with Launcher(log_dir=tmp_path) as launcher:
            procs = [launcher.start(script("import time; time.sleep(600)")) for _ in range(3)]
            raise RuntimeError("test failed")
    assert [p.returncode for p in procs] == [-signal.SIGTERM] * 3
    with pytest.raises(RuntimeError, match="closed"):
        launcher.start(script("pass"))


def test_children_die_with_the_process_that_started_them(launcher):
    # A middle process starts a sleeper with die_with_parent, then is SIGKILLed: it cannot
    # clean up, yet the kernel kills the sleeper.
    middle = launcher.start(script(f"""
        import time
        from node.launcher import Launcher
        inner = Launcher(die_with_parent=True)
        sleeper = inner.start([{PY!r}, "-c", "import time; time.sleep(600)"])
        print(sleeper.pid, flush=True)
        time.sleep(600)
    """), env={"PYTHONPATH": os.getcwd()})
    sleeper = int(middle.wait_for_line(str.isdigit, timeout=20))
    assert launcher.kill(middle) == -signal.SIGKILL
    assert gone(sleeper)


def test_waiting_for_a_line_that_never_comes(launcher):
    quiet = launcher.start(script("print('nothing to see', flush=True)"))
    with pytest.raises(ChildProcessError, match="exited with 0"):
        quiet.wait_for_line(lambda line: line == "never", timeout=20)
    slow = launcher.start(script("import time; time.sleep(600)"))
    with pytest.raises(TimeoutError, match="no matching line within 0.2s"):
        slow.wait_for_line(lambda line: True, timeout=0.2)


def test_bad_arguments_are_refused(launcher):
    with pytest.raises(ValueError, match="output"):
        launcher.start(script("pass"), output="tty")
    with pytest.raises(ValueError, match="argv"):
        launcher.start([])
    with pytest.raises(ValueError, match="stop_timeout_s"):
        Launcher(stop_timeout_s=0)
