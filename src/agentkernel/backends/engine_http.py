"""A small HTTP/1.1 client for container engines' APIs over their unix sockets (Docker Engine
API; Podman's Docker-compatible service speaks the same). Bounded replies, no dependencies.

Why not a client library: `docker` on PyPI pulls in `requests` (~100 ms of imports on every
cold run, more than the engine's own `create`); the API calls we need are a dozen.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import AgentKernelError, BackendUnavailable

API_VERSION = "v1.41"  # Docker 20.10; Podman 4's compatible service answers it too
MAX_REPLY = 16 * 1024 * 1024  # every reply we read (inspect, lists, errors) is far smaller
MAX_HEADER = 64 * 1024


class EngineError(AgentKernelError):
    """The engine answered an API call with an error status."""

    exit_code = 125
    http_status = 502

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class EngineAPI:
    """One engine's API socket; every call opens its own connection (calls may run on
    several threads at once, and a connection costs ~0.1 ms)."""

    def __init__(self, path: str, *, what: str) -> None:
        self.path = path
        self.what = what  # "docker", "podman": for messages

    def _connect(self, timeout: float | None) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise BackendUnavailable(
                f"cannot reach the {self.what} engine at {self.path}: {exc.strerror or exc}"
            ) from None
        return sock

    def call(
        self, method: str, path: str, *, query: Mapping[str, str] | None = None,
        body: Any = None, expect: tuple[int, ...] = (200, 201, 204), timeout: float | None = 60.0,
        upload: str | None = None, raw: bool = False, sent: Callable[[], None] | None = None,
    ) -> Any:
        """Send one request; return the decoded JSON reply (None when empty).

        `upload` names a file sent as the raw body (an image tarball); `body` is JSON.
        `sent` is called once the request is out, before the reply is awaited (work that
        overlaps the engine's, started only then: a thread started before would hold the
        GIL while this one builds and sends the request).
        """
        import os
        from urllib.parse import urlencode

        target = f"/{API_VERSION}{path}" + (f"?{urlencode(query)}" if query else "")
        headers = [f"{method} {target} HTTP/1.1", "Host: engine", "Connection: close"]
        payload = b""
        if upload is not None:
            headers += ["Content-Type: application/x-tar",
                        f"Content-Length: {os.stat(upload).st_size}"]
        elif body is not None:
            payload = json.dumps(body).encode()
            headers += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
        else:
            headers.append("Content-Length: 0")
        sock = self._connect(timeout)
        try:
            sock.sendall(("\r\n".join(headers) + "\r\n\r\n").encode() + payload)
            if upload is not None:
                with open(upload, "rb") as f:
                    sock.sendfile(f)
            if sent is not None:
                sent()
            status, data = _read_reply(sock)
        except TimeoutError:
            raise EngineError(f"{self.what} API {method} {path}: no answer in {timeout}s") \
                from None
        except OSError as exc:
            raise EngineError(f"{self.what} API {method} {path}: {exc.strerror or exc}") \
                from None
        finally:
            sock.close()
        if status not in expect:
            raise EngineError(f"{self.what}: {_message(data) or f'HTTP {status}'}", status)
        if raw:
            return data
        if not data.strip():
            return None
        try:
            return json.loads(data)
        except ValueError:
            # Some endpoints (image import, pulls) answer with a stream of JSON lines.
            return [json.loads(line) for line in data.splitlines() if line.strip()]


def _message(data: bytes) -> str:
    try:
        doc = json.loads(data)
    except ValueError:
        return data.decode(errors="replace").strip()[:500]
    if isinstance(doc, dict):
        return str(doc.get("message") or doc.get("cause") or "")[:1000]
    return ""


def _read_reply(sock: socket.socket) -> tuple[int, bytes]:
    """Read a whole reply (the connection is closed by the server after it), bounded."""
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise EngineError("the engine closed the connection before replying")
        buf += chunk
        if len(buf) > MAX_HEADER + MAX_REPLY:
            raise EngineError("the engine's reply is too large")
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        raise EngineError(f"malformed reply from the engine: {lines[0][:100]!r}") from None
    fields = {k.strip().lower(): v.strip()
              for k, _, v in (line.partition(":") for line in lines[1:])}
    body = bytearray(rest)
    length = fields.get("content-length")
    while length is None or len(body) < int(length):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
        if len(body) > MAX_REPLY:
            raise EngineError("the engine's reply is too large")
    data = bytes(body)
    if "chunked" in fields.get("transfer-encoding", "").lower():
        data = _dechunk(data)
    return status, data


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n", pos)
        if end < 0:
            break
        try:
            size = int(data[pos:end].split(b";")[0], 16)
        except ValueError:
            raise EngineError("malformed chunked reply from the engine") from None
        if size == 0:
            break
        out += data[end + 2:end + 2 + size]
        pos = end + 2 + size + 2
    return bytes(out)
