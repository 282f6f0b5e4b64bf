"""The SDK's error classes, rooted in agentkernel's own `AgentKernelError` (one hierarchy)."""

from __future__ import annotations

import json

from ..errors import AgentKernelError, NotFound, UsageError

__all__ = [
    "AgentKernelError",
    "AuthError",
    "NetworkError",
    "NotFoundError",
    "ServerError",
    "StreamError",
    "ValidationError",
    "error_from_status",
]


class AuthError(AgentKernelError):
    """401: the server wants an API key, or another one."""

    status = 401
    http_status = 401


class NotFoundError(NotFound):
    """404: unknown sandbox, file, command, snapshot or route."""

    status = 404


class ValidationError(UsageError):
    """400: the server refused the input."""

    status = 400


class ServerError(AgentKernelError):
    """Any other error status. `status` is 500 as in the official SDK; `http_status` is the
    code the server really sent (409, 413, 503, ...)."""

    status = 500

    def __init__(self, message: str, http_status: int = 500) -> None:
        super().__init__(message)
        self.http_status = http_status


class NetworkError(AgentKernelError):
    """The server could not be reached, or did not answer in time."""

    http_status = 503


class StreamError(AgentKernelError):
    """A streamed answer was not Server-Sent Events."""

    http_status = 502


def error_from_status(status: int, body: str) -> AgentKernelError:
    """The error for an HTTP error answer: its class from the status, its message from the
    envelope's `error` (the whole body when that is not a JSON object with one)."""
    message = body
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and parsed.get("error") is not None:
        message = str(parsed["error"])
    if status == 400:
        return ValidationError(message)
    if status == 401:
        return AuthError(message)
    if status == 404:
        return NotFoundError(message)
    return ServerError(message, status)
