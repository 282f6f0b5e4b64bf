"""Outside review: another local user, with no key, cannot starve the API's process.

Loopback is every user's and the key is checked only once a request's head has arrived.
Before, a connection that sent half a head was kept for good: host user `nobody` holding
1100 of them ran a `serve` (whose fd limit was the usual 1024) out of descriptors, and with
it the daemon's own socket ("the peer's process is gone") and every sandbox start, until it
let go. Now a head has a deadline and the open connections a cap.

Round 6: that cap was the others' to take. `nobody` holding 300 idle connections, each
renewed with a keyless `/health` within its head deadline, had every new connection of the
user's closed at once. Now the connections are counted per peer uid: one uid other than the
server's own holds at most `PER_PEER`, all of them together at most `OTHERS`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest
from akhttp import API_KEY

from agentkernel.http import connections
from agentkernel.http.serve import RunningServer
from agentkernel.http.serve import start_in_thread as serve_thread
from sandbox_helpers import SYSTEM_PYTHON

NOBODY = 65534
OTHER = 64999  # another local user, neither root nor nobody
AUTH = {"Authorization": f"Bearer {API_KEY}"}
FLOOD = connections.MAX_CONNECTIONS + 64

# As nobody: open FLOOD connections, each with half a request head, and hold them; say how
# many are open, then, every 0.2 s, how many the server has closed.
HOLDER = """
import socket, sys, time
socks = []
for _ in range(int(sys.argv[2])):
    try:  # (one the server closed at once, over its cap, may refuse the send)
        s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
        s.sendall(b"GET /health HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nX-Slow: ")
        socks.append(s)
    except OSError:
        continue
print("holding", len(socks), flush=True)
for s in socks:
    s.setblocking(False)
while True:
    closed = 0
    for s in socks:
        try:
            closed += s.recv(1) == b""
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    print("closed", closed, flush=True)
    time.sleep(0.2)
"""


# As nobody: open FLOOD connections, ask each for /health (no key needed) and keep those
# answered with keep-alive; say how many; then renew each (another /health) every 0.5 s,
# well within the head deadline, saying how many are still served after each round.
RENEWER = """
import socket, sys, time

def health(s):
    s.sendall(b"GET /health HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n\\r\\n")
    data = b""
    while b"\\r\\n\\r\\n" not in data:
        d = s.recv(4096)
        if not d:
            return False
        data += d
    head, _, body = data.partition(b"\\r\\n\\r\\n")
    length = 0
    for line in head.split(b"\\r\\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        d = s.recv(4096)
        if not d:
            return False
        body += d
    return head.startswith(b"HTTP/1.1 200")

def alive(socks):
    kept = []
    for s in socks:
        try:
            if health(s):
                kept.append(s)
                continue
        except OSError:
            pass
        s.close()
    return kept

socks = []
for _ in range(int(sys.argv[2])):
    try:
        socks.append(socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5))
    except OSError:
        continue
socks = alive(socks)
print("holding", len(socks), flush=True)
while True:
    time.sleep(0.5)
    socks = alive(socks)
    print("alive", len(socks), flush=True)
"""

OTHER_HEALTH = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
s.sendall(b"GET /health HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nConnection: close\\r\\n\\r\\n")
data = b""
while True:
    d = s.recv(4096)
    if not d:
        break
    data += d
print(data.split(b"\\r\\n", 1)[0].decode() or "closed", flush=True)
"""


def _our_sockets() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            continue
    return n


@pytest.fixture
def quick_server(service: object, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningServer]:
    monkeypatch.setattr(connections, "HEAD_SECONDS", 1.0)
    srv = serve_thread(service, "127.0.0.1", 0, api_key=API_KEY)  # type: ignore[arg-type]
    yield srv
    srv.stop()


@pytest.fixture
def plain_server(service: object) -> Iterator[RunningServer]:
    srv = serve_thread(service, "127.0.0.1", 0, api_key=API_KEY)  # type: ignore[arg-type]
    yield srv
    srv.stop()


def _as(uid: int, *argv: str) -> list[str]:
    return ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups", *argv]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root (to become nobody) and setpriv")
def test_another_users_kept_connections_leave_ours_their_places(
        plain_server: RunningServer) -> None:
    port = str(plain_server.port)
    holder = subprocess.Popen(
        _as(NOBODY, "prlimit", f"--nofile={FLOOD + 64}", "--", SYSTEM_PYTHON, "-c", RENEWER,
            port, str(FLOOD)), stdout=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin"})
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()
        assert line.startswith("holding"), line
        held = int(line.split()[1])
        # While nobody holds (and renews) what it got, our requests get in, each on a new
        # connection,
        for _ in range(5):
            resp = httpx.get(plain_server.url + "/sandboxes", headers=AUTH, timeout=60)
            assert resp.status_code == 200, resp.text
        # and so does a third user's.
        other = subprocess.run(_as(OTHER, SYSTEM_PYTHON, "-c", OTHER_HEALTH, port),
                               capture_output=True, text=True, timeout=60,
                               env={"PATH": "/usr/bin:/bin"})
        assert other.stdout.strip() == "HTTP/1.1 200 OK", (other.stdout, other.stderr)
        line = holder.stdout.readline()
        assert line.startswith("alive"), line  # the holder was still at it
        # nobody got what one uid may hold, not every place the server has.
        assert 0 < held <= connections.PER_PEER, held
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root (to become nobody) and setpriv")
def test_half_sent_heads_of_another_user_hold_nothing(quick_server: RunningServer) -> None:
    before = _our_sockets()
    holder = subprocess.Popen(
        ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups",
         "prlimit", f"--nofile={FLOOD + 64}", "--", SYSTEM_PYTHON, "-c", HOLDER,
         str(quick_server.port), str(FLOOD)],
        stdout=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin"})
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()
        assert line.startswith("holding"), line
        held = int(line.split()[1])
        assert held > 0, line
        # The cap: whatever the flood, the server keeps at most MAX_CONNECTIONS of them.
        assert _our_sockets() - before <= connections.MAX_CONNECTIONS + 8
        # The deadline: every half-sent head is closed by the server.
        deadline = time.monotonic() + 60
        closed = 0
        while closed < held:
            assert time.monotonic() < deadline, f"only {closed} of {held} closed"
            line = holder.stdout.readline()
            if line.startswith("closed"):
                closed = int(line.split()[1])
        # The holder still has its sockets; we serve our own requests (with the key).
        resp = httpx.post(quick_server.url + "/run", json={"command": ["echo", "served"]},
                          headers=AUTH, timeout=60)
        assert resp.status_code == 200 and "served" in resp.text, resp.text
    finally:
        holder.kill()
        holder.wait()


def test_a_slow_request_with_a_key_is_not_cut(quick_server: RunningServer) -> None:
    """The deadline is for a head: a request that runs longer keeps its connection."""
    with httpx.Client(base_url=quick_server.url, headers=AUTH, timeout=60) as client:
        resp = client.post("/run", json={"command": ["sh", "-c", "sleep 2; echo slow"]})
        assert resp.status_code == 200 and "slow" in resp.text, resp.text
        resp = client.post("/run", json={"command": ["echo", "again"]})  # same connection
        assert resp.status_code == 200 and "again" in resp.text, resp.text
