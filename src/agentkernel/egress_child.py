"""What runs in an egress gate's own process and in a forked wiring child: the gate's
entry point and its listeners. Kept apart from egress_gate (the starter's side) so that
the fork server (egress_forkserver) and the starter both use it without importing each
other; its module level imports no asyncio (the gate's first module)."""

from __future__ import annotations

import io
import json
import os
import socket
import sys

ERR_CAP = 1 << 20  # bytes: egress-gate.err (every gate of a sandbox appends) stops here


class _CappedErr(io.TextIOBase):
    """The gate's stderr (the sandbox's egress-gate.err, appended to by each of its gates):
    writes stop once the file holds ERR_CAP bytes, so a gate failing in a loop, or a
    sandbox provoking its gate's warnings, cannot fill the host's disk."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        data = text.encode("utf-8", "backslashreplace")
        try:
            room = ERR_CAP - os.fstat(self.fd).st_size
            if room > 0:
                os.write(self.fd, data[:room])
        except OSError:
            pass
        return len(text)


def _bound_stderr() -> None:
    sys.stderr = _CappedErr(2)


def listeners_here(address: str, tcp_port: int, dns_port: int
                   ) -> tuple[socket.socket, socket.socket]:
    """The gate's TCP and UDP listeners on `address`, in this process's network
    namespace (a child that joined the sandbox's or router's), made only after `address`
    is up there: a UDP socket bound earlier answers from another source address, which
    the rules' REDIRECT does not map back (the client never sees an answer)."""
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for sock in (tcp, udp):  # a namespace may bring its addresses up in any order
        sock.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND
    tcp.bind((address, tcp_port))
    tcp.listen(128)
    udp.bind((address, dns_port))
    return tcp, udp


def gate_main(fds_sock: int) -> None:
    """The gate process: started before the sandbox's namespaces exist; then its config
    on stdin and its two listeners (made in the sandbox's or router's namespace by
    egress_gate.listen_in or a wiring child of egress_forkserver) on `fds_sock`; then
    egress_proxy.main serves and says "1"."""
    # Imported before the config comes (a fresh interpreter's start overlaps the
    # sandbox's, which now waits until the gate serves); a forked gate has them already.
    from .egress_proxy import _preload, main

    _bound_stderr()
    _preload()
    cfg = json.loads(sys.stdin.buffer.read(4 << 20))
    sys.stdin.close()
    carrier = socket.socket(fileno=fds_sock)
    _msg, fds, _flags, _addr = socket.recv_fds(carrier, 16, 2)
    carrier.close()
    if len(fds) != 2:
        raise SystemExit("no listeners to serve")

    main(cfg, socket.socket(socket.AF_INET, socket.SOCK_STREAM, fileno=fds[0]),
         socket.socket(socket.AF_INET, socket.SOCK_DGRAM, fileno=fds[1]))


def activated_main(fds: dict[str, int]) -> None:
    """A registered sandbox's gate, forked by the fork server when the sandbox first
    connected, resolved or was updated (egress_forkserver.register): `fds` names where
    its fds are; it serves until it has been idle long enough, then exits."""
    from .egress_proxy import main_activated

    _bound_stderr()
    main_activated(fds)
