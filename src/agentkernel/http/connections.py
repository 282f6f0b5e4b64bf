"""What a TCP client can hold of the HTTP server before it has said anything: bounded, and
bounded per peer, so that no other user can hold the places of the server's own.

Loopback is every local user's, and the key is checked only once a request's head has
arrived. uvicorn keeps a connection that never completes a head for as long as the client
likes (its keep-alive timer restarts at every byte), so another user could open connections
until the server, the daemon's process, ran out of descriptors: then the daemon's own socket
and every sandbox start failed too. Here a connection gets `HEAD_SECONDS` for each request's
head (from its accept, and from the end of its previous answer), and at most
`MAX_CONNECTIONS` are open at once; beyond that a new one is closed at once.

That cap alone was the others' to take: another user holding 256 idle connections, each
renewed within its head deadline (`/health` needs no key), had every new connection of the
user's closed (outside review, round 6). So each connection is counted against its peer:
the uid that owns the client's socket (found by the kernel's sock_diag for a local peer,
SO_PEERCRED on a unix socket), or its address for a remote one. A peer other than the
server's own user holds at most `PER_PEER` connections, and all of them together at most
`OTHERS`: the server's own user always keeps `MAX_CONNECTIONS - OTHERS` places.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from ..peercred import peer_cred
from ..sockdiag import endpoint, find

HEAD_SECONDS = 10.0
MAX_CONNECTIONS = 256
PER_PEER = 64
OTHERS = MAX_CONNECTIONS - 64

Peer = int | str  # a uid, or "address ..." for a peer of no socket of this machine's


def peer_of(sock: Any) -> Peer:
    """Who holds the client's end of the server's connected socket `sock`."""
    if sock is None:
        return "unknown"
    if sock.family == socket.AF_UNIX:
        try:
            return peer_cred(sock).uid
        except OSError:
            return "unknown"
    try:
        ours, theirs = endpoint(sock.getsockname()), endpoint(sock.getpeername())
    except (OSError, ValueError):
        return "unknown"
    try:
        client = find(theirs, ours)  # the client's socket: its end is theirs, its peer ours
    except OSError:
        client = None
    return client.uid if client is not None else f"address {theirs[0]}"


PEER_WARNINGS = 16
PEER_WINDOW = 60.0  # seconds


class PeerWarnings(logging.Filter):
    """At most PEER_WARNINGS of the protocol's warnings about a peer's request a minute,
    then one line saying the rest are dropped; the next minute says how many were. uvicorn
    logs every malformed or `Upgrade` request ("Invalid HTTP request received.",
    "Unsupported upgrade request."), before any key is checked, so another local user
    sending them fast wrote ~200 bytes a request, without bound, into the daemon's log
    (the daemon runs `serve`) or the terminal (round 8). A budget per window, not for the
    process's life: 17 bad requests must not buy silence for every later probe (its
    review)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0
        self.dropped = 0
        self.since = time.monotonic()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or \
                not record.pathname.endswith(("h11_impl.py", "httptools_impl.py")):
            return True  # the server's own warnings and errors are kept
        now = time.monotonic()
        if now - self.since >= PEER_WINDOW:
            if self.dropped:
                said = record.getMessage()
                record.msg = "%d more warnings about clients' requests were not logged; %s"
                record.args = (self.dropped, said)
            self.seen, self.dropped, self.since = 0, 0, now
        self.seen += 1
        if self.seen == PEER_WARNINGS + 1:
            record.msg, record.args = ("more warnings about clients' requests are not "
                                       "logged this minute"), ()
        if self.seen > PEER_WARNINGS + 1:
            self.dropped += 1
            return False
        return True


PEER_NOISE = PeerWarnings()


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline per request head and connection caps."""

    _head_due: asyncio.TimerHandle | None = None
    _peer: Peer | None = None  # set once the connection is kept

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if PEER_NOISE not in self.logger.filters:
            self.logger.addFilter(PEER_NOISE)

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        peer = peer_of(transport.get_extra_info("socket"))
        if self._over_cap(peer):
            self.transport.close()
            return
        self._peer = peer
        self._arm()

    def _over_cap(self, peer: Peer) -> bool:
        """Whether one more connection of `peer` would pass a cap (this one is in
        `connections` already, its peer not yet set)."""
        if len(self.connections) > MAX_CONNECTIONS:
            return True
        own = os.geteuid()
        if peer == own:
            return False
        same = others = 0
        for conn in self.connections:
            held = getattr(conn, "_peer", None)
            if held is not None and held != own:
                others += 1
                same += held == peer
        return same >= PER_PEER or others >= OTHERS

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
