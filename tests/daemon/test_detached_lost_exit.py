"""A detached command that ends while its daemon cannot read (stopped, then killed) must
not show "running" for good under the next daemon.

The agent sends a command's exit once: an exit the daemon had not read or recorded when
it died went nowhere. Since protocol revision 1.3 the agent remembers how its last commands
ended and answers QUERY ("has the command on channel N ended, and how?"), and a daemon that
adopts a sandbox asks for each detached command it re-attaches (recovery._adopt): the exit
comes again and is recorded.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path

from conftest import Daemon

HOST = ("-i", "host", "-B", "namespaces")


def _pids_running(token: bytes) -> list[int]:
    """Host processes whose command line holds `token` (the sandbox's command and sleep)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
                state = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
            except OSError:
                continue
            if token in cmd and state not in (b"Z", b"X"):
                found.append(int(entry))
    return found


def _until(what: str, done: Callable[[], object], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_an_exit_the_killed_daemon_never_read_does_not_leave_it_running(
        daemon: Daemon) -> None:
    daemon.ensure_up()
    name = f"lost-{secrets.token_hex(3)}"
    token = f"7{secrets.randbelow(10**6):06d}.5"  # a sleep no other process runs
    assert daemon.ak("create", name, *HOST).returncode == 0
    try:
        with daemon.use():
            from agentkernel.ipc import client

            det = client.call("exec_detached", {"name": name, "argv": [
                "sh", "-c", f"sleep {token}; exit 3"]})
        _until("the command did not start", lambda: _pids_running(token.encode()))
        pid = daemon.pid()
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # it reads nothing more from the agent
        try:
            for p in _pids_running(b"sleep\0" + token.encode()):
                os.kill(p, signal.SIGTERM)  # the command goes on to `exit 3`
            _until("the command did not end", lambda: not _pids_running(token.encode()))
            # The agent reaps it and writes its exit into the stopped daemon's socket at
            # once (nothing waits there); give it that moment before the kill.
            time.sleep(1)
        finally:
            os.kill(pid, signal.SIGKILL)
        _until("the killed daemon lives on", lambda: not Path(f"/proc/{pid}").exists() or
               Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] in
               (b"Z", b"X"))
        assert daemon.ak("exec", name, "--", "true").returncode == 0  # a new daemon adopts
        with daemon.use():
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                st = client.call("detached_status", {"name": name, "cmd_id": det["id"]})
                if st["status"] != "running":
                    break
                time.sleep(0.1)
        assert st["status"] == "completed" and st["exit_code"] == 3, st
    finally:
        daemon.ak("remove", name)
