"""paths.connect_unix: a socket deeper than sockaddr_un allows is still reached;
paths.connect_socket_file: the socket itself, never a symlink planted in its place."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from agentkernel.paths import SUN_PATH_MAX, connect_socket_file, connect_unix, listen_unix


def test_a_socket_past_the_address_limit_is_reached(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "agent.sock"
    assert len(str(path).encode()) > SUN_PATH_MAX
    # Bound from inside its directory (as an agent in its sandbox binds its short path).
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(f"/proc/self/fd/{_dir_fd(deep)}/agent.sock")
    server.listen(1)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connect_unix(client, path)
        peer, _ = server.accept()
        client.sendall(b"hi")
        assert peer.recv(2) == b"hi"
        peer.close()
    finally:
        client.close()
        server.close()


def test_a_short_path_connects_as_usual(tmp_path: Path) -> None:
    server = listen_unix(tmp_path / "s.sock", 1)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connect_unix(client, tmp_path / "s.sock")
        server.accept()[0].close()
    finally:
        client.close()
        server.close()


_FDS: list[int] = []


def _dir_fd(path: Path) -> int:
    import os

    fd = os.open(path, os.O_PATH | os.O_DIRECTORY)
    _FDS.append(fd)  # kept open for the test's life: the bound name goes through it
    return fd


def test_listen_past_the_address_limit(tmp_path: Path) -> None:
    deep = tmp_path / ("f" * 60) / ("g" * 60)
    deep.mkdir(parents=True)
    path = deep / "qemu.sock"
    server = listen_unix(path, 1)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        assert path.exists() and (path.stat().st_mode & 0o777) == 0o600
        connect_unix(client, path)
        server.accept()[0].close()
    finally:
        client.close()
        server.close()


def test_an_agent_socket_is_connected_only_as_itself(tmp_path: Path) -> None:
    """A sandbox that can write its control dir swaps agent.sock for a symlink to a host
    socket (the lure), or for a fifo: the daemon's connect refuses both, deep paths too."""
    lure_path = tmp_path / "lure.sock"
    lure = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lure.bind(str(lure_path))
    lure.listen(1)
    lure.setblocking(False)
    ctl = tmp_path / ("c" * 60) / ("t" * 60)
    ctl.mkdir(parents=True)
    planted = ctl / "agent.sock"
    planted.symlink_to(lure_path)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with pytest.raises(OSError):
            connect_socket_file(client, planted)
        with pytest.raises(BlockingIOError):
            lure.accept()  # nothing reached the lure
        planted.unlink()
        os.mkfifo(planted)
        with pytest.raises(ConnectionRefusedError):
            connect_socket_file(client, planted)
        planted.unlink()
        real = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        real.bind(f"/proc/self/fd/{_dir_fd(ctl)}/agent.sock")
        real.listen(1)
        connect_socket_file(client, planted)  # the real one, past the address limit
        peer, _ = real.accept()
        peer.close()
        real.close()
    finally:
        client.close()
        lure.close()
