"""Host processes and directories of sandboxes the daemon may no longer be the parent of."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import time
from pathlib import Path


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def is_zombie(pid: int) -> bool:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True
    return data[data.rfind(b")") + 2 :][:1] in (b"Z", b"X")


def alive(pid: int | None, start: int | None) -> bool:
    """True if `pid` still names the process started at `start` and has not exited."""
    if not pid:
        return False
    now = start_time(pid)
    return now is not None and (start is None or now == start) and not is_zombie(pid)


def kill(pid: int | None, start: int | None, *, wait: float = 2.0) -> None:
    """SIGKILL a process we recorded (only if it is still the same one); reap it if ours."""
    if not pid or not alive(pid, start):
        _reap(pid)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        _reap(pid)
        if not alive(pid, start):
            return
        time.sleep(0.005)


def _reap(pid: int | None) -> None:
    if pid:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def rmtree(path: Path) -> None:
    """Remove a tree even where overlayfs left mode-000 work dirs behind."""
    if not path.exists() and not path.is_symlink():
        return

    def fix(func: object, p: str, _exc: object) -> None:
        parent = os.path.dirname(p)
        with contextlib.suppress(OSError):
            os.chmod(parent, stat.S_IRWXU)
        with contextlib.suppress(OSError):
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, stat.S_IRWXU)
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.unlink(p)

    shutil.rmtree(path, onerror=fix)
    shutil.rmtree(path, ignore_errors=True)
