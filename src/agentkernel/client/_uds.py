"""The daemon's API socket as httpx transports that check every connection they make: its
peer (SO_PEERCRED on that very socket) must be this user, else it is closed unused.

Checking the path once and letting httpx connect to it again later left a window: a
runtime dir from the environment (kept by `sudo -E`) may be another user's, who can swap
the socket between the check and any later connection (the pool reconnects whenever a
kept connection has gone), and then receives our requests and chooses the answers.
"""

from __future__ import annotations

import typing

import httpcore
import httpx

from ..ipc.client import not_yours

# httpx's own defaults (httpx.Limits()), for the pools built in place of its own (here
# and in `_keyed`).
POOL_LIMITS: dict[str, typing.Any] = {
    "max_connections": 100, "max_keepalive_connections": 20, "keepalive_expiry": 5.0}


def _checked(stream: typing.Any, path: str) -> None:
    why = not_yours(stream.get_extra_info("socket"), path)
    if why is not None:
        stream.close()
        raise httpcore.ConnectError(why)


class _CheckedSync(httpcore.SyncBackend):
    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None
                            ) -> httpcore.NetworkStream:
        stream = super().connect_unix_socket(path, timeout, socket_options)
        _checked(stream, path)
        return stream

    def connect_tcp(self, *args: typing.Any, **kwargs: typing.Any) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("this transport speaks to the daemon's socket only")


class _CheckedAsync(httpcore.AnyIOBackend):
    async def connect_unix_socket(
            self, path: str, timeout: float | None = None,
            socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await super().connect_unix_socket(path, timeout, socket_options)
        why = not_yours(stream.get_extra_info("socket"), path)
        if why is not None:
            await stream.aclose()
            raise httpcore.ConnectError(why)
        return stream

    async def connect_tcp(self, *args: typing.Any,
                          **kwargs: typing.Any) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("this transport speaks to the daemon's socket only")


class DaemonTransport(httpx.HTTPTransport):
    """httpx.HTTPTransport(uds=path), each new connection's peer checked."""

    def __init__(self, path: str) -> None:
        # (verify=False: the pool it makes, with that TLS context, is replaced at once; the
        # default one costs ~100 ms to load, for a socket that never speaks TLS.)
        super().__init__(uds=path, verify=False)
        self._pool = httpcore.ConnectionPool(uds=path, network_backend=_CheckedSync(),
                                             **POOL_LIMITS)


class AsyncDaemonTransport(httpx.AsyncHTTPTransport):
    """httpx.AsyncHTTPTransport(uds=path), each new connection's peer checked (asyncio)."""

    def __init__(self, path: str) -> None:
        super().__init__(uds=path, verify=False)  # (as above)
        self._pool = httpcore.AsyncConnectionPool(uds=path, network_backend=_CheckedAsync(),
                                                  **POOL_LIMITS)
