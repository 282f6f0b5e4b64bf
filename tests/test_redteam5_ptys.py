"""Outside review, round 5: one sandbox cannot take every pty the host gives sandboxes.

The kernel shares `kernel.pty.max` less `kernel.pty.reserve` (3072 of 4096 by default)
among every devpts instance but the host's own. bwrap gives a namespaces sandbox an
instance with no `max`, so one sandbox (any profile, as root or as an ordinary user)
opened 3071 ptys and held them: every other sandbox's `exec -t`, interactive run or
terminal-using tool, and every container, then got ENOSPC. Now the agent remounts the
sandbox's `/dev/pts` with `max=` PTY_MAX before anything runs (the command cannot change
it: no capability). Attacked as root and as `nobody`; a second sandbox opens a pty while
the first holds all its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel.profiles import PTY_MAX
from sandbox_helpers import backend_available, shared_top, top_argv, top_env

NOBODY = 65534
TRY = PTY_MAX + 64  # enough to see the cap, far from the host's whole share

HOLD = f"""
import os, sys
fds = []
try:
    while len(fds) < {TRY}:
        m, s = os.openpty(); fds.append(m); os.close(s)
except OSError:
    pass
print("held", len(fds), flush=True)
sys.stdin.read()
"""
ONE = "import os; os.openpty(); print('one-ok')"


@pytest.fixture
def top() -> Iterator[Path]:
    with shared_top("ak-rt5-pty-") as path:
        yield path


def _argv(top: Path, user: int, script: str, backend: str = "namespaces"
          ) -> tuple[list[str], dict[str, str]]:
    return top_argv(user, backend, None, script), top_env(top)


@pytest.mark.parametrize("user", [0, NOBODY], ids=["root", "nobody"])
def test_a_sandbox_holds_at_most_its_share_of_ptys(top: Path, user: int) -> None:
    if os.geteuid() != 0 or not backend_available("namespaces"):
        pytest.skip("needs root and bwrap")
    if user != 0:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv")
        for p in (top, *top.iterdir()):
            os.chown(p, user, user)
    argv, env = _argv(top, user, HOLD)
    holder = subprocess.Popen(argv, cwd=top / "project", env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        line = holder.stdout.readline()
        argv, env = _argv(top, user, ONE)
        other = subprocess.run(argv, cwd=top / "project", env=env, capture_output=True,
                               text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)
        holder.stdin.close()
        holder.wait(timeout=120)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=30)
    assert line.startswith("held"), line
    assert 16 <= int(line.split()[1]) <= PTY_MAX, line
    assert "one-ok" in other.stdout, (other.stdout, other.stderr)


def test_a_podman_sandbox_holds_at_most_its_share_of_ptys(top: Path) -> None:
    if os.geteuid() != 0 or not backend_available("podman"):
        pytest.skip("needs root and podman")
    argv, env = _argv(top, 0, HOLD.replace("sys.stdin.read()", ""), "podman")
    r = subprocess.run(argv, cwd=top / "project", env=env, capture_output=True, text=True,
                       timeout=180, stdin=subprocess.DEVNULL, check=False)
    assert r.stdout.startswith("held"), (r.stdout, r.stderr)
    assert int(r.stdout.split()[1]) <= PTY_MAX, r.stdout
