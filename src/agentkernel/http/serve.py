"""`agentkernel serve`: run the HTTP API with uvicorn, in the foreground or on a thread."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:
    import uvicorn

    from ..daemon.api import SandboxService

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 18888
API_KEY_ENV = "AGENTKERNEL_API_KEY"


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses; any other name or address is public."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_api_key(host: str, api_key: str | None = None) -> str | None:
    """The key from the argument or AGENTKERNEL_API_KEY; required off loopback."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    key = key or None
    if key is None and not is_loopback(host):
        raise UsageError(
            f"refusing to serve on {host}, which is not a loopback address, without an API "
            f"key: set {API_KEY_ENV} (clients send it as 'Authorization: Bearer <key>')"
        )
    return key


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: any free port); a UsageError says why it failed."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"cannot resolve {host!r}: {exc.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    # proto must be IPPROTO_TCP (not 0): asyncio only sets TCP_NODELAY on such sockets, and
    # without it every keep-alive answer waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(False)
    return sock


def _server(service: SandboxService, api_key: str | None) -> uvicorn.Server:
    import uvicorn

    from .app import create_app

    config = uvicorn.Config(
        create_app(service, api_key=api_key), log_level="warning", access_log=False,
        server_header=False, lifespan="on", timeout_graceful_shutdown=5,
    )
    return uvicorn.Server(config)


@dataclass
class RunningServer:
    """An API server on a background thread (the daemon, tests); `stop()` ends it."""

    host: str
    port: int
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_in_thread(service: SandboxService, host: str = DEFAULT_HOST, port: int = 0,
                    api_key: str | None = None) -> RunningServer:
    """Serve the API for `service` on a thread of this process; returns once it listens."""
    key = resolve_api_key(host, api_key)
    sock = bind(host, port)
    server = _server(service, key)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="ak-http", daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        threading.Event().wait(0.01)
    if not server.started:
        sock.close()
        raise UsageError(f"the HTTP API failed to start on {host}:{port}")
    return RunningServer(host, sock.getsockname()[1], server, thread)


def start_uds_in_thread(service: SandboxService, path: str) -> RunningServer:
    """Serve the API on a unix socket at `path` (the daemon's, for our client by default).

    No key: the socket is mode 0600 in the user's private runtime dir, so only its owner
    can connect.
    """
    from ..paths import listen_unix
    from ..peer import guarded

    sock = guarded(listen_unix(path, 1024))  # private from the start; sandboxes refused
    server = _server(service, None)
    server.config.loop = "asyncio"  # the peer check is in asyncio's accept (not uvloop's)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="ak-http-uds", daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        threading.Event().wait(0.01)
    if not server.started:
        sock.close()
        raise UsageError(f"the HTTP API failed to start on {path}")
    return RunningServer(path, 0, server, thread)


def main(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
         service_factory: Callable[[], SandboxService] | None = None,
         api_key: str | None = None) -> int:
    """Serve in the foreground until SIGINT/SIGTERM; the CLI's `serve` calls this.

    The key is checked and the port bound before `service_factory` runs, so a refused
    start creates nothing. A service with a `close()` method is closed on the way out.
    """
    key = resolve_api_key(host, api_key)
    sock = bind(host, port)
    if service_factory is None:
        import importlib

        service_factory = importlib.import_module("agentkernel.daemon.manager").SandboxManager
    service = service_factory()
    try:
        server = _server(service, key)
        shown = f"[{host}]" if ":" in host else host
        auth = "bearer key required" if key else "no API key (loopback only)"
        print(f"agentkernel: HTTP API on http://{shown}:{sock.getsockname()[1]} ({auth})",
              file=sys.stderr, flush=True)
        server.run(sockets=[sock])
    finally:
        sock.close()
        close = getattr(service, "close", None)
        if callable(close):
            with contextlib.suppress(Exception):
                close()
    return 0
