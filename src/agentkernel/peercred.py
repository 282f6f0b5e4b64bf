"""SO_PEERCRED read in one place and strictly: the pid, uid and gid of a unix socket's peer
(a leaf: nothing of ours, nothing heavy, since the CLI's hot path checks its daemon too).

`struct ucred` is `pid_t pid` (signed), `uid_t uid`, `gid_t gid` (unsigned), 32 bits each in
the host's byte order. Parsing it as three signed ints made (uid_t)-1 read as -1 in some
places and as 4294967295 in others; a short answer raised struct.error, which callers
that handle OSError did not expect. Here every answer is either a real process's ids or
a PeerCredError (an OSError: "cannot check the peer" is a refusal wherever it is caught).
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

try:  # the C module: the public socket module costs the CLI's hot path milliseconds
    from _socket import SO_PEERCRED, SOL_SOCKET
except ImportError:  # not CPython
    from socket import SO_PEERCRED, SOL_SOCKET

UCRED_SIZE = 12
NO_ID = 0xFFFFFFFF  # (uid_t)-1 / (gid_t)-1: "no id", never a process's own


class PeerCredError(OSError):
    """The peer's credentials could not be read, or are not those of a real process."""


class PeerCred:
    """A peer as the kernel reports it at connect(): pid 0 means its process is outside
    our pid namespace (the kernel cannot name it here); uid and gid are as our user
    namespace sees them (unmapped ids show as the overflow id, 65534)."""

    __slots__ = ("gid", "pid", "uid")

    def __init__(self, pid: int, uid: int, gid: int) -> None:
        self.pid = pid
        self.uid = uid
        self.gid = gid

    def __repr__(self) -> str:
        return f"PeerCred(pid={self.pid}, uid={self.uid}, gid={self.gid})"


def parse(raw: bytes) -> PeerCred:
    """A `struct ucred` as the kernel gives it; PeerCredError for anything else."""
    if len(raw) != UCRED_SIZE:
        raise PeerCredError(f"cannot read the peer's credentials ({len(raw)} of "
                            f"{UCRED_SIZE} bytes)")
    order = sys.byteorder
    pid = int.from_bytes(raw[0:4], order, signed=True)
    uid = int.from_bytes(raw[4:8], order)
    gid = int.from_bytes(raw[8:12], order)
    if pid < 0 or uid == NO_ID or gid == NO_ID:
        raise PeerCredError(f"the peer's credentials are not a process's (pid {pid}, "
                            f"uid {uid}, gid {gid})")
    return PeerCred(pid, uid, gid)


def peer_cred(sock: Any) -> PeerCred:
    """The credentials of the process at the other end of a connected unix socket (as it
    was at connect() or socketpair()); PeerCredError (an OSError) if they cannot be read."""
    return parse(sock.getsockopt(SOL_SOCKET, SO_PEERCRED, UCRED_SIZE))
