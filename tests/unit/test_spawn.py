"""spawn.py: a child started through ctypes' posix_spawn gets what Popen(close_fds=True,
pass_fds=..., start_new_session=True) gives it, and nothing more of ours."""

from __future__ import annotations

import os
import shutil
import signal

import pytest

from agentkernel import spawn

pytestmark = pytest.mark.skipif(not spawn.available(), reason="needs glibc 2.34+")
SH = shutil.which("sh") or "/bin/sh"
# What the child reports: its open fds, its ignored and blocked signals, whether it leads
# its own session, and its environment.
REPORT = ('ls /proc/self/fd; grep -E "^Sig(Ign|Blk)" /proc/self/status; '
          'test "$(cut -d" " -f6 /proc/self/stat)" = "$$" && echo leader; env')


def _report(keep: list[int], leak: int, env: dict[str, str]) -> str:
    out_r, out_w = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        pid = spawn.spawn([SH, "-c", REPORT], env, stdio=(null, out_w, out_w), keep=keep)
    finally:
        os.close(out_w)
        os.close(null)
    with os.fdopen(out_r, "rb") as f:
        text = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert leak > 0
    return text


def test_only_stdio_and_kept_fds_reach_the_child() -> None:
    kept = os.open(os.devnull, os.O_RDONLY)  # O_CLOEXEC, as Python makes every fd
    leak = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(leak, True)  # an inheritable fd of ours: it must not get it either
    high = os.dup2(leak, 200)  # above the kept one: closefrom's part
    try:
        lines = _report([kept], leak, {"AK_TEST": "1"}).splitlines()
    finally:
        for fd in (kept, leak, high):
            os.close(fd)
    fds = {int(x) for x in lines if x.isdigit()}
    assert {0, 1, 2, kept} <= fds  # (and the fd `ls` itself has open)
    assert leak not in fds and high not in fds
    assert "leader" in lines  # its own session
    sig = {k: int(v, 16) for k, _, v in (ln.partition(":\t") for ln in lines)
           if k in ("SigIgn", "SigBlk")}
    assert sig["SigIgn"] == 0  # SIGPIPE back to default, glibc's own signals not ignored
    assert "AK_TEST=1" in lines and not any(x.startswith("HOME=") for x in lines)  # env only


def test_spawned_popen_behaves_as_popen() -> None:
    old = signal.getsignal(signal.SIGPIPE)
    assert old == signal.SIG_IGN  # Python's own setting: the child must not inherit it
    r, w = os.pipe()
    null = os.open(os.devnull, os.O_RDWR)
    try:
        proc = spawn.SpawnedPopen([SH, "-c", "read x; exit 7"], {}, stdin=r, stdout=null,
                                  stderr=null)
    finally:
        os.close(r)
        os.close(null)
    assert proc.poll() is None
    os.write(w, b"go\n")
    os.close(w)
    assert proc.wait(timeout=10) == 7
    assert proc.returncode == 7


def test_a_missing_program_raises() -> None:
    with pytest.raises(OSError):
        spawn.spawn(["/nonexistent/program"], {})
    with pytest.raises(OSError):
        spawn.spawn(["relative"], {})
    null = os.open(os.devnull, os.O_RDWR)
    try:
        with pytest.raises(OSError):
            spawn.SpawnedPopen(["/nonexistent/program"], {}, stdin=null, stdout=null,
                               stderr=null)
    finally:
        os.close(null)
