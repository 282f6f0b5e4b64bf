"""Outside review, round 5: a gVisor sandbox cannot grow a host file without bound.

The agent's stderr under gVisor is a host descriptor runsc donates, pointing at the
scratch dir's `backend.log`; this runsc lets a command open it again by `/proc/1/fd/2`
(its /proc does not check the agent's dumpability there) and write: a host file on the
host's disk (`/run` is the disk here) grew by whatever the command wrote, past every cap
the sandbox has. Now runsc's stderr is a pipe whose reader keeps the first MiB
(`backends.base.bounded_log`, the microVM console's) and drops the rest, reading on:
runsc must never write to a pipe with no reader (it would die of SIGPIPE).
Attacked as root and as `nobody`.
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

from sandbox_helpers import SYSTEM_PYTHON, backend_available, public_pythonpath

NOBODY = 65534
MIB = 1 << 20

FLOOD = r"""
import os, sys, time
fd = os.open("/proc/1/fd/2", os.O_WRONLY)
n = 0
try:
    while n < 4 << 20:  # (a pipe may take part of a write)
        n += os.write(fd, b"x" * min(1 << 20, (4 << 20) - n))
except OSError as e:
    print("refused", e, flush=True)
print("wrote", n, flush=True)
sys.stdin.read()  # until the test has looked
os.write(fd, b"after\n")  # the log's reader is still there (runsc would die of SIGPIPE)
print("after ok", flush=True)
"""


@pytest.fixture
def top() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ak-rt5-glog-", dir="/var/tmp"))
    path.chmod(0o755)
    for sub in ("project", "run", "data"):
        (path / sub).mkdir(mode=0o755 if sub == "project" else 0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("user", [0, NOBODY], ids=["root", "nobody"])
def test_a_command_cannot_grow_runscs_log_on_the_host(top: Path, user: int) -> None:
    if os.geteuid() != 0 or not backend_available("gvisor"):
        pytest.skip("needs root and runsc")
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(top),
           "AGENTKERNEL_HOME": str(top / "data"), "AGENTKERNEL_RUNTIME_DIR": str(top / "run"),
           "AGENTKERNEL_NO_DAEMON": "1", "PYTHONPATH": public_pythonpath()}
    cmd = [sys.executable, "-P", "-m", "agentkernel"]
    if user != 0:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv")
        for p in (top, *top.iterdir()):
            os.chown(p, user, user)
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--",
               SYSTEM_PYTHON, "-P", "-m", "agentkernel"]
    proc = subprocess.Popen([*cmd, "run", "-q", "-B", "gvisor", "--", "python3", "-c",
                             FLOOD], cwd=top / "project", env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        logs = list((top / "run").rglob("backend.log"))
        sizes = {str(p): p.stat().st_size for p in logs}
        proc.stdin.close()
        proc.wait(timeout=120)
        out = proc.stdout.read()
        err = proc.stderr.read() if proc.stderr is not None else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert line.startswith("wrote"), (line, out, err)
    assert logs, "no backend.log under the runtime dir"
    assert all(size <= MIB for size in sizes.values()), sizes
    # The reader keeps its MiB and drops the rest, reading on: no write fails (a write
    # to runsc's stderr with no reader would kill runsc), and the sandbox lives on.
    assert int(line.split()[1]) == 4 * MIB, line
    assert "after ok" in out and proc.returncode == 0, (out, err)
