"""backends/log_reader.py, the bounded reader of gVisor's stderr and a guest's console: the
first MAX bytes kept, the rest read and dropped to the end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentkernel.backends import log_reader

SCRIPT = Path(log_reader.__file__)
DATA = bytes(range(256)) * 4096  # 1 MiB: many times a pipe's buffer, past MAX


def _read_through(stdout: int, limit: str = "1000") -> subprocess.CompletedProcess[bytes]:
    """The reader as bounded_log starts it, fed DATA; it ends at EOF, once all is read."""
    return subprocess.run([sys.executable, "-I", "-S", str(SCRIPT), limit], input=DATA,
                          stdout=stdout, stderr=subprocess.PIPE, timeout=60, check=False)


def test_keeps_the_first_bytes_and_reads_the_rest(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with open(log, "wb") as f:
        done = _read_through(f.fileno())
    assert done.returncode == 0, done.stderr
    assert log.read_bytes() == DATA[:1000]


def test_a_file_that_refuses_writes_does_not_stop_the_reading(tmp_path: Path) -> None:
    (tmp_path / "log").write_bytes(b"")
    fd = os.open(tmp_path / "log", os.O_RDONLY)  # (every write fails: as a full disk's)
    try:
        done = _read_through(fd)
    finally:
        os.close(fd)
    assert done.returncode == 0, done.stderr


def test_copy_bounded_counts_what_it_kept() -> None:
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    os.write(w, b"abcdef")
    os.close(w)
    try:
        assert log_reader.copy_bounded(r, out_w, 4) == 4
        assert os.read(out_r, 16) == b"abcd"
    finally:
        for fd in (r, out_r, out_w):
            os.close(fd)


@pytest.mark.parametrize("argv", [[], ["x"], ["-1"], ["1", "2"], ["1", "2", "3", "4"]])
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    assert log_reader.main(argv) == 2
