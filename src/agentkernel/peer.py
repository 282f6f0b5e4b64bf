"""Who may drive the daemon: a process of this user in the daemon's own user and pid
namespaces, never a sandboxed one, whatever uid SO_PEERCRED reports for it.

A uid alone proves nothing here: a sandbox's uid 0 maps to the host's uid 0 when root
starts it, and `connect()` ignores read-only mounts, so a socket that shows inside a
sandbox would otherwise serve it. Every sandbox runs in a user and pid namespace of its
own (bwrap, runsc's sentry, QEMU's `unshare`), so the namespaces tell them apart.

Races: the peer's pid could be recycled between `connect()` and our look at /proc. Where
the kernel offers SO_PEERPIDFD (Linux 6.5+) we hold the connecting process itself: /proc/PID
is opened first, then the pidfd must show that process still alive, so the directory was
its own. Older kernels leave a window of one pid reuse between accept and open.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket

from .peercred import PeerCredError, peer_cred

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Python < 3.14 lacks the constant
NAMESPACES = ("user", "pid")


def refusal(sock: socket.socket) -> str | None:
    """None if the process at the other end of `sock` may be served; else why not."""
    try:
        cred = peer_cred(sock)
    except PeerCredError as exc:
        return str(exc)
    pid, uid = cred.pid, cred.uid
    if uid != os.getuid():
        return f"not your daemon (peer uid {uid})"
    if pid <= 0:
        return "the peer's process is outside the daemon's pid namespace"
    pidfd = _peer_pidfd(sock)
    try:
        try:
            proc = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return "the peer's process is gone"
        try:
            if pidfd >= 0 and not _alive(pidfd):
                return "the peer's process is gone"
            return _foreign_namespace(proc)
        finally:
            os.close(proc)
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def _peer_pidfd(sock: socket.socket) -> int:
    try:
        return int(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))
    except OSError:  # kernel < 6.5
        return -1


def _alive(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except OSError:
        return False
    return True


def _foreign_namespace(proc: int) -> str | None:
    for ns in NAMESPACES:
        try:
            theirs = os.stat(f"ns/{ns}", dir_fd=proc)
            mine = os.stat(f"/proc/self/ns/{ns}")
        except OSError as exc:
            return f"cannot check the peer's {ns} namespace ({exc.strerror})"
        if (theirs.st_dev, theirs.st_ino) != (mine.st_dev, mine.st_ino):
            return f"the peer runs in another {ns} namespace (a sandbox?): refused"
    return None


class GuardedListener(socket.socket):
    """A listening unix socket whose `accept()` answers refused peers with an HTTP 403 and
    hands out only the others (for a server whose event loop calls `accept()`: asyncio's)."""

    def accept(self) -> tuple[socket.socket, object]:
        while True:
            conn, addr = super().accept()  # BlockingIOError ends the loop's accept burst
            try:
                why = refusal(conn)
            except OSError as exc:
                why = f"cannot check the peer ({exc.strerror})"
            if why is None:
                return conn, addr
            # Off the event loop: the request is read first, so the client sees the answer
            # (a reset before it has sent its request would hide it).
            import threading

            threading.Thread(target=_answer_403, args=(conn, why), name="ak-peer-refused",
                             daemon=True).start()


def guarded(sock: socket.socket) -> GuardedListener:
    """`sock` (listening) as a GuardedListener: the same descriptor, peers checked."""
    timeout = sock.gettimeout()
    guarded_sock = GuardedListener(sock.family, sock.type, sock.proto, fileno=sock.detach())
    guarded_sock.settimeout(timeout)
    return guarded_sock


def _answer_403(conn: socket.socket, why: str) -> None:
    body = json.dumps({"success": False, "data": None, "error": why}).encode()
    head = (f"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with contextlib.suppress(OSError):
        conn.settimeout(2.0)
        seen = b""
        while b"\r\n\r\n" not in seen and len(seen) < 65536:
            chunk = conn.recv(4096)
            if not chunk:
                break
            seen += chunk
        conn.sendall(head + body)
    conn.close()
