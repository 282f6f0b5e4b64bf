"""paths.read_pid: the one reader of pid files (a rootless engine's, the daemon's autostart
stamp), bounded, and strict about what a pid is."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentkernel.paths import read_pid


@pytest.mark.parametrize(("text", "pid"), [
    (b"1234\n", 1234), (b"  77  ", 77), (b"", 0), (b"12a", 0), (b"-5", 0),
    ("\u0661\u0662".encode(), 0),  # (digits, but not ASCII ones)
    (b"1" * 40, 0), (b"7" * 31 + b"\n", 0),  # (longer than a pid file; past any pid_max)
    (b"4194304", 4194304),
])
def test_read_pid(tmp_path: Path, text: bytes, pid: int) -> None:
    (tmp_path / "pid").write_bytes(text)
    assert read_pid(tmp_path / "pid") == pid
    assert read_pid(str(tmp_path / "missing")) == 0
