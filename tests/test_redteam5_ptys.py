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
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel.profiles import PTY_MAX
from sandbox_helpers import SYSTEM_PYTHON, backend_available, public_pythonpath

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
    path = Path(tempfile.mkdtemp(prefix="ak-rt5-pty-", dir="/var/tmp"))
    path.chmod(0o755)
    for sub in ("project", "run", "data"):
        (path / sub).mkdir(mode=0o755 if sub == "project" else 0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _argv(top: Path, user: int, script: str, backend: str = "namespaces"
          ) -> tuple[list[str], dict[str, str]]:
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(top),
           "AGENTKERNEL_HOME": str(top / "data"), "AGENTKERNEL_RUNTIME_DIR": str(top / "run"),
           "AGENTKERNEL_NO_DAEMON": "1", "PYTHONPATH": public_pythonpath()}
    cmd = [sys.executable, "-P", "-m", "agentkernel"]
    if user != 0:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--",
               SYSTEM_PYTHON, "-P", "-m", "agentkernel"]
    return [*cmd, "run", "-q", "-B", backend, "--", "python3", "-c", script], env


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
