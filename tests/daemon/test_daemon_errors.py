"""The daemon socket answers every failure with an error reply and refuses beyond its limit.

A real DaemonServer on a real unix socket, in front of a stand-in manager whose methods
fail the way a host does (ENOSPC, a FIFO, a bug); no sandbox needed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agentkernel.daemon import server as server_mod
from agentkernel.daemon.server import DaemonServer


@dataclass
class _Settings:
    max_connections: int = 3


class _Manager:
    """Just what DaemonServer touches, failing on purpose."""

    settings = _Settings()
    recovered: list[str] = []

    def stat_file(self, name: str, path: str) -> dict[str, Any]:
        raise OSError(errno.ENOSPC, "No space left on device", "/data/state.db")

    def logs(self, name: str) -> list[dict[str, object]]:
        shutil_error = OSError([(f"/p/{name}/fifo", "/copy/fifo", "`/p/fifo` is a named pipe")])
        raise shutil_error

    def snapshots(self) -> list[Any]:
        raise RuntimeError("a bug")

    def get(self, name: str) -> dict[str, str]:
        return {"name": name}


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setattr(server_mod, "REQUEST_TIMEOUT", 3.0)
    path = tmp_path / "daemon.sock"
    server = DaemonServer(_Manager(), path)  # type: ignore[arg-type]
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield path
    server.shutdown()
    t.join(5)


def _connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    return s


def _ask(path: Path, line: bytes) -> dict[str, Any]:
    with _connect(path) as s:
        # Refused (busy): the daemon may have answered and hung up before we asked.
        with contextlib.suppress(BrokenPipeError):
            s.sendall(line)
        reply = s.makefile("rb").readline()
    assert reply, "the daemon hung up without an answer"
    return dict(json.loads(reply))


def _call(sock: Path, op: str, **args: Any) -> dict[str, Any]:
    return _ask(sock, json.dumps({"op": op, "args": args}).encode() + b"\n")


def test_disk_full_is_an_error_reply(served: Path) -> None:
    reply = _call(served, "stat_file", name="box", path="/x")
    assert reply["ok"] is False
    err = reply["error"]
    assert err["type"] == "HostError"
    assert "No space left on device" in err["message"] and "ENOSPC" in err["message"]
    assert "/data/state.db" in err["message"]
    assert err["http_status"] == 507 and err["exit_code"] == 125


def test_a_fifo_the_copy_met_is_named_in_the_reply(served: Path) -> None:
    err = _call(served, "logs", name="box")["error"]
    assert err["type"] == "HostError" and "is a named pipe" in err["message"]


def test_a_bug_is_an_internal_error_reply(served: Path) -> None:
    err = _call(served, "snapshots")["error"]
    assert err["type"] == "InternalError" and "a bug" in err["message"]


@pytest.mark.parametrize("line", [b"not json\n", b"[1, 2]\n", b'{"op": "nope"}\n',
                                  b'{"op": "get", "args": {"bogus": 1}}\n'])
def test_garbage_is_answered(served: Path, line: bytes) -> None:
    reply = _ask(served, line)
    assert reply["ok"] is False and reply["error"]["exit_code"] == 2


def test_an_idle_connection_is_told_why_it_is_closed(served: Path) -> None:
    with _connect(served) as s:
        reply = s.makefile("rb").readline()  # sends nothing: REQUEST_TIMEOUT is 3 s here
    assert "no request within" in json.loads(reply)["error"]["message"]


def test_connections_beyond_the_limit_are_refused_not_queued(served: Path) -> None:
    held = [_connect(served) for _ in range(_Settings.max_connections)]
    try:
        time.sleep(0.2)  # let the accept loop count them
        reply = _call(served, "get", name="box")
        assert reply["ok"] is False
        assert reply["error"]["type"] == "Busy" and reply["error"]["http_status"] == 503
        assert "max_connections" in reply["error"]["message"]
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 10
    while True:  # slots come back once those connections are gone
        reply = _call(served, "get", name="box")
        if reply["ok"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert reply == {"ok": True, "data": {"name": "box"}}
