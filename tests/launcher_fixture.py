"""The `launcher` fixture: a `node.launcher.Launcher` that stops everything after each test.

Import it into a test module with `from launcher_fixture import launcher  # noqa: F401`
(tests/ is on sys.path under pytest's default import mode). Logs go under the test's tmp_path.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from node.launcher import Launcher


@pytest.fixture
def launcher(tmp_path) -> Iterator[Launcher]:
    # die_with_parent: even if pytest itself is killed, the kernel kills what the test started.
    with Launcher(log_dir=tmp_path / "logs", stop_timeout_s=5.0, die_with_parent=True) as launcher:
        yield launcher
