"""What each SDK method sends and how it reads the answer, shared by the sync and async clients.

Nothing here does I/O or imports httpx: a method builds a `Call`, the client sends it and
hands the envelope's `data` to `Call.parse`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast
from urllib.parse import quote

from .. import __version__
from .errors import AgentKernelError, ServerError, error_from_status
from .models import (
    BackendDiscovery,
    BatchFileWriteResponse,
    BatchRunResponse,
    DetachedCommand,
    DetachedLogsResponse,
    FileReadResponse,
    RunOutput,
    SandboxInfo,
    SnapshotMeta,
    StreamEvent,
)

T = TypeVar("T")

DEFAULT_BASE_URL = "http://localhost:18888"
DEFAULT_TIMEOUT = 30.0
USER_AGENT = f"agentkernel-python/{__version__}"
STREAM_EVENTS = frozenset({"started", "progress", "output", "done", "error"})


@dataclass(frozen=True)
class Settings:
    base_url: str
    api_key: str | None = field(repr=False)
    timeout: float
    # The key is the one `serve` stored, not one given: it goes only down a connection to
    # a server of ours (`_keyed`, which adds it).
    stored_key: bool = False

    def headers(self, *, stored: bool = True) -> dict[str, str]:
        """The default headers; the stored key among them only with `stored` (a transport
        of the caller's: no TCP connection to check); else the `_keyed` transport adds it
        to requests that go down a connection of ours."""
        headers = {"User-Agent": USER_AGENT}
        if self.api_key and (stored or not self.stored_key):
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def keyed(self) -> str | None:
        """The stored key, for a transport that checks each connection; None if not one."""
        return self.api_key if self.stored_key else None


def daemon_api_socket(base_url: str | None) -> str | None:
    """The daemon's API socket when no base URL is given anywhere, else None (use TCP)."""
    if base_url or os.environ.get("AGENTKERNEL_BASE_URL"):
        return None
    from ..ipc.client import api_socket

    return api_socket()


def settings(base_url: str | None, api_key: str | None, timeout: float | None) -> Settings:
    """Argument, else environment (AGENTKERNEL_BASE_URL, AGENTKERNEL_API_KEY), else default.

    With no key given and a loopback base URL, the key `serve` stored in this user's data
    dir (api.key) is used, if there is one: a local server needs no configuration. It is
    sent only down a connection to a server of this user's (`_keyed`).
    """
    given = base_url or os.environ.get("AGENTKERNEL_BASE_URL")
    url = given or DEFAULT_BASE_URL
    key = api_key or os.environ.get("AGENTKERNEL_API_KEY") or None
    stored = False
    # (No base URL at all means the daemon's 0600 unix socket, which needs no key.)
    if key is None and given and _loopback_url(url):
        from ..http.keys import read_key_quietly

        key = read_key_quietly()
        stored = key is not None
    return Settings(url.rstrip("/"), key, DEFAULT_TIMEOUT if timeout is None else timeout,
                    stored)


def _loopback_url(url: str) -> bool:
    from urllib.parse import urlsplit

    from ..http.guards import is_loopback_name

    try:
        host = urlsplit(url).hostname
    except ValueError:
        return False
    return host is not None and is_loopback_name(host.lower())


def _same(data: Any) -> Any:
    return data


def _nothing(_data: Any) -> None:
    return None


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[Any], T]
    json: Any = None
    has_body: bool = field(default=False)


def _seg(value: str) -> str:
    """One path segment, percent-encoded (a '/' or '?' in an id cannot reroute the call)."""
    return quote(str(value), safe="")


def _file(name: str, path: str) -> str:
    return f"/sandboxes/{_seg(name)}/files/{quote(path.lstrip('/'), safe='/')}"


def _model(cls: type[T]) -> Callable[[Any], T]:
    return lambda data: cls(**data)


def _models(cls: type[T]) -> Callable[[Any], list[T]]:
    return lambda data: [cls(**item) for item in data]


def unwrap(status: int, text: str) -> Any:
    """The `data` of an envelope, or the error it (or the status) stands for."""
    if status >= 400:
        raise error_from_status(status, text)
    try:
        body = json.loads(text)
    except ValueError:
        raise ServerError(f"the server answered {status} with a body that is not JSON",
                          status) from None
    if not isinstance(body, dict):
        raise ServerError("the server answered with JSON that is not an envelope", status)
    if not body.get("success"):
        raise AgentKernelError(str(body.get("error") or "Unknown error"))
    return body.get("data")


def _get(path: str, parse: Callable[[Any], T]) -> Call[T]:
    return Call("GET", path, parse)


def _post(path: str, body: Any, parse: Callable[[Any], T]) -> Call[T]:
    return Call("POST", path, parse, body, True)


def _delete(path: str, parse: Callable[[Any], T]) -> Call[T]:
    return Call("DELETE", path, parse)


def _exec_body(command: list[str], env: list[str] | None, workdir: str | None,
               sudo: bool | None) -> dict[str, Any]:
    body: dict[str, Any] = {"command": list(command)}
    if env:
        body["env"] = list(env)
    if workdir is not None:
        body["workdir"] = workdir
    if sudo is not None:
        body["sudo"] = sudo
    return body


def run_body(command: list[str], image: str | None, profile: str | None,
             fast: bool) -> dict[str, Any]:
    return {"command": list(command), "image": image, "profile": profile, "fast": fast}


# -- one builder per API method --

def health() -> Call[str]:
    return _get("/health", lambda d: cast(str, d))


def run(command: list[str], image: str | None, profile: str | None, fast: bool
        ) -> Call[RunOutput]:
    return _post("/run", run_body(command, image, profile, fast), _model(RunOutput))


def list_sandboxes() -> Call[list[SandboxInfo]]:
    return _get("/sandboxes", _models(SandboxInfo))


def get_backends() -> Call[BackendDiscovery]:
    return _get("/backends", _model(BackendDiscovery))


def create_sandbox(name: str, options: dict[str, Any]) -> Call[SandboxInfo]:
    body = {"name": name, **{k: v for k, v in options.items() if v is not None}}
    return _post("/sandboxes", body, _model(SandboxInfo))


def get_sandbox(name: str) -> Call[SandboxInfo]:
    return _get(f"/sandboxes/{_seg(name)}", _model(SandboxInfo))


def get_sandbox_by_uuid(uuid: str) -> Call[SandboxInfo]:
    return _get(f"/sandboxes/by-uuid/{_seg(uuid)}", _model(SandboxInfo))


def remove_sandbox(name: str) -> Call[None]:
    return _delete(f"/sandboxes/{_seg(name)}", _nothing)


def exec_in_sandbox(name: str, command: list[str], env: list[str] | None, workdir: str | None,
                    sudo: bool | None) -> Call[RunOutput]:
    return _post(f"/sandboxes/{_seg(name)}/exec", _exec_body(command, env, workdir, sudo),
                 _model(RunOutput))


def read_file(name: str, path: str) -> Call[FileReadResponse]:
    return _get(_file(name, path), _model(FileReadResponse))


def write_file(name: str, path: str, content: str, encoding: str) -> Call[str]:
    return Call("PUT", _file(name, path), lambda d: cast(str, d),
                {"content": content, "encoding": encoding}, True)


def delete_file(name: str, path: str) -> Call[str]:
    return _delete(_file(name, path), lambda d: cast(str, d))


def write_files(name: str, files: dict[str, str]) -> Call[BatchFileWriteResponse]:
    return _post(f"/sandboxes/{_seg(name)}/files", {"files": dict(files)},
                 _model(BatchFileWriteResponse))


def get_sandbox_logs(name: str) -> Call[list[dict[str, Any]]]:
    return _get(f"/sandboxes/{_seg(name)}/logs", lambda d: cast(list[dict[str, Any]], d))


def batch_run(commands: Iterable[list[str]]) -> Call[BatchRunResponse]:
    body = {"commands": [{"command": list(c)} for c in commands]}
    return _post("/batch/run", body, _model(BatchRunResponse))


def exec_detached(name: str, command: list[str], env: list[str] | None, workdir: str | None,
                  sudo: bool | None) -> Call[DetachedCommand]:
    return _post(f"/sandboxes/{_seg(name)}/exec/detach",
                 _exec_body(command, env, workdir, sudo), _model(DetachedCommand))


def detached_status(name: str, cmd_id: str) -> Call[DetachedCommand]:
    return _get(f"/sandboxes/{_seg(name)}/exec/detached/{_seg(cmd_id)}",
                _model(DetachedCommand))


def detached_logs(name: str, cmd_id: str, stream: str | None) -> Call[DetachedLogsResponse]:
    query = "?stream=stderr" if stream == "stderr" else ""
    return _get(f"/sandboxes/{_seg(name)}/exec/detached/{_seg(cmd_id)}/logs{query}",
                _model(DetachedLogsResponse))


def detached_kill(name: str, cmd_id: str) -> Call[str]:
    return _delete(f"/sandboxes/{_seg(name)}/exec/detached/{_seg(cmd_id)}",
                   lambda d: cast(str, d))


def detached_list(name: str) -> Call[list[DetachedCommand]]:
    return _get(f"/sandboxes/{_seg(name)}/exec/detached", _models(DetachedCommand))


def extend_ttl(name: str, by: str) -> Call[str | None]:
    def parse(data: Any) -> str | None:
        return cast("str | None", data.get("expires_at") if isinstance(data, dict) else data)

    return _post(f"/sandboxes/{_seg(name)}/extend", {"by": by}, parse)


def list_snapshots() -> Call[list[SnapshotMeta]]:
    return _get("/snapshots", _models(SnapshotMeta))


def take_snapshot(sandbox: str, snapshot_name: str | None) -> Call[SnapshotMeta]:
    body: dict[str, Any] = {"sandbox": sandbox}
    if snapshot_name is not None:
        body["name"] = snapshot_name
    return _post("/snapshots", body, _model(SnapshotMeta))


def get_snapshot(name: str) -> Call[SnapshotMeta]:
    return _get(f"/snapshots/{_seg(name)}", _model(SnapshotMeta))


def delete_snapshot(name: str) -> Call[None]:
    return _delete(f"/snapshots/{_seg(name)}", _nothing)


def restore_snapshot(name: str) -> Call[SandboxInfo]:
    return Call("POST", f"/snapshots/{_seg(name)}/restore", _model(SandboxInfo))


def opaque(method: str, path: str, body: Any = None, has_body: bool = False) -> Call[Any]:
    """Durable resources (orchestrations, objects, schedules, stores): sent and read as is."""
    return Call(method, path, _same, body, has_body)


def opaque_text(method: str, path: str) -> Call[str]:
    return Call(method, path, lambda d: cast(str, d))


def seg(value: str) -> str:
    return _seg(value)


# -- server-sent events --

class SSEParser:
    """Events from SSE lines fed one at a time: the five known names only, comments
    skipped, `done` set after `done` or `error`. Data that isn't a JSON object arrives as
    `{"raw": text}`."""

    def __init__(self) -> None:
        self.event = ""
        self.data: list[str] = []
        self.done = False

    def feed(self, line: str) -> StreamEvent | None:
        if line == "":
            event, data = self.event, self.data
            self.event, self.data = "", []
            if not data or event not in STREAM_EVENTS:
                return None
            item = sse_event(event, "\n".join(data))
            self.done = item.type in ("done", "error")
            return item
        if line.startswith(":"):
            return None
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if key == "event":
            self.event = value
        elif key == "data":
            self.data.append(value)
        return None


def sse_event(event: str, text: str) -> StreamEvent:
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        payload = {"raw": text}
    return StreamEvent(type=event, data=payload)  # type: ignore[arg-type]
