"""Outside review, round 5: a sandbox's listener never gets the key `serve` stored.

Our client sends the stored key only where every listener that could take the
connection is the user's own (`client/listener.py`, round 4). An ordinary user's
`permissive` sandbox shares the host's network namespace and its sockets are that user's:
code in it that listened on the port of `serve` (not running, or on an address of
`localhost` that `serve` does not hold) passed the uid check and got the key, and with
it the user's API (a sandbox with the user's `$HOME` read-write: out of the sandbox).
Now the listener's socket must also be held by a process of the client's own user
namespace (no sandbox's: each has one of its own). Attacked with a real permissive
sandbox as root and as `nobody`; a plain listener of the user's still gets the key.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_helpers import HEAD_LOGGER, SYSTEM_PYTHON, backend_available, public_pythonpath

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not backend_available("namespaces"),
                                reason="needs root (to act as nobody) and bubblewrap")

NOBODY = 65534

CLIENT = (
    "import sys\n"
    "from agentkernel.http.keys import ensure_key\n"
    "from agentkernel import AgentKernel\n"
    "print(ensure_key()[0], flush=True)\n"
    "with AgentKernel(base_url=sys.argv[1]) as client:\n"
    "    client.list_sandboxes()\n"
)


def _as(uid: int, argv: list[str]) -> list[str]:
    if uid == 0:
        return argv
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv]


def _env(home: Path) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(home),
            "AGENTKERNEL_HOME": str(home / "data"), "AGENTKERNEL_RUNTIME_DIR": str(home / "run"),
            "AGENTKERNEL_NO_DAEMON": "1", "AGENTKERNEL_DAEMON_AUTOSTART": "0",
            "PYTHONPATH": public_pythonpath()}


def _head_seen(user: int, home: Path, in_sandbox: bool) -> tuple[str, str]:
    """A listener on loopback (in a permissive sandbox of `user`'s, or a plain process of
    `user`'s), `user`'s client pointed at it: (the stored key, the request head it got)."""
    python = sys.executable if user == 0 else SYSTEM_PYTHON
    server_argv = [SYSTEM_PYTHON, "-S", "-c", HEAD_LOGGER, "0", "once"]
    if in_sandbox:
        project = home / "project"
        project.mkdir(exist_ok=True)
        os.chown(project, user, user)
        server_argv = [python, "-P", "-m", "agentkernel", "run", "-q", "-B", "namespaces",
                       "--profile", "permissive", "--", "python3", "-S", "-c", HEAD_LOGGER,
                       "0", "once"]
    server = subprocess.Popen(_as(user, server_argv), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env(home),
                              cwd=home / "project" if in_sandbox else home)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line:
            pytest.fail(f"the listener did not start: {server.stderr.read()}")  # type: ignore[union-attr]
        port = int(line.split()[1])
        client = subprocess.run(
            _as(user, [python, "-P", "-c", CLIENT, f"http://127.0.0.1:{port}"]),
            env=_env(home), capture_output=True, text=True, timeout=60, cwd=home)
        assert client.returncode == 0, (client.stdout, client.stderr)
        key = client.stdout.split()[0]
        out, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate(timeout=30)
    return key, out


@pytest.fixture
def home() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ak-rt5-key-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.mark.parametrize("user", [0, NOBODY], ids=["root", "nobody"])
def test_a_permissive_sandboxs_listener_never_gets_the_stored_key(home: Path,
                                                                  user: int) -> None:
    os.chown(home, user, user)
    key, head = _head_seen(user, home, in_sandbox=True)
    assert len(key) > 20
    assert "GET" in head, head  # the request reached the sandbox's listener
    assert key not in head, "the sandbox's listener got the stored key"
    assert "authorization" not in head.lower(), head


@pytest.mark.parametrize("user", [0, NOBODY], ids=["root", "nobody"])
def test_a_plain_listener_of_the_user_still_gets_it(home: Path, user: int) -> None:
    os.chown(home, user, user)
    key, head = _head_seen(user, home, in_sandbox=False)
    assert f"Bearer {key}" in head, head
