"""ASGI guards in front of every route: bearer-token auth and the request body size limit."""

from __future__ import annotations

import hmac
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
            elif hmac.compare_digest(token.strip(), self.key):
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
