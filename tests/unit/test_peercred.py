"""SO_PEERCRED is read in one place (peercred.py): every caller gets a real process's ids
or a refusal, never uid 0 for an id it could not read, never a crash on a short answer."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agentkernel.errors import SandboxError
from agentkernel.peercred import NO_ID, PeerCredError, parse, peer_cred

SRC = Path(__file__).resolve().parents[2] / "src" / "agentkernel"


def _ucred(pid: int, uid: int, gid: int) -> bytes:
    order = sys.byteorder
    return (pid.to_bytes(4, order, signed=True) + uid.to_bytes(4, order) +
            gid.to_bytes(4, order))


def test_a_process_ids_are_read_unsigned() -> None:
    cred = parse(_ucred(1234, 4294967294, 65534))
    assert (cred.pid, cred.uid, cred.gid) == (1234, 4294967294, 65534)
    assert parse(_ucred(0, 0, 0)).pid == 0  # outside our pid namespace: the caller decides


@pytest.mark.parametrize("raw", [
    b"", b"\0" * 4, b"\0" * 8, b"\0" * 11, b"\0" * 13, b"\0" * 16,  # short and long answers
    _ucred(-1, 1000, 1000), _ucred(1, NO_ID, 1000), _ucred(1, 1000, NO_ID),
    _ucred(-2147483648, 0, 0),
], ids=["empty", "4", "8", "11", "13", "16", "pid-1", "uid-1", "gid-1", "pid-min"])
def test_anything_else_is_an_error_not_an_id(raw: bytes) -> None:
    with pytest.raises(PeerCredError):
        parse(raw)
    assert issubclass(PeerCredError, OSError)  # "cannot check the peer" where OSError is


def test_a_real_socket_pair() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        cred = peer_cred(a)
        assert (cred.pid, cred.uid, cred.gid) == (os.getpid(), os.getuid(), os.getgid())


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")
def test_an_unmapped_peer_reads_as_the_overflow_id_not_as_root() -> None:
    """In a user namespace that maps nothing, the kernel reports our uid (0 as root) as the
    overflow id: the helper passes on what the kernel says, never a guess."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    code = ("import socket, sys; from agentkernel.peercred import peer_cred; "
            "s = socket.socket(fileno=int(sys.argv[1])); c = peer_cred(s); "
            "print(c.pid, c.uid, c.gid)")
    with a, b:
        out = subprocess.run(["unshare", "--user", sys.executable, "-c", code,
                              str(b.fileno())], pass_fds=(b.fileno(),), capture_output=True,
                             text=True, timeout=60, check=True)
    pid, uid, gid = (int(x) for x in out.stdout.split())
    overflow = int(Path("/proc/sys/kernel/overflowuid").read_text())
    assert (uid, gid) == (overflow, int(Path("/proc/sys/kernel/overflowgid").read_text()))
    assert pid == os.getpid()  # the same pid namespace


class _ShortAnswer(socket.socket):
    """A real connected socket whose SO_PEERCRED answer comes back cut short (what a kernel
    never gives today: the callers must still refuse, not crash or read uid 0)."""

    def getsockopt(self, *args: int) -> bytes:  # type: ignore[override]
        return bytes(8)


def _short_pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return _ShortAnswer(a.family, a.type, fileno=a.detach()), b


def test_every_caller_refuses_an_unreadable_peer() -> None:
    from agentkernel.backends.container_engine import _peer_creds
    from agentkernel.egress_forkserver import _not_our_server
    from agentkernel.ipc.client import not_yours
    from agentkernel.peer import refusal

    a, b = _short_pair()
    with a, b:
        assert "cannot read the peer's credentials" in (refusal(a) or "")
        assert "cannot check who serves" in (not_yours(a, "/x/daemon.sock") or "")
        assert _not_our_server(a) is not None
        with pytest.raises(SandboxError, match="cannot check the sandbox's agent"):
            _peer_creds(a)


def test_so_peercred_is_read_nowhere_else() -> None:
    """The four parsers this replaced (peer, container_engine, egress_forkserver, ipc/wire)
    and the gate's control socket: one helper now."""
    readers = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                     if any("SO_PEERCRED" in line and "getsockopt" in line
                            for line in p.read_text().splitlines()))
    assert readers == ["peercred.py"], readers
