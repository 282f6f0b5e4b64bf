"""ASGI guards in front of every route: Host and Origin checks, bearer-token auth, body size."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ..errors import AgentKernelError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY = 64 * 1024 * 1024
OPEN_PATHS = frozenset({"/health", "/openapi.json"})


class BodyTooLarge(AgentKernelError):
    """The request body is over the server's limit."""

    http_status = 413


def envelope_error(status: int, message: str) -> tuple[int, bytes]:
    return status, json.dumps({"success": False, "data": None, "error": message}).encode()


async def send_json(send: Send, status: int, body: bytes,
                    extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value)
    return None


def _same_key(given: bytes, key: bytes) -> bool:
    """Constant time, length included: both sides are hashed before they are compared."""
    return hmac.compare_digest(hashlib.sha256(given).digest(), hashlib.sha256(key).digest())


LOOPBACK_NAMES = frozenset({"localhost"})


def host_name(value: str) -> str | None:
    """The name part of a Host header or an Origin's authority, lower-cased; None if malformed.

    `[::1]:18888` -> `::1`, `LocalHost:80` -> `localhost`, `127.0.0.1` -> `127.0.0.1`.
    """
    value = value.strip().lower()
    if not value or any(c in value for c in "/\\@ \t"):
        return None
    if value.startswith("["):
        name, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port = rest[1:]
    else:
        name, _, port = value.partition(":")
    if port and not port.isdigit():
        return None
    return name or None


def is_loopback_name(name: str) -> bool:
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HostGuard:
    """Serve only requests addressed to an allowed host, and no foreign web page.

    The Host header must name a loopback address or `localhost`, or one of `allowed`: a web
    page that rebinds its own name to 127.0.0.1 still sends its own name, and gets 421. A
    request with an `Origin` (browsers send one on cross-origin and on unsafe requests) is
    refused with 403 unless that origin's host is allowed too; no CORS header is ever sent,
    so a browser lets no other page read an answer either.
    """

    def __init__(self, app: ASGIApp, allowed: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.allowed = frozenset(h.lower() for h in allowed)
        self.any = "*" in self.allowed

    def allows(self, name: str | None) -> bool:
        if name is None:
            return False
        return self.any or name in self.allowed or is_loopback_name(name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = _header(scope, b"host")
        if host is None:
            await send_json(send, *envelope_error(400, "missing Host header"))
            return
        if not self.allows(host_name(host.decode("latin-1"))):
            await send_json(send, *envelope_error(
                421, "this server does not answer for that Host: it serves loopback names "
                     "and those given with --allowed-host or [api] allowed_hosts"))
            return
        origin = _header(scope, b"origin")
        if origin is not None and not self._origin_ok(origin.decode("latin-1")):
            await send_json(send, *envelope_error(403, "cross-origin requests are refused"))
            return
        await self.app(scope, receive, send)

    def _origin_ok(self, origin: str) -> bool:
        scheme, sep, authority = origin.strip().partition("://")
        if not sep or scheme.lower() not in ("http", "https"):
            return False  # includes the opaque origin "null"
        return self.allows(host_name(authority))


class AuthMiddleware:
    """Require `Authorization: Bearer <key>` on every path but /health and /openapi.json."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = _header(scope, b"authorization")
        if header is None:
            why = "Missing Authorization header"
        else:
            scheme, _, token = header.strip().partition(b" ")
            if scheme.lower() != b"bearer" or not token.strip():
                why = "Invalid authorization format"
            elif _same_key(token.strip(), self.key):
                await self.app(scope, receive, send)
                return
            else:
                why = "Invalid API key"
        status, body = envelope_error(401, why)
        await send_json(send, status, body, [(b"www-authenticate", b"Bearer")])


class BodyLimitMiddleware:
    """Answer 413 for a body over `limit` bytes, announced or (when chunked) as it arrives."""

    def __init__(self, app: ASGIApp, limit: int = DEFAULT_MAX_BODY) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                announced = int(length)
            except ValueError:
                await send_json(send, *envelope_error(400, "invalid Content-Length header"))
                return
            if announced > self.limit:
                await send_json(send, *envelope_error(413, self._message()))
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self._message())
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"request body larger than {self.limit} bytes"
