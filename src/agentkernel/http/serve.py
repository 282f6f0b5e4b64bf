"""`agentkernel serve`: run the HTTP API with uvicorn, in the foreground or on a thread."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..errors import UsageError
from .limits import Limits

if TYPE_CHECKING:
    import uvicorn

    from ..config import ApiSection
    from .commands import CommandService as SandboxService

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 18888
API_KEY_ENV = "AGENTKERNEL_API_KEY"
WILDCARDS = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 - compared with, never bound


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses; any other name or address is public."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _say(line: str) -> None:
    print(f"agentkernel: {line}", file=sys.stderr, flush=True)


def _configured_key(api: ApiSection | None) -> str | None:
    if api is None:
        return None
    if api.api_key:
        return api.api_key
    if api.api_key_env:
        return os.environ.get(api.api_key_env) or None
    return None


def resolve_api_key(host: str, api_key: str | None = None, *, insecure_no_key: bool = False,
                    api: ApiSection | None = None) -> str | None:
    """The key the server requires: the argument, AGENTKERNEL_API_KEY, the config's [api]
    api_key / api_key_env, else the one stored in the data dir (made on the first serve and
    shown once). None only with `insecure_no_key`, which is refused off loopback."""
    key = api_key or os.environ.get(API_KEY_ENV) or _configured_key(api)
    if key:
        return key
    if insecure_no_key:
        if not is_loopback(host):
            raise UsageError(f"refusing --insecure-no-key on {host}, which is not a loopback "
                             "address")
        _say("WARNING: --insecure-no-key: every local user and every program on this host "
             "can drive this API, as this user (run commands, read your sandboxes' files)")
        return None
    from .keys import ensure_key, key_path

    key, made = ensure_key()
    if made:
        _say(f"generated an API key for the HTTP API (shown only now): {key}")
        _say(f"it is stored in {key_path()} (mode 0600); our Python client reads it from "
             f"there, the SDKs take it from {API_KEY_ENV}")
    return key


@dataclass(frozen=True)
class ServeOptions:
    """How `serve` listens: address, key (None: resolved as `resolve_api_key` says), names
    it answers for besides loopback, and the output/file limits."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = None
    insecure_no_key: bool = False
    allowed_hosts: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    resolved: bool = False  # with_config ran: the key is settled (None means no key)

    def with_config(self, api: ApiSection | None) -> ServeOptions:
        """These options with the config's [api] section merged in and the key resolved
        (once: resolved options are returned as they are)."""
        if self.resolved:
            return self
        key = resolve_api_key(self.host, self.api_key, insecure_no_key=self.insecure_no_key,
                              api=api)
        hosts = (*self.allowed_hosts, *(api.allowed_hosts if api else ()))
        limits = Limits.from_config(api) if api is not None else self.limits
        return replace(self, api_key=key, allowed_hosts=hosts, limits=limits,
                       insecure_no_key=key is None, resolved=True)

    def allowed(self) -> frozenset[str]:
        """Host names served: the configured ones and the bound address (not a wildcard)."""
        names = {h.strip().lower().strip("[]") for h in self.allowed_hosts if h.strip()}
        if self.host.lower() not in WILDCARDS:
            names.add(self.host.lower().strip("[]"))
        return frozenset(names)


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


def _server(service: SandboxService, options: ServeOptions | None) -> uvicorn.Server:
    """A uvicorn server; `options` None: the private unix socket (no key, no Host check)."""
    import uvicorn

    from .app import create_app
    from .connections import BoundedH11Protocol

    if options is None:
        app = create_app(service)
    else:
        app = create_app(service, api_key=options.api_key, allowed_hosts=options.allowed(),
                         limits=options.limits)
    config = uvicorn.Config(
        app, log_level="warning", access_log=False,
        server_header=False, lifespan="on", timeout_graceful_shutdown=5,
        http=BoundedH11Protocol,  # a client that sends no request holds nothing for long
        # No WebSocket route: an upgraded connection would leave BoundedH11Protocol's
        # counts and deadline, were a WebSocket library installed beside us.
        ws="none",
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
                    api_key: str | None = None, *,
                    options: ServeOptions | None = None) -> RunningServer:
    """Serve the API for `service` on a thread of this process; returns once it listens.

    `options` (already merged with a config, see `ServeOptions.with_config`) win over
    `host`, `port` and `api_key`.
    """
    if options is None:
        options = ServeOptions(host, port, api_key).with_config(None)
    sock = bind(options.host, options.port)
    server = _server(service, options)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="ak-http", daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        threading.Event().wait(0.01)
    if not server.started:
        sock.close()
        raise UsageError(f"the HTTP API failed to start on {options.host}:{options.port}")
    return RunningServer(options.host, sock.getsockname()[1], server, thread)


def describe(url: str, options: ServeOptions) -> str:
    """The line `serve` prints: where it listens and how a client gets in."""
    from .keys import key_path

    if options.api_key is None:
        auth = "NO API KEY (--insecure-no-key)"
    elif options.api_key == _stored_key():
        auth = f"bearer key required, stored in {key_path()}"
    else:
        auth = "bearer key required"
    return f"HTTP API on {url} ({auth})"


def _stored_key() -> str | None:
    from .keys import read_key_quietly

    return read_key_quietly()


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
         api_key: str | None = None, *, options: ServeOptions | None = None) -> int:
    """Serve in the foreground until SIGINT/SIGTERM (the CLI's `serve` runs the daemon,
    which calls `start_in_thread`; this is the same without the daemon).

    The key is resolved and the port bound before `service_factory` runs, so a refused
    start creates nothing. A service with a `close()` method is closed on the way out.
    """
    if options is None:
        options = ServeOptions(host, port, api_key).with_config(None)
    sock = bind(options.host, options.port)
    if service_factory is None:
        import importlib

        service_factory = importlib.import_module("agentkernel.daemon.manager").SandboxManager
    service = service_factory()
    try:
        server = _server(service, options)
        shown = f"[{options.host}]" if ":" in options.host else options.host
        _say(describe(f"http://{shown}:{sock.getsockname()[1]}", options))
        server.run(sockets=[sock])
    finally:
        sock.close()
        close = getattr(service, "close", None)
        if callable(close):
            with contextlib.suppress(Exception):
                close()
    return 0
