"""Outside review, round 4: our client hands the key `serve` stored to no other user.

With a loopback base URL and no key given, our Python client reads the key `serve` keeps
in the data dir and sent it to whatever listened on that port. Loopback is not a user
boundary: another local user listening on 127.0.0.1:18888 while `serve` is not running
(or on an address of `localhost` that `serve` does not hold) got the key, and with it
the API: every sandbox the user may start, as the user (root's, for root's server). Now
the key goes only where every listener that could take the connection is the user's own
(`client/listener.py`, from the kernel's socket tables). Attacked with a real listener of
another uid, for root's client and for `nobody`'s; a listener of the client's own uid
still gets the key.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sandbox_helpers import HEAD_LOGGER, SYSTEM_PYTHON, public_pythonpath

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")

NOBODY = 65534
OTHER = 64999  # an attacker's uid, neither root nor nobody

CLIENT = (
    "import sys\n"
    "from agentkernel.http.keys import ensure_key\n"
    "from agentkernel import AgentKernel\n"
    "print(ensure_key()[0], flush=True)\n"
    "for url in sys.argv[1:]:\n"
    "    with AgentKernel(base_url=url) as client:\n"
    "        client.list_sandboxes()\n"
)


def _as(uid: int, argv: list[str]) -> list[str]:
    if uid == os.geteuid():
        return argv
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv]


def _requests_seen(server_uid: int, client_uid: int, home: Path) -> tuple[str, list[str]]:
    """Start a listener as `server_uid`, point `client_uid`'s client at it (by address and
    by `localhost`); the client's stored key and the request heads the listener got."""
    server = subprocess.Popen(_as(server_uid, [SYSTEM_PYTHON, "-S", "-c", HEAD_LOGGER, "0",
                                               "close"]), stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline().split()[1])
        python = sys.executable if client_uid == 0 else SYSTEM_PYTHON
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(home),
               "AGENTKERNEL_HOME": str(home / "data"), "PYTHONPATH": public_pythonpath()}
        client = subprocess.run(
            _as(client_uid, [python, "-P", "-c", CLIENT, f"http://127.0.0.1:{port}",
                             f"http://localhost:{port}"]),
            env=env, capture_output=True, text=True, timeout=60, cwd=home)
        assert client.returncode == 0, (client.stdout, client.stderr)
        key = client.stdout.split()[0]
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=10)
    heads = out.splitlines()
    assert len(heads) == 2, heads  # both requests reached the listener
    return key, heads


@pytest.fixture
def home() -> Path:
    path = Path(tempfile.mkdtemp(prefix="ak-rt4-key-"))
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.mark.parametrize("victim,attacker", [(0, OTHER), (NOBODY, OTHER), (NOBODY, 0)],
                         ids=["root-client", "nobody-client", "nobody-client-root-listener"])
def test_another_users_listener_never_gets_the_stored_key(home: Path, victim: int,
                                                          attacker: int) -> None:
    os.chown(home, victim, victim)
    key, heads = _requests_seen(attacker, victim, home)
    assert len(key) > 20
    for head in heads:
        assert key not in head, head
        assert "authorization" not in head.lower(), head


@pytest.mark.parametrize("victim", [0, NOBODY], ids=["root", "nobody"])
def test_a_listener_of_our_own_gets_the_stored_key(home: Path, victim: int) -> None:
    os.chown(home, victim, victim)
    key, heads = _requests_seen(victim, victim, home)
    for head in heads:
        assert f"Bearer {key}" in head, head
