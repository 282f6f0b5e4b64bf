"""Who holds a TCP socket (sockdiag.py), and what the client and the server make of it: the
server end of our own connection, queued or accepted, is ours (client/listener.py); a
tuple with no socket is nothing (not the listener the kernel would hand it to); the
/proc tables say the same as sock_diag; the HTTP server counts a peer by its uid."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from agentkernel import sockdiag
from agentkernel.client.listener import foreign_server
from agentkernel.http.connections import peer_of


@pytest.fixture(params=["sock_diag", "proc"])
def source(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test with sock_diag, and with the /proc tables it falls back to."""
    if request.param == "proc":
        def no_diag(*_args: object, **_kwargs: object) -> None:
            raise sockdiag._NoDiag("as on a kernel without sock_diag")

        monkeypatch.setattr(sockdiag, "_exchange", no_diag)
    return str(request.param)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s


def _ends(sock: socket.socket) -> tuple[sockdiag.Endpoint, sockdiag.Endpoint]:
    return sockdiag.endpoint(sock.getsockname()), sockdiag.endpoint(sock.getpeername())


def test_both_ends_of_a_connection_are_found(source: str, listener: socket.socket) -> None:
    with socket.create_connection(listener.getsockname()) as client:
        ours, theirs = _ends(client)
        queued = sockdiag.find(theirs, ours)
        assert queued is not None and queued.inode == 0  # not accepted yet
        assert queued.state in (sockdiag.ESTABLISHED, sockdiag.SYN_RECV)
        accepted, _ = listener.accept()
        with accepted:
            server = sockdiag.find(theirs, ours)
            assert server is not None
            assert server.inode == os.fstat(accepted.fileno()).st_ino
            assert server.uid == os.geteuid()
            mine = sockdiag.find(ours, theirs)
            assert mine is not None and mine.inode == os.fstat(client.fileno()).st_ino
        # A tuple nothing holds is nothing (sock_diag answers it with the listener).
        assert sockdiag.find(theirs, (ours[0], 1)) is None
    port = listener.getsockname()[1]
    found = sockdiag.listening(port)
    assert [e.inode for e in found] == [os.fstat(listener.fileno()).st_ino]


def test_a_dual_stack_server_sees_ipv4_as_ipv4(source: str) -> None:
    try:
        server = socket.socket(socket.AF_INET6)
        server.bind(("::", 0))
    except OSError:
        pytest.skip("no IPv6 here")
    with server:
        server.listen(1)
        with socket.create_connection(("127.0.0.1", server.getsockname()[1])) as client:
            accepted, _ = server.accept()
            with accepted:
                ours, theirs = _ends(client)
                found = sockdiag.find(theirs, ours)
                assert found is not None
                assert found.inode == os.fstat(accepted.fileno()).st_ino
                assert peer_of(accepted) == os.geteuid()


def test_our_own_server_end_is_ours_queued_or_accepted(source: str,
                                                       listener: socket.socket) -> None:
    with socket.create_connection(listener.getsockname()) as client:
        assert foreign_server(client) is None  # queued at our listener
        accepted, _ = listener.accept()
        assert foreign_server(client) is None  # held by this process
        accepted.close()  # the server end is gone: nothing of ours answers any more
        why = foreign_server(client)
        assert why is not None and "no open socket" in why, why
    assert foreign_server(None) is not None


def test_the_server_counts_a_peer_by_its_uid(listener: socket.socket) -> None:
    with socket.create_connection(listener.getsockname()):
        accepted, _ = listener.accept()
        with accepted:
            assert peer_of(accepted) == os.geteuid()
    left, right = socket.socketpair()
    with left, right:
        assert peer_of(left) == os.geteuid()
    assert peer_of(None) == "unknown"
