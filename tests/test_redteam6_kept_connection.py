"""Outside review, round 6: a connection kept alive from another user's listener never
carries the stored key.

Our client decided whether to add the key `serve` stored by looking, at each request, at
who listened on the port; httpx then sent the request down a connection it had kept from
earlier. Attack: another user listens on the port while the user's `serve` is down; the
client's first request goes there without the key (the check refused) and is answered with
keep-alive; the attacker closes its listener and keeps the connection; the user's server
comes back on the port; the client's next request passed the listener check and went, key
and all, down the attacker's kept connection. Now the key goes only down connections whose
server end was checked when they were made (`client/_keyed.py`). Attacked for real, with
the sync and the async client, as root against `nobody` and as `nobody` against another uid.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_helpers import HEAD_LOGGER, SYSTEM_PYTHON, public_pythonpath

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")

NOBODY = 65534
OTHER = 64999  # an attacker's uid, neither root nor nobody

# The user's client: one request, then (told to go on) two more, on one client object.
CLIENT = r"""
import sys
from agentkernel.http.keys import ensure_key
print("key", ensure_key()[0], flush=True)
if sys.argv[2] == "sync":
    from agentkernel import AgentKernel
    with AgentKernel(base_url=sys.argv[1]) as client:
        client.list_sandboxes()
        print("first", flush=True)
        sys.stdin.readline()
        client.list_sandboxes()
        client.list_sandboxes()
else:
    import asyncio
    from agentkernel import AsyncAgentKernel

    async def main():
        async with AsyncAgentKernel(base_url=sys.argv[1]) as client:
            await client.list_sandboxes()
            print("first", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            await client.list_sandboxes()
            await client.list_sandboxes()
    asyncio.run(main())
print("done", flush=True)
"""


def _as(uid: int, argv: list[str]) -> list[str]:
    if uid == 0:
        return argv
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv]


def _start(uid: int, script: str, *args: str, home: Path,
           stdin: bool = False) -> subprocess.Popen[str]:
    python = sys.executable if uid == 0 else SYSTEM_PYTHON
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(home),
           "AGENTKERNEL_HOME": str(home / "data"), "PYTHONPATH": public_pythonpath(),
           "AGENTKERNEL_NO_DAEMON": "1", "AGENTKERNEL_DAEMON_AUTOSTART": "0"}
    return subprocess.Popen(_as(uid, [python, "-P", "-c", script, *args]), env=env, cwd=home,
                            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _expect(proc: subprocess.Popen[str], word: str) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(word):
        proc.kill()
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"expected {word!r}, got {line!r}; stderr: {err}")
    return line[len(word):].strip()


def _stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.kill()
    out, _ = proc.communicate(timeout=30)
    return out


@pytest.fixture
def home() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ak-rt6-key-"))
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("victim,attacker", [(0, NOBODY), (NOBODY, OTHER)],
                         ids=["root-client", "nobody-client"])
def test_a_kept_connection_of_another_user_never_gets_the_stored_key(
        home: Path, victim: int, attacker: int, kind: str) -> None:
    os.chown(home, victim, victim)
    procs: list[subprocess.Popen[str]] = []
    try:
        # The attacker: answers the first request with keep-alive, closes its listener
        # ("released") and goes on answering what comes down that connection.
        bad = _start(attacker, HEAD_LOGGER, "0", "release", home=home)
        procs.append(bad)
        port = _expect(bad, "port")
        client = _start(victim, CLIENT, f"http://localhost:{port}", kind, home=home,
                        stdin=True)
        procs.append(client)
        key = _expect(client, "key")
        _expect(client, "first")  # answered by the attacker, with keep-alive
        _expect(bad, "head")
        _expect(bad, "released")  # its listener closed, its connection kept
        # Our own server back on the port (SO_REUSEADDR, as `serve` binds).
        ours = _start(victim, HEAD_LOGGER, port, "keep", home=home)
        procs.append(ours)
        _expect(ours, "port")
        assert client.stdin is not None
        client.stdin.write("go\n")
        client.stdin.flush()
        _expect(client, "done")
    finally:
        outs = [_stop(p) for p in procs]
    attacker_saw, ours_saw = outs[0], outs[2]
    assert len(key) > 20
    assert key not in attacker_saw, "the attacker's kept connection got the stored key"
    assert "authorization" not in attacker_saw.lower(), attacker_saw
    # Both later requests went, with the key, to our own server.
    assert ours_saw.count(f"Bearer {key}") == 2, ours_saw


# Another user's listener that accepts one connection when told to (a line on stdin).
ON_COMMAND = r"""
import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(8)
print("port", s.getsockname()[1], flush=True)
sys.stdin.readline()
c, _ = s.accept()
print("accepted", flush=True)
sys.stdin.readline()
"""


def test_another_users_server_end_is_refused_queued_or_accepted(home: Path) -> None:
    """The check itself, each way the server end can be when it runs: still queued at the
    other user's listener, and accepted by that user's process."""
    import socket

    from agentkernel.client.listener import foreign_server

    bad = _start(NOBODY, ON_COMMAND, home=home, stdin=True)
    try:
        port = int(_expect(bad, "port"))
        assert bad.stdin is not None
        with socket.create_connection(("127.0.0.1", port)) as conn:
            queued = foreign_server(conn)
            assert queued is not None and f"uid {NOBODY}" in queued, queued
            bad.stdin.write("accept\n")
            bad.stdin.flush()
            _expect(bad, "accepted")
            accepted = foreign_server(conn)
            assert accepted is not None and f"uid {NOBODY}" in accepted, accepted
    finally:
        _stop(bad)
