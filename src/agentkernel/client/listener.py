"""Whose server answers on a loopback TCP port: the owners of its listening sockets.

Loopback is not a user boundary: any local user may listen on 127.0.0.1:18888 while our
`serve` is not running (or on an address of `localhost` that it does not hold), and our
client would hand that user the key `serve` stored for us. The kernel lists every TCP
socket of this network namespace with its owner's uid (`/proc/net/tcp`, `tcp6`), so before
the stored key goes anywhere, each listener that could take the connection is checked.
The uid alone does not say it is ours: an ordinary user's `permissive` sandbox shares the
host's network namespace and its sockets are that user's. So each listener's socket must
also be held by a process of the caller's own user namespace (a sandbox has one of its
own), found by its inode among those processes' descriptors.
"""

from __future__ import annotations

import ipaddress
import os
import socket

_LISTEN = "0A"
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _decode(hex_addr: str) -> Address:
    """/proc/net/tcp's address: 32-bit words in the host's byte order (little-endian here)."""
    raw = bytes.fromhex(hex_addr)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def listeners(port: int) -> list[tuple[Address, int, int]]:
    """(local address, owner uid, socket inode) of every socket listening on TCP `port`."""
    found: list[tuple[Address, int, int]] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read(16 << 20).splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) < 10 or cols[3] != _LISTEN:
                continue
            addr, _, hex_port = cols[1].partition(":")
            try:
                if int(hex_port, 16) == port:
                    found.append((_decode(addr), int(cols[7]), int(cols[9])))
            except ValueError:
                continue
    return found


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


def foreign_listener(host: str, port: int) -> str | None:
    """None when every socket that could take a connection to `host`:`port` is this
    user's (and there is one); else why the stored key must not be sent there."""
    targets = _targets(host, port)
    if not targets:
        return f"{host} does not resolve"
    if not all(t.is_loopback or (isinstance(t, ipaddress.IPv6Address) and t.ipv4_mapped
                                 is not None and t.ipv4_mapped.is_loopback) for t in targets):
        # This machine's listeners say nothing of another host (a local 0.0.0.0 one
        # "covered" any IPv4 address): the stored key is `serve`'s, for loopback only.
        return f"{host} is not this machine's loopback"
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


# A listening socket found held here, and by which pid: checked again on its next use
# (one process's descriptors, not every process's), since the pid may since have gone.
_HELD: dict[int, int] = {}


def held_here(inode: int) -> bool:
    """Whether a process of this user namespace (and this user) holds socket `inode`."""
    if inode <= 0:
        return False
    mine = _user_ns("self")
    if mine is None:
        return False
    pid = _HELD.get(inode)
    if pid is not None and _holds(pid, inode, mine):
        return True
    _HELD.pop(inode, None)
    uid = os.getuid()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return False
    for pid in pids:
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
        except OSError:
            continue
        if _holds(pid, inode, mine):
            if len(_HELD) >= 64:
                _HELD.clear()
            _HELD[inode] = pid
            return True
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
