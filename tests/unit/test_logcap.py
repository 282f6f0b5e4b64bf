"""ak-logcap (agent/ak-logcap.c), the bounded reader of gVisor's stderr and a guest's
console that base.bounded_log starts: the first MAX bytes kept, the rest read and dropped
to the end, whatever the log file does; as the given ids, in a session of its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel.backends.base import LOG_MAX_BYTES, bounded_log, log_reader_argv
from agentkernel.paths import native_binary

DATA = bytes(range(256)) * 4096  # 1 MiB: many times a pipe's buffer
NOBODY = 65534


def _logcap() -> str:
    return str(native_binary("ak-logcap"))


def _feed(argv: list[str], stdout: int, data: bytes = DATA) -> subprocess.CompletedProcess[bytes]:
    """`argv` fed `data` through a pipe we write ourselves: a reader that stopped reading
    early would fail our write (EPIPE), which subprocess's communicate would hide."""
    r, w = os.pipe()
    proc = subprocess.Popen(argv, stdin=r, stdout=stdout, stderr=subprocess.PIPE)
    os.close(r)
    try:
        with os.fdopen(w, "wb") as pipe:
            pipe.write(data)
    finally:
        err = proc.communicate(timeout=60)[1]
    return subprocess.CompletedProcess(argv, proc.returncode, b"", err)


@pytest.mark.parametrize("limit", [0, 1000, len(DATA), 2 * len(DATA)])
def test_keeps_the_first_bytes_and_reads_the_rest(tmp_path: Path, limit: int) -> None:
    log = tmp_path / "log"
    with open(log, "wb") as f:
        done = _feed([_logcap(), str(limit)], f.fileno())
    assert done.returncode == 0, done.stderr
    assert log.read_bytes() == DATA[:limit]


def test_a_file_that_refuses_writes_does_not_stop_the_reading(tmp_path: Path) -> None:
    (tmp_path / "log").write_bytes(b"")
    fd = os.open(tmp_path / "log", os.O_RDONLY)  # (every write fails: as a full disk's)
    try:
        done = _feed([_logcap(), "1000"], fd)
    finally:
        os.close(fd)
    assert done.returncode == 0, done.stderr


def test_a_log_pipe_with_no_reader_does_not_kill_it() -> None:
    r, w = os.pipe()
    os.close(r)  # (a write gets EPIPE, never SIGPIPE: it goes on reading)
    try:
        done = _feed([_logcap(), "1000"], w)
    finally:
        os.close(w)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("argv", [
    [], [""], ["x"], ["-1"], ["+1"], [" 1"], ["0x10"], ["1", "2"], ["1", "2", "3", "4"],
    ["99999999999999999999999"],  # past 2^64
    ["1", "4294967295", "0"], ["1", "0", "4294967295"],  # (uid_t)-1: "unchanged" to setresuid
    ["1", "4294967296", "0"],
])
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    r = subprocess.run([_logcap(), *argv], stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=60, check=False)
    assert r.returncode == 2 and b"usage" in r.stderr


def test_argv() -> None:
    assert log_reader_argv(5) == [_logcap(), "5"]
    assert log_reader_argv(LOG_MAX_BYTES, (NOBODY, NOBODY + 1)) == [
        _logcap(), str(LOG_MAX_BYTES), str(NOBODY), str(NOBODY + 1)]


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _wait_for_bytes(log: Path) -> None:
    for _ in range(6000):
        if log.stat().st_size:
            return
        time.sleep(0.01)
    raise AssertionError(f"nothing reached {log}")


@pytest.mark.parametrize("reader", [None, (NOBODY, NOBODY)], ids=["as-is", "dropped"])
def test_bounded_log_keeps_a_mib_in_its_own_session(tmp_path: Path,
                                                    reader: tuple[int, int] | None) -> None:
    if reader is not None and os.geteuid() != 0:
        pytest.skip("needs root")
    log = tmp_path / "backend.log"
    w, proc = bounded_log(log, reader=reader)
    try:
        os.write(w, b"x")
        _wait_for_bytes(log)  # (read, so its ids are dropped)
        status = _status(proc.pid)
        assert os.getsid(proc.pid) == proc.pid and os.readlink(f"/proc/{proc.pid}/cwd") == "/"
        if reader is not None:
            assert status["Uid"].split() == [str(NOBODY)] * 4
            assert status["Gid"].split() == [str(NOBODY)] * 4
            assert status["Groups"].strip() == ""
        with os.fdopen(w, "wb") as pipe:
            w = -1
            pipe.write(DATA * 2)
    finally:
        if w >= 0:
            os.close(w)
        assert proc.wait(timeout=60) == 0
    assert log.stat().st_mode & 0o777 == 0o600
    assert log.read_bytes() == (b"x" + DATA * 2)[:LOG_MAX_BYTES]


@pytest.fixture
def public_logcap() -> Iterator[str]:
    """A copy `nobody` may run (/work is 0700)."""
    top = Path(tempfile.mkdtemp(prefix="ak-logcap-", dir="/var/tmp"))
    try:
        top.chmod(0o755)
        shutil.copy2(_logcap(), top / "ak-logcap")
        yield str(top / "ak-logcap")
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_ids_it_cannot_take_stop_it_before_it_reads(public_logcap: str) -> None:
    """Nothing read (the writer sees no reader) when it cannot become UID GID."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv")
    r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                        "--", public_logcap, "1000", "0", "0"], stdin=subprocess.PIPE,
                       capture_output=True, timeout=60, check=False)
    assert r.returncode == 127 and b"ak-logcap: setgroups" in r.stderr, r
