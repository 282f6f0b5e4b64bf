"""Outside review: the host's /run never shows through a project dir.

/run is where the host's daemons listen: docker.sock (whose API is host root), containerd,
podman, systemd, users' runtime dirs. A root-started sandbox run from `/` (or `/var`)
showed it under /workspace, bound rather than copied under restrictive (read-only) and
permissive (read-write), and on that id-mapped mount host root's files are the sandbox
root's: a 0600 root socket there accepted the sandbox's connect(), /run/docker.sock
answered `GET /version`. A socket of root's in /run stands in for the engines here.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_helpers import backend_available

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="binds a root socket in /run")

PROBE = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
    print("CONNECTED", s.recv(64).decode())
except OSError as exc:
    print("refused", type(exc).__name__)
"""


@pytest.fixture
def engine_socket() -> Iterator[Path]:
    """A root-only (0600) listening socket in /run that greets whoever connects."""
    path = Path("/run") / f"ak-redteam-{secrets.token_hex(4)}.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    path.chmod(0o600)
    srv.listen(8)
    srv.settimeout(0.2)

    import threading

    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            conn.sendall(b"engine-api")
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        thread.join(5)
        srv.close()
        path.unlink(missing_ok=True)


def _run(backend: str, profile: str, cwd: str, target: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AGENTKERNEL_NO_DAEMON": "1"}
    return subprocess.run([sys.executable, "-P", "-m", "agentkernel", "run", "-q", "--backend",
                           backend, "--profile", profile, "--no-network", "--", "python3", "-c",
                           PROBE, target],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, check=False)


@pytest.mark.parametrize("backend", ["namespaces", "gvisor"])
@pytest.mark.parametrize("profile", ["restrictive", "permissive", "moderate"])
def test_a_project_containing_run_shows_no_socket_of_it(engine_socket: Path, backend: str,
                                                        profile: str) -> None:
    if not backend_available(backend):
        pytest.skip(f"{backend} not installed")
    r = _run(backend, profile, "/", f"/workspace{engine_socket}")
    assert "refused" in r.stdout or "CONNECTED" in r.stdout, r
    assert "CONNECTED" not in r.stdout, r.stdout


def test_a_project_inside_run_is_refused(engine_socket: Path) -> None:
    if not backend_available("namespaces"):
        pytest.skip("needs bwrap")
    r = _run("namespaces", "restrictive", "/run", f"/workspace/{engine_socket.name}")
    assert "CONNECTED" not in r.stdout, r.stdout
    assert r.returncode != 0 and "/run" in r.stderr, r


@pytest.mark.skipif(not backend_available("namespaces"), reason="needs bwrap")
def test_a_socket_in_home_does_not_show_under_permissive(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    path = home / ".ssh" / "cm-root@server:22"  # an ssh master connection's socket
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    path.chmod(0o600)
    srv.listen(8)
    try:
        env = {**os.environ, "AGENTKERNEL_NO_DAEMON": "1", "HOME": str(home)}
        r = subprocess.run([sys.executable, "-P", "-m", "agentkernel", "run", "-q", "--backend",
                            "namespaces", "--profile", "permissive", "--", "python3", "-c",
                            PROBE.replace("s.recv(64).decode()", "''"),
                            "/home/user/.ssh/cm-root@server:22"],
                           cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120, stdin=subprocess.DEVNULL, check=False)
        assert "refused" in r.stdout or "CONNECTED" in r.stdout, r
        assert "CONNECTED" not in r.stdout, r.stdout
    finally:
        srv.close()
