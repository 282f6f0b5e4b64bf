"""httpx transports for the key `serve` stored: it goes only down a connection whose server
end was found ours when the connection was made (`listener.foreign_server`).

The key used to be added per request, after a look at who listened on the port; httpx
then sent the request down any connection it kept. Another user who listened while our
`serve` was down, answered a keyless request with keep-alive, and gave the port up (keeping
the connection) got the next request, key and all, once `serve` was back (outside review,
round 6). Here every connection the keyed pool makes is checked right after connect and
closed unused if it is not ours: the pool holds checked connections only. A request for
which no connection of ours can be made goes without the key, as before, down a connection
of a pool of its own (made on first need): the key never goes down a connection that was
not checked.
"""

from __future__ import annotations

import threading
import typing

import httpcore
import httpx

from ._uds import POOL_LIMITS
from .listener import foreign_server


class NotOurs(Exception):
    """The server end of a new connection is not ours (the connection is closed)."""


class _CheckedSync(httpcore.SyncBackend):
    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None
                    ) -> httpcore.NetworkStream:
        stream = super().connect_tcp(host, port, timeout, local_address, socket_options)
        why = foreign_server(stream.get_extra_info("socket"))
        if why is not None:
            stream.close()
            raise NotOurs(why)
        return stream


class _CheckedAsync(httpcore.AnyIOBackend):
    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None
                          ) -> httpcore.AsyncNetworkStream:
        stream = await super().connect_tcp(host, port, timeout, local_address, socket_options)
        # (A kernel lookup of one socket, tens of microseconds: not worth a thread.)
        why = foreign_server(stream.get_extra_info("socket"))
        if why is not None:
            await stream.aclose()
            raise NotOurs(why)
        return stream


# verify=False below: the pool each transport makes is replaced at once, and with it that
# TLS context; httpx's default one costs ~100 ms to load. httpcore makes its own verified
# context (certifi's) for an https connection of the replacing pool, should there be one.


def _plain() -> httpx.HTTPTransport:
    transport = httpx.HTTPTransport(verify=False)
    transport._pool = httpcore.ConnectionPool(**POOL_LIMITS)
    return transport


def _async_plain() -> httpx.AsyncHTTPTransport:
    transport = httpx.AsyncHTTPTransport(verify=False)
    transport._pool = httpcore.AsyncConnectionPool(**POOL_LIMITS)
    return transport


class StoredKeyTransport(httpx.HTTPTransport):
    """TCP with the stored key on checked connections; keyless on others (see above)."""

    def __init__(self, key: str) -> None:
        super().__init__(verify=False)
        self._pool = httpcore.ConnectionPool(network_backend=_CheckedSync(), **POOL_LIMITS)
        self._auth = f"Bearer {key}"
        self._keyless: httpx.HTTPTransport | None = None
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.headers["Authorization"] = self._auth
        try:
            return super().handle_request(request)
        except NotOurs:  # raised at connect, before a byte of the request went
            del request.headers["Authorization"]
        with self._lock:
            if self._keyless is None:
                self._keyless = _plain()
            keyless = self._keyless
        return keyless.handle_request(request)

    def close(self) -> None:
        super().close()
        if self._keyless is not None:
            self._keyless.close()


class AsyncStoredKeyTransport(httpx.AsyncHTTPTransport):
    """The asyncio twin of `StoredKeyTransport`."""

    def __init__(self, key: str) -> None:
        super().__init__(verify=False)
        self._pool = httpcore.AsyncConnectionPool(network_backend=_CheckedAsync(),
                                                  **POOL_LIMITS)
        self._auth = f"Bearer {key}"
        self._keyless: httpx.AsyncHTTPTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        request.headers["Authorization"] = self._auth
        try:
            return await super().handle_async_request(request)
        except NotOurs:
            del request.headers["Authorization"]
        if self._keyless is None:  # (no await between the test and the set)
            self._keyless = _async_plain()
        return await self._keyless.handle_async_request(request)

    async def aclose(self) -> None:
        await super().aclose()
        if self._keyless is not None:
            await self._keyless.aclose()
