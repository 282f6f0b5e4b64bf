"""Outside review: root's CLI never talks to another user's daemon.

The native command checked the socket's owner and the peer's uid, but anything it was
unsure of went to the Python CLI, whose client connected to whatever listened at the
path. A runtime dir from the environment (`AGENTKERNEL_RUNTIME_DIR`, kept by `sudo -E`)
can name another user's dir: their "daemon" then got root's request (its cwd,
caller_env, user config path; `run --agent`'s API key) and chose what root's terminal
showed and the exit code. Host user `nobody` serves a fake daemon here.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_helpers import SYSTEM_PYTHON

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                                reason="needs root (to become nobody) and setpriv")

# nobody's daemon: records every request line it gets, answers each as a finished run.
FAKE = """
import json, os, select, socket, sys
path, log = sys.argv[1], sys.argv[2]
srvs = []
for p in (path, os.path.join(os.path.dirname(path), "api.sock")):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(p)
    srv.listen(8)
    srvs.append(srv)
print("up", flush=True)
while True:
    ready, _, _ = select.select(srvs, [], [])
    conn, _ = ready[0].accept()
    conn.settimeout(2)
    try:
        data = conn.recv(1 << 20)
    except OSError:
        data = b""
    with open(log, "ab") as f:
        f.write(data)
    answer = {"ok": True, "ev": "exit", "result": {"exit_code": 0, "message": "FAKE DAEMON"}}
    try:  # (a client that refused us has hung up already)
        conn.sendall(json.dumps(answer).encode() + b"\\n")
    except OSError:
        pass
    conn.close()
"""


@pytest.fixture
def nobodys_daemon() -> Iterator[tuple[Path, Path]]:
    """(a runtime dir of nobody's with nobody's daemon.sock in it, the log of its requests)."""
    top = Path(tempfile.mkdtemp(prefix="ak-redteam-peer-", dir="/tmp"))
    top.chmod(0o755)
    rt = top / "run"
    rt.mkdir(mode=0o700)
    os.chown(rt, NOBODY, NOBODY)
    log = rt / "requests"
    proc = subprocess.Popen(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY),
                             "--clear-groups", SYSTEM_PYTHON, "-c", FAKE,
                             str(rt / "daemon.sock"), str(log)],
                            stdout=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin"})
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "up\n"
        yield rt, log
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(top, ignore_errors=True)


def _cli(argv: list[str], rt: Path, cwd: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AGENTKERNEL_RUNTIME_DIR": str(rt), "AGENTKERNEL_DAEMON_AUTOSTART": "0",
           "ANTHROPIC_API_KEY": "sk-root-secret-key", **extra}
    env.pop("AGENTKERNEL_NO_DAEMON", None)
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, check=False)


@pytest.mark.parametrize("command", [["run", "--", "echo", "mine"], ["exec", "box", "--", "id"],
                                     ["list"]], ids=["run", "exec", "list"])
def test_the_python_cli_refuses_another_users_daemon(
        nobodys_daemon: tuple[Path, Path], tmp_path: Path, command: list[str]) -> None:
    rt, log = nobodys_daemon
    r = _cli([sys.executable, "-P", "-m", "agentkernel", *command], rt, tmp_path)
    time.sleep(0.2)  # (a request it got is in its log by now)
    assert not log.exists() or log.read_bytes() == b"", log.read_bytes()[:300]
    assert "FAKE DAEMON" not in r.stderr + r.stdout, r
    assert "uid 65534" in r.stderr, r


def test_the_native_cli_and_its_fallback_refuse_it(nobodys_daemon: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    from native_cli_helpers import native_binary

    rt, log = nobodys_daemon
    native = native_binary()
    for argv in ([str(native), "run", "--", "echo", "mine"],
                 [str(native), "run", "--agent", "claude-code", "--", "--version"]):
        r = _cli(argv, rt, tmp_path, AGENTKERNEL_PYTHON=sys.executable)
        assert "FAKE DAEMON" not in r.stderr + r.stdout, (argv, r)
    time.sleep(0.2)
    got = log.read_bytes() if log.exists() else b""
    assert b"sk-root-secret-key" not in got and got == b"", got[:300]


def test_our_sdk_refuses_another_users_api_socket(nobodys_daemon: tuple[Path, Path],
                                                  tmp_path: Path) -> None:
    """`AgentKernel()` with no base URL talks to the daemon's api.sock: not nobody's."""
    rt, log = nobodys_daemon
    code = ("from agentkernel.client import AgentKernel\n"
            "try:\n"
            "    print(AgentKernel().list_sandboxes())\n"
            "except Exception as exc:\n"
            "    print('refused:', exc)\n")
    r = _cli([sys.executable, "-P", "-c", code], rt, tmp_path)
    time.sleep(0.2)
    assert not log.exists() or log.read_bytes() == b"", log.read_bytes()[:300]
    assert "uid 65534" in r.stdout + r.stderr, r


def _serve_ours(path: Path) -> socket.socket:
    """An API server of ours (this test's uid) at `path`: every answer an empty list."""
    import contextlib
    import threading

    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(8)

    def loop() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):  # (a connection only checked, closed)
                conn.settimeout(5)
                seen = b""
                while b"\r\n\r\n" not in seen:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    seen += chunk
                body = b'{"success":true,"data":[],"error":null}'
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
                             + body)

    threading.Thread(target=loop, daemon=True).start()
    return srv


def test_our_sdk_checks_the_connection_it_uses(nobodys_daemon: tuple[Path, Path],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The socket checked when the client is made is not the one a later request reaches:
    nobody (whose runtime dir it is) swaps api.sock for their own after the check. Each
    connection's own peer is checked, sync and async, so the request never reaches them."""
    import asyncio

    from agentkernel.client import AgentKernel, AsyncAgentKernel
    from agentkernel.client.errors import NetworkError

    rt, log = nobodys_daemon
    monkeypatch.setenv("AGENTKERNEL_RUNTIME_DIR", str(rt))
    monkeypatch.setenv("AGENTKERNEL_DAEMON_AUTOSTART", "0")
    monkeypatch.delenv("AGENTKERNEL_BASE_URL", raising=False)
    theirs = rt / "api.sock"
    swapped = rt / "theirs.sock"
    os.rename(theirs, swapped)  # (nobody's server keeps listening on it)
    ours = _serve_ours(theirs)
    try:
        sync = AgentKernel()
        aio = AsyncAgentKernel()
        assert sync.list_sandboxes() == []  # ours answers while it is there
        os.rename(swapped, theirs)  # what nobody can do in their own dir at any time
        with pytest.raises(NetworkError, match="uid 65534"):
            sync.list_sandboxes()

        async def listed() -> object:
            try:
                return await aio.list_sandboxes()
            finally:
                await aio.close()

        with pytest.raises(NetworkError, match="uid 65534"):
            asyncio.run(listed())
        sync.close()
    finally:
        ours.close()
    time.sleep(0.2)
    assert not log.exists() or log.read_bytes() == b"", log.read_bytes()[:300]
