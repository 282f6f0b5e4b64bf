"""Red team, round 8: another local user, with no key, cannot fill the user's disk
through the API's log.

uvicorn logs a warning for every malformed request ("Invalid HTTP request received.") and
every `Upgrade` request (two lines), before the key is checked. The daemon runs `serve`,
and its output is appended to `<data dir>/daemon.log`: host user `nobody` sending them as
fast as it liked wrote ~200 bytes a request into the user's data dir, without bound (and
into the terminal of a foreground `serve`). Now the protocol's warnings about clients'
requests stop after `connections.PEER_WARNINGS`, with one line saying so. The other
shapes of a keyless client's request (a body that never ends, Content-Length with
Transfer-Encoding, huge heads, an upgrade) are answered and closed: checked here too.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from akhttp import API_KEY

from agentkernel.http import connections
from agentkernel.http.serve import RunningServer
from agentkernel.http.serve import start_in_thread as serve_thread
from sandbox_helpers import SYSTEM_PYTHON

NOBODY = 65534
SENT = 300

# As nobody: SENT upgrade requests on kept-alive connections, then SENT malformed ones,
# each on a connection of its own; prints how many answers came.
FLOODER = """
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
H = b"Host: 127.0.0.1\\r\\n"
UP = b"GET /health HTTP/1.1\\r\\n" + H + b"Connection: Upgrade\\r\\nUpgrade: websocket\\r\\n\\r\\n"
answers = 0
s = socket.create_connection(("127.0.0.1", port), timeout=30)
f = s.makefile("rb")
for _ in range(n):
    s.sendall(UP)
    line = f.readline()
    answers += line.startswith(b"HTTP/1.1 200")
    while f.readline() not in (b"\\r\\n", b""):
        pass
    f.read(41)  # {"success":true,"data":"ok","error":null}
s.close()
for _ in range(n):
    b = socket.create_connection(("127.0.0.1", port), timeout=30)
    b.sendall(b"GET /health HTTP/9.9 junk\\r\\n\\r\\n")
    answers += b.recv(100).startswith(b"HTTP/1.1 400")
    b.close()
print(answers, flush=True)
"""


class Counter(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def plain_server(service: object) -> Iterator[RunningServer]:
    srv = serve_thread(service, "127.0.0.1", 0, api_key=API_KEY)  # type: ignore[arg-type]
    yield srv
    srv.stop()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root (to become nobody) and setpriv")
def test_another_users_bad_requests_do_not_grow_the_log(plain_server: RunningServer,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connections.PEER_NOISE, "seen", 0)  # this server's own budget
    monkeypatch.setattr(connections.PEER_NOISE, "dropped", 0)
    monkeypatch.setattr(connections.PEER_NOISE, "since", time.monotonic())
    monkeypatch.setattr(connections, "PEER_WINDOW", 3600.0)  # one window, however slow
    counter = Counter()
    log = logging.getLogger("uvicorn.error")
    log.addHandler(counter)
    try:
        r = subprocess.run(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY),
                            "--clear-groups", SYSTEM_PYTHON, "-c", FLOODER,
                            str(plain_server.port), str(SENT)],
                           capture_output=True, text=True, timeout=300,
                           env={"PATH": "/usr/bin:/bin"})
    finally:
        log.removeHandler(counter)
    assert r.stdout.strip() == str(2 * SENT), (r.stdout, r.stderr)  # all were answered
    # 3 * SENT lines before; now the budget and the line that says the rest are dropped.
    assert len(counter.lines) <= connections.PEER_WARNINGS + 1, counter.lines[-5:]
    assert counter.lines[-1] == ("more warnings about clients' requests are not logged "
                                 "this minute")


def _exchange(port: int, data: bytes, more: bytes = b"") -> bytes:
    """Send `data`, then `more` after every read until the server closes; what came."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    got = b""
    try:
        s.sendall(data)
        while chunk := s.recv(65536):
            got += chunk
            if more:
                s.sendall(more)
    except OSError:
        pass  # reset after a 400: what came is what counts
    finally:
        s.close()
    return got


H = b"Host: 127.0.0.1\r\n"


@pytest.mark.parametrize("request_", [
    # a body that never ends, keyless: answered, then closed (the head deadline)
    b"POST /run HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n",
    b"POST /run HTTP/1.1\r\n" + H + b"Content-Length: 100000000000\r\n\r\n{",
    # smuggling: the body read as chunks, what follows is a request of its own, keyless
    b"POST /health HTTP/1.1\r\n" + H + b"Content-Length: 4\r\nTransfer-Encoding: chunked"
    b"\r\n\r\n0\r\n\r\nGET /sandboxes HTTP/1.1\r\n" + H + b"\r\n",
    b"GET /health HTTP/1.1\r\n" + H + b"X-A: " + b"a" * 2_000_000 + b"\r\n\r\n",
], ids=["chunked-forever", "huge-length", "cl-and-te", "huge-head"])
def test_keyless_request_shapes_are_answered_and_closed(plain_server: RunningServer,
                                                        request_: bytes) -> None:
    got = _exchange(plain_server.port, request_, b"1\r\n \r\n" if b"chunked" in request_
                    else b" ")
    assert got.startswith(b"HTTP/1.1 "), got[:200]
    assert b"sandboxes" not in got and b'"success":true,"data":[' not in got, got[:400]
