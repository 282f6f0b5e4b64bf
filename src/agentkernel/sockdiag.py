"""Who holds a TCP socket of this network namespace: its owner uid and inode, found by the
kernel's sock_diag netlink interface (`/proc/net/tcp` and `tcp6` where it is missing).

A leaf (the standard library only): the client checks who answers a connection before it
sends the stored key on it, the HTTP server counts its connections per peer uid. Reading
`/proc/net/tcp` walks the whole table and costs milliseconds (12 ms for 350 sockets on a
loaded machine) and grows with what any user opens; a sock_diag lookup of one connection is
a single request (tens of microseconds), and a dump of the listeners walks the listening
table only.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Endpoint = tuple[Address, int]

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
NO_COOKIE = 0xFFFFFFFF
_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
_REQ = struct.Struct("=BBBBI")  # inet_diag_req_v2 up to its sockid
_MSG = struct.Struct("=BBBB")  # inet_diag_msg up to its sockid
_SOCKID = 48  # struct inet_diag_sockid
_UID_AT = _HEADER.size + _MSG.size + _SOCKID + 12  # after expires, rqueue, wqueue
# Bounds of what is read: a dump of listeners (any user can open thousands) and the tables.
MAX_READ = 16 << 20

ESTABLISHED = 1
SYN_RECV = 3
LISTEN = 10


@dataclass(frozen=True)
class TcpSocket:
    state: int
    local: Endpoint
    remote: Endpoint
    uid: int
    inode: int  # 0: held by no descriptor (not yet accepted, or closed by its holder)


def plain(address: Address) -> Address:
    """An IPv4-mapped IPv6 address as the IPv4 one (a dual-stack socket's view of IPv4)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def endpoint(sockaddr: tuple[object, ...]) -> Endpoint:
    """(address, port) of a socket address as `getsockname` gives it (v4 or v6)."""
    host = str(sockaddr[0]).partition("%")[0]
    port = sockaddr[1]
    if not isinstance(port, int):
        raise ValueError(f"not an IP socket address: {sockaddr!r}")
    return plain(ipaddress.ip_address(host)), port


def find(local: Endpoint, remote: Endpoint) -> TcpSocket | None:
    """The socket of this namespace whose own end is `local` and whose peer is `remote`, or
    None (gone, or never there). Raises OSError only if neither source can be read."""
    try:
        return _diag_find(local, remote)
    except _NoDiag:
        pass
    for entry in _proc_table():
        if entry.state != LISTEN and entry.local == local and entry.remote == remote:
            return entry
    return None


def listening(port: int) -> list[TcpSocket]:
    """Every socket of this namespace listening on TCP `port` (v4 and v6)."""
    try:
        found = _diag_listeners(socket.AF_INET) + _diag_listeners(socket.AF_INET6)
    except _NoDiag:
        found = [e for e in _proc_table() if e.state == LISTEN]
    return [e for e in found if e.local[1] == port]


class _NoDiag(Exception):
    """sock_diag cannot answer here (a kernel without it, or a sandbox's): use /proc."""


def _family(address: Address) -> int:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


def _request(family: int, flags: int, states: int, local: Endpoint | None,
             remote: Endpoint | None) -> bytes:
    sockid = bytearray(_SOCKID)
    if local is not None and remote is not None:
        struct.pack_into(">HH", sockid, 0, local[1], remote[1])
        sockid[4:4 + len(local[0].packed)] = local[0].packed
        sockid[20:20 + len(remote[0].packed)] = remote[0].packed
    struct.pack_into("=III", sockid, 36, 0, NO_COOKIE, NO_COOKIE)
    body = _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, states) + bytes(sockid)
    return _HEADER.pack(_HEADER.size + len(body), SOCK_DIAG_BY_FAMILY, flags, 1, 0) + body


def _exchange(request: bytes, dump: bool) -> list[TcpSocket]:
    """Send one sock_diag request, read its answer (every part of a dump, up to MAX_READ)."""
    try:
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
    except (OSError, AttributeError) as exc:
        raise _NoDiag(str(exc)) from None
    found: list[TcpSocket] = []
    read = 0
    with nl:
        try:
            nl.settimeout(5.0)
            nl.sendto(request, (0, 0))
            while read < MAX_READ:
                data = nl.recv(65536)
                read += len(data)
                entries = _entries(data)
                found.extend(e for e in entries if e is not None)
                if not dump or not data or None in entries:
                    return found
        except OSError as exc:
            raise _NoDiag(str(exc)) from None
    raise OSError(f"more than {MAX_READ} bytes of listeners")


def _diag_find(local: Endpoint, remote: Endpoint) -> TcpSocket | None:
    if local[0].version != remote[0].version:
        return None
    request = _request(_family(local[0]), NLM_F_REQUEST, 0xFFFFFFFF, local, remote)
    for entry in _exchange(request, dump=False):
        # The kernel answers a tuple it does not have with the listener that would take
        # it (its own lookup falls back to the listening table): only the tuple counts.
        if entry.local == local and entry.remote == remote:
            return entry
    return None


def _diag_listeners(family: int) -> list[TcpSocket]:
    request = _request(family, NLM_F_REQUEST | NLM_F_DUMP, 1 << LISTEN, None, None)
    return [e for e in _exchange(request, dump=True) if e.state == LISTEN]


def _entries(data: bytes) -> list[TcpSocket | None]:
    """The sockets in one netlink read; None for its end (NLMSG_DONE, or an error answer:
    "no such socket" is one, any other raises _NoDiag)."""
    out: list[TcpSocket | None] = []
    at = 0
    while at + _HEADER.size <= len(data):
        length, kind = _HEADER.unpack_from(data, at)[:2]
        if length < _HEADER.size or at + length > len(data):
            break
        if kind == NLMSG_DONE:
            out.append(None)
        elif kind == NLMSG_ERROR:
            errno = -struct.unpack_from("=i", data, at + _HEADER.size)[0]
            if errno not in (0, 2):  # 2: ENOENT, nothing at that tuple
                raise _NoDiag(f"sock_diag answered errno {errno}")
            out.append(None)
        elif kind == SOCK_DIAG_BY_FAMILY and length >= _UID_AT + 8:
            out.append(_entry(data, at))
        at += (length + 3) & ~3
    return out


def _entry(data: bytes, at: int) -> TcpSocket:
    family, state = _MSG.unpack_from(data, at + _HEADER.size)[:2]
    base = at + _HEADER.size + _MSG.size
    sport, dport = struct.unpack_from(">HH", data, base)
    size = 4 if family == socket.AF_INET else 16
    src = plain(ipaddress.ip_address(data[base + 4:base + 4 + size]))
    dst = plain(ipaddress.ip_address(data[base + 20:base + 20 + size]))
    uid, inode = struct.unpack_from("=II", data, at + _UID_AT)
    return TcpSocket(state, (src, sport), (dst, dport), uid, inode)


def _decode(hex_addr: str) -> Address:
    """/proc/net/tcp's address: 32-bit words in the host's byte order (little-endian here)."""
    raw = bytes.fromhex(hex_addr)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return plain(ipaddress.ip_address(words))


def _proc_endpoint(column: str) -> Endpoint:
    addr, _, port = column.partition(":")
    return _decode(addr), int(port, 16)


def _proc_table() -> list[TcpSocket]:
    """Every TCP socket in /proc/net/tcp and tcp6 (the first MAX_READ bytes of each)."""
    found: list[TcpSocket] = []
    read = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read(MAX_READ).splitlines()[1:]
        except OSError:
            continue
        read = True
        for line in lines:
            cols = line.split()
            if len(cols) < 10:
                continue
            try:
                found.append(TcpSocket(int(cols[3], 16), _proc_endpoint(cols[1]),
                                       _proc_endpoint(cols[2]), int(cols[7]), int(cols[9])))
            except ValueError:
                continue
    if not read:
        raise OSError("neither sock_diag nor /proc/net/tcp can be read here")
    return found
