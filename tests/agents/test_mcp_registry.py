"""An MCP client (an agent) may not point the host's image pulls at a local service: an
`image` whose registry is on a loopback, private or link-local address — by address, by
`localhost`, or by a name that resolves there — is refused through the real MCP server,
and the listener never sees a connection; unless the user's own config names that
registry. The CLI (the user) still pulls from a loopback registry, as before."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from conftest import ROOT, Daemon

EXE = str(ROOT / ".venv" / "bin" / "agentkernel")


class Listener:
    """A TCP service on 127.0.0.1 that counts connections and answers 404 to anything (or
    redirects it to `redirect` when given)."""

    def __init__(self, redirect: str | None = None) -> None:
        self.redirect = redirect
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn, contextlib.suppress(OSError):
                conn.settimeout(2)
                conn.recv(65536)
                if self.redirect:
                    conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: " + self.redirect.encode()
                                 + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                else:
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")


@pytest.fixture
def listener() -> Iterator[Listener]:
    srv = Listener()
    yield srv
    srv.sock.close()


def _loopback_name() -> str | None:
    """A name (not `localhost`) that resolves to a non-public address here, if any: the
    host's own name usually does (/etc/hosts: 127.0.1.1)."""
    import ipaddress

    name = socket.gethostname()
    try:
        addrs = {a[4][0] for a in socket.getaddrinfo(name, None)}
    except OSError:
        return None
    if addrs and all(not ipaddress.ip_address(a).is_global for a in addrs):
        return name.lower()
    return None


def _call(daemon: Daemon, project: Path, calls: list[tuple[str, dict[str, Any]]],
          extra_env: dict[str, str] | None = None) -> list[Any]:
    env = {**os.environ, **daemon.env, **(extra_env or {})}
    params = StdioServerParameters(command=EXE, args=["mcp-server"], env=env, cwd=str(project))

    async def main() -> list[Any]:
        async with Client(params) as client:
            return [await client.call_tool(tool, args) for tool, args in calls]

    result: list[Any] = anyio.run(main)
    return result


def _text(result: Any) -> str:
    return "\n".join(getattr(c, "text", "") for c in result.content)


def test_an_agents_image_on_a_local_registry_is_refused(daemon: Daemon, tmp_path: Path,
                                                        listener: Listener) -> None:
    # Refused by name (an address, localhost), and at the connection itself where only
    # resolving tells (127.1 and 2130706433 are 127.0.0.1 to the resolver; the host's name).
    hosts = ["127.0.0.1", "LOCALHOST", "0.0.0.0", "127.1", "2130706433"]
    name = _loopback_name()
    if name is not None:
        hosts.append(name)
    images = [f"{host}:{listener.port}/probe:1" for host in hosts]
    calls: list[tuple[str, dict[str, Any]]] = [
        ("sandbox_run", {"command": ["true"], "image": image}) for image in images]
    calls.append(("sandbox_create", {"name": "box-reg", "image": images[0]}))
    results = _call(daemon, tmp_path, calls, {"XDG_CONFIG_HOME": str(tmp_path / "cfg")})
    for (tool, args), result in zip(calls, results, strict=True):
        assert result.is_error, (tool, args, _text(result))
        assert "may not name a registry on a loopback" in _text(result), (args, _text(result))
    time.sleep(0.2)
    assert listener.connections == 0
    assert "box-reg" not in daemon.ak("list").stdout


def test_a_registry_the_user_names_is_allowed(daemon: Daemon, tmp_path: Path,
                                             listener: Listener) -> None:
    """The user's config names it (insecure_registries): the agent's pull goes there."""
    cfg = tmp_path / "cfg" / "agentkernel"
    cfg.mkdir(parents=True)
    (cfg / "config.toml").write_text(
        f'[images]\ninsecure_registries = ["127.0.0.1:{listener.port}"]\n')
    image = f"127.0.0.1:{listener.port}/probe:1"
    results = _call(daemon, tmp_path, [("sandbox_run", {"command": ["true"], "image": image})],
                    {"XDG_CONFIG_HOME": str(tmp_path / "cfg")})
    assert "may not name a registry" not in _text(results[0]), _text(results[0])
    assert listener.connections >= 1


def test_a_redirect_of_an_allowed_registry_to_a_local_one_is_refused(
        daemon: Daemon, tmp_path: Path, listener: Listener) -> None:
    """The user's registry is allowed; where it redirects the pull is checked again: a
    redirect to another local port reaches nothing there."""
    hop = Listener(redirect=f"http://127.0.0.1:{listener.port}/v2/probe/manifests/1")
    try:
        cfg = tmp_path / "cfg" / "agentkernel"
        cfg.mkdir(parents=True)
        (cfg / "config.toml").write_text(
            f'[images]\ninsecure_registries = ["127.0.0.1:{hop.port}"]\n')
        results = _call(daemon, tmp_path, [("sandbox_run", {
            "command": ["true"], "image": f"127.0.0.1:{hop.port}/probe:1"})],
            {"XDG_CONFIG_HOME": str(tmp_path / "cfg")})
        assert results[0].is_error, _text(results[0])
        assert "may not name a registry on a loopback" in _text(results[0])
        assert hop.connections >= 1
        time.sleep(0.2)
        assert listener.connections == 0
    finally:
        hop.sock.close()


def test_the_cli_still_pulls_from_a_loopback_registry(daemon: Daemon, tmp_path: Path,
                                                     listener: Listener) -> None:
    env = {**os.environ, **daemon.env, "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    r = subprocess.run([sys.executable, "-m", "agentkernel", "run", "-i",
                        f"127.0.0.1:{listener.port}/probe:1", "--", "true"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL, check=False)
    assert "may not name a registry" not in r.stderr, r.stderr
    assert listener.connections >= 1, r.stderr
