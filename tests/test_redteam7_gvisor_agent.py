"""Red team, round 7: on gVisor too, a command cannot reach into its agent.

Round 5 (`tests/test_redteam5_agent_dumpable.py`) found the agent dumpable on namespaces
and podman: a command of the same uid ptraced it and took its descriptors. gVisor was not
attacked there. Its agent holds the sandbox's channels to the host (`host:[N]` fds) and
runs as the sandbox's root, the command's uid; permissive's deny list allows ptrace and
pidfd_getfd. Here, under permissive, as root and as an ordinary user: the agent's memory
cannot be opened, it cannot be attached to, and pidfd_getfd takes none of its descriptors.
Held on the current code (a regression test, not a fix). This runsc's `/proc/1/fd/N`
does open them, though (`tests/test_redteam7_agent_frames.py`).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_helpers import backend_available, give_top, shared_top, top_argv, top_env

NOBODY = 65534

REACH = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
nr = {"x86_64": (434, 438), "aarch64": (434, 438)}[os.uname().machine]
try:
    open("/proc/1/mem", "rb").close()
    print("mem open")
except OSError as e:
    print("mem refused", e.errno)
r = libc.ptrace(16, 1, 0, 0)  # PTRACE_ATTACH
print("ptrace", r, ctypes.get_errno())
pidfd = libc.syscall(nr[0], 1, 0)
got = []
if pidfd >= 0:
    for fd in range(64):
        if libc.syscall(nr[1], pidfd, fd, 0) >= 0:
            got.append(fd)
print("taken", got, flush=True)
"""


@pytest.fixture
def top() -> Iterator[Path]:
    with shared_top("ak-rt7-gvagent-") as path:
        yield path


@pytest.mark.parametrize("user", [0, NOBODY], ids=["root", "nobody"])
def test_a_gvisor_command_cannot_reach_into_its_agent(top: Path, user: int) -> None:
    if os.geteuid() != 0 or not backend_available("gvisor"):
        pytest.skip("needs root and gvisor")
    give_top(top, user)
    argv = top_argv(user, "gvisor", "permissive", REACH)
    # --no-network before our `--` (setpriv's comes first): an ordinary user's slirp
    # needs a tun device this host keeps 0600, and the network is not what is attacked.
    argv.insert(len(argv) - 1 - argv[::-1].index("--"), "--no-network")
    r = subprocess.run(argv, cwd=top / "project", env=top_env(top), capture_output=True,
                       text=True, timeout=240, stdin=subprocess.DEVNULL, check=False)
    lines = {x.split()[0]: x for x in r.stdout.splitlines() if x.split()}
    assert {"mem", "ptrace", "taken"} <= set(lines), (r.stdout, r.stderr)
    assert lines["mem"].startswith("mem refused"), lines["mem"]
    assert lines["ptrace"].split()[1] == "-1", lines["ptrace"]
    assert lines["taken"] == "taken []", lines["taken"]
