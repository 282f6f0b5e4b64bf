"""Whose server answers a loopback TCP connection: the stored key goes down ours only.

Loopback is not a user boundary: any local user may listen on 127.0.0.1:18888 while our
`serve` is not running (or on an address of `localhost` that it does not hold), and our
client would hand that user the key `serve` stored for us. The kernel knows the owner uid
and inode of every TCP socket of this network namespace (sock_diag, or `/proc/net/tcp`), so
before the stored key goes down a connection, the server's end of that very connection is
looked up (`foreign_server`, for each new connection; the transports in `_keyed` send the
key on checked connections only). Checking who listened at request time was not enough:
httpx sends a request down a connection it keeps, and one opened to another user's
listener stayed that user's after the listener made room for our `serve` (outside review,
round 6).

The uid alone does not say it is ours: an ordinary user's `permissive` sandbox shares the
host's network namespace and its sockets are that user's. So the socket must also be held
by a process of the caller's own user namespace (a sandbox has one of its own), found by
its inode among those processes' descriptors.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from typing import Any

from ..sockdiag import ESTABLISHED, SYN_RECV, Address, TcpSocket, endpoint, find, listening


def listeners(port: int) -> list[tuple[Address, int, int]]:
    """(local address, owner uid, socket inode) of every socket listening on TCP `port`."""
    return [(e.local[0], e.uid, e.inode) for e in listening(port)]


def foreign_server(sock: Any) -> str | None:
    """None when the other end of the connected TCP socket `sock` is a socket of this user
    held by a process of this user namespace; else why the stored key must not go there."""
    if sock is None:
        return "the connection shows no socket to check"
    try:
        ours, theirs = endpoint(sock.getsockname()), endpoint(sock.getpeername())
        own_inode = os.fstat(sock.fileno()).st_ino
    except (OSError, ValueError) as exc:
        return f"cannot tell the connection's ends ({exc})"
    if not theirs[0].is_loopback:
        return f"{theirs[0]} is not this machine's loopback"
    try:
        server = find(theirs, ours)
        if _queued(server):
            # Not accepted yet: it waits in the queue of a listener on that address, whose
            # holder will accept it. If it is still queued after every such listener was
            # found ours, the listener it waits at lived all along, so it is one of them.
            why = _foreign_listener_at({theirs[0]}, theirs[1])
            if why is not None:
                return why
            server = find(theirs, ours)
            if _queued(server):
                return None
    except OSError as exc:
        return f"cannot look the connection up ({exc})"
    return _foreign_holder(server, own_inode, theirs)


def _queued(server: TcpSocket | None) -> bool:
    return server is not None and server.inode == 0 and server.state in (ESTABLISHED, SYN_RECV)


def _foreign_holder(server: TcpSocket | None, own_inode: int,
                    theirs: tuple[Address, int]) -> str | None:
    where = f"{theirs[0]} port {theirs[1]}"
    if server is None or server.inode == 0:
        return f"no open socket answers this connection at {where}"
    if server.inode == own_inode:
        return f"the connection to {where} is to itself"
    if server.uid != os.getuid():
        return f"the connection at {where} is held by uid {server.uid}, not by this user"
    if not held_here(server.inode):
        return (f"the connection at {where} is held by no process of this user namespace "
                "(a sandbox's?)")
    return None


def _targets(host: str, port: int) -> set[Address]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return set()
    return {ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in infos}


def _covers(listening: Address, target: Address) -> bool:
    if listening == target:
        return True
    if listening.is_unspecified:  # 0.0.0.0, or :: (which also takes IPv4 unless v6only)
        return listening.version == target.version or listening.version == 6
    if isinstance(listening, ipaddress.IPv6Address) and listening.ipv4_mapped is not None:
        return listening.ipv4_mapped == target
    return False


def _loopback(target: Address) -> bool:
    if isinstance(target, ipaddress.IPv6Address) and target.ipv4_mapped is not None:
        return target.ipv4_mapped.is_loopback
    return target.is_loopback


def foreign_listener(host: str, port: int) -> str | None:
    """None when every socket that could take a connection to `host`:`port` is this
    user's (and there is one); else why the stored key must not be sent there."""
    targets = _targets(host, port)
    if not targets:
        return f"{host} does not resolve"
    return _foreign_listener_at(targets, port)


def _foreign_listener_at(targets: set[Address], port: int) -> str | None:
    if not all(_loopback(t) for t in targets):
        # This machine's listeners say nothing of another host (a local 0.0.0.0 one
        # "covered" any IPv4 address): the stored key is `serve`'s, for loopback only.
        return f"{', '.join(map(str, sorted(targets, key=str)))} is not this machine's loopback"
    uid = os.getuid()
    ours = False
    for addr, owner, inode in listeners(port):
        if any(_covers(addr, t) for t in targets):
            if owner != uid:
                return f"port {port} on {addr} is held by uid {owner}, not by this user"
            if not held_here(inode):
                return (f"port {port} on {addr} is held by no process of this user "
                        "namespace (a sandbox's?)")
            ours = True
    return None if ours else f"nothing of this user listens on port {port}"


# Sockets found held here, and by which pid (the newest last). A socket is checked again
# on its next use (one process's descriptors, not every process's), since the pid may since
# have gone; and the pids that held sockets before are asked first about a new one (the
# server that held a listener, or an earlier connection, holds the next one it accepts).
_HELD: dict[int, int] = {}
_HELD_MAX = 64
_HINTS = 4
_HELD_LOCK = threading.Lock()


def held_here(inode: int) -> bool:
    """Whether a process of this user namespace (and this user) holds socket `inode`."""
    if inode <= 0:
        return False
    mine = _user_ns("self")
    if mine is None:
        return False
    uid = os.getuid()
    with _HELD_LOCK:
        known = _HELD.pop(inode, None)
        hints = list(dict.fromkeys(reversed(_HELD.values())))[:_HINTS]
    tried = set()
    for pid in ([known] if known is not None else []) + hints:
        tried.add(pid)
        if _owned_by(pid, uid) and _holds(pid, inode, mine):
            _remember(inode, pid)
            return True
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return False
    for pid in pids:
        if pid not in tried and _owned_by(pid, uid) and _holds(pid, inode, mine):
            _remember(inode, pid)
            return True
    return False


def _remember(inode: int, pid: int) -> None:
    with _HELD_LOCK:
        _HELD.pop(inode, None)
        while len(_HELD) >= _HELD_MAX:
            del _HELD[next(iter(_HELD))]
        _HELD[inode] = pid


def _owned_by(pid: int, uid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}").st_uid == uid
    except OSError:
        return False


def _user_ns(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/user")
    except OSError:
        return None


def _holds(pid: int, inode: int, user_ns: str) -> bool:
    """Whether `pid`, in `user_ns`, has socket `inode` open (checked after its namespace,
    so a process that exec'd into a sandbox meanwhile is not taken for ours)."""
    if _user_ns(str(pid)) != user_ns:
        return False
    want = f"socket:[{inode}]"
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == want:
                return _user_ns(str(pid)) == user_ns
        except OSError:
            continue
    return False
