"""What a TCP client can hold of the HTTP server before it has said anything: bounded.

Loopback is every local user's, and the key is checked only once a request's head has
arrived. uvicorn keeps a connection that never completes a head for as long as the client
likes (its keep-alive timer restarts at every byte), so another user could open connections
until the server, the daemon's process, ran out of descriptors: then the daemon's own socket
and every sandbox start failed too. Here a connection gets `HEAD_SECONDS` for each request's
head (from its accept, and from the end of its previous answer), and at most
`MAX_CONNECTIONS` are open at once; beyond that a new one is closed at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

HEAD_SECONDS = 10.0
MAX_CONNECTIONS = 256


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline per request head and a connection cap."""

    _head_due: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if len(self.connections) > MAX_CONNECTIONS:
            self.transport.close()
            return
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_due is not None:
            self._head_due.cancel()
            self._head_due = None
        super().connection_lost(exc)

    def _arm(self) -> None:
        """The next head must come within HEAD_SECONDS of now."""
        if self._head_due is not None:
            self._head_due.cancel()
        self._head_due = self.loop.call_later(HEAD_SECONDS, self._head_late, self.cycle)

    def _head_late(self, cycle: Any) -> None:
        """No new request since armed, and none in flight: the client only holds the line.
        (A request that came meanwhile re-arms the deadline when its answer is complete.)"""
        self._head_due = None
        if self.transport.is_closing() or self.cycle is not cycle:
            return
        if cycle is None or cycle.response_complete:
            self.transport.close()
