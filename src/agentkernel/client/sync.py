"""`AgentKernel`: the blocking client, method for method the official Python SDK's (0.21.0)."""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType
from typing import Any, TypeVar

import httpx

from . import _calls as c
from .errors import NetworkError, StreamError, error_from_status
from .models import (
    BackendDiscovery,
    BatchFileWriteResponse,
    BatchRunResponse,
    DetachedCommand,
    DetachedLogsResponse,
    FileReadResponse,
    RunOutput,
    SandboxInfo,
    SecurityProfile,
    SnapshotMeta,
    StreamEvent,
)

T = TypeVar("T")


def default_transport(base_url: str | None, settings: c.Settings | None = None
                      ) -> httpx.BaseTransport | None:
    """The transport used when none is passed: with no base URL given (argument or
    AGENTKERNEL_BASE_URL), the local daemon's unix socket — started on demand, the peer
    of each connection checked (`_uds`); with the key `serve` stored, TCP whose every
    connection is checked before the key goes down it (`_keyed`); else None, which means
    httpx's own TCP to the base URL."""
    path = c.daemon_api_socket(base_url)
    if path:
        from ._uds import DaemonTransport

        return DaemonTransport(path)
    key = settings.keyed() if settings is not None else None
    if key:
        from ._keyed import StoredKeyTransport

        return StoredKeyTransport(key)
    return None


class SandboxSession:
    """A sandbox that `with` removes on the way out, even when the body raised."""

    def __init__(self, name: str, client: AgentKernel) -> None:
        self.name = name
        self._client = client
        self._removed = False

    def run(self, command: list[str], *, env: list[str] | None = None,
            workdir: str | None = None, sudo: bool | None = None) -> RunOutput:
        return self._client.exec_in_sandbox(self.name, command, env=env, workdir=workdir,
                                            sudo=sudo)

    def info(self) -> SandboxInfo:
        return self._client.get_sandbox(self.name)

    def write_files(self, files: dict[str, str]) -> BatchFileWriteResponse:
        return self._client.write_files(self.name, files)

    def remove(self) -> None:
        """Remove the sandbox once; later calls do nothing (a failed removal is not retried)."""
        if self._removed:
            return
        self._removed = True
        self._client.remove_sandbox(self.name)

    def __enter__(self) -> SandboxSession:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()


class AgentKernel:
    """Talks to an agentkernel HTTP API (ours, or any server of the same contract).

    `base_url`, else AGENTKERNEL_BASE_URL, else the local daemon's unix socket (the daemon
    is started if none runs); `api_key`, else
    AGENTKERNEL_API_KEY; `timeout` in seconds per I/O phase (default 30). `transport`
    replaces the network (e.g. `httpx.HTTPTransport(uds=...)`).
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None,
                 timeout: float | None = None, *,
                 transport: httpx.BaseTransport | None = None) -> None:
        s = self._settings = c.settings(base_url, api_key, timeout)
        # The stored key goes only down connections to our own server (`_keyed` adds it).
        self._http = httpx.Client(
            base_url=s.base_url, headers=s.headers(stored=transport is not None),
            timeout=s.timeout, transport=transport or default_transport(base_url, s),
        )

    @property
    def base_url(self) -> str:
        return self._settings.base_url

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AgentKernel:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _call(self, call: c.Call[T]) -> T:
        try:
            if call.has_body:
                response = self._http.request(call.method, call.path, json=call.json)
            else:
                response = self._http.request(call.method, call.path)
        except httpx.TimeoutException as exc:
            raise NetworkError(f"Request timed out: {exc}") from exc
        except httpx.TransportError as exc:
            raise NetworkError(f"Failed to connect to {self.base_url}: {exc}") from exc
        return call.parse(c.unwrap(response.status_code, response.text))

    # -- runs --

    def health(self) -> str:
        return self._call(c.health())

    def run(self, command: list[str], *, image: str | None = None,
            profile: SecurityProfile | None = None, fast: bool = True) -> RunOutput:
        """Run a command in a fresh sandbox that is gone afterwards."""
        return self._call(c.run(command, image, profile, fast))

    def run_stream(self, command: list[str], *, image: str | None = None,
                   profile: SecurityProfile | None = None, fast: bool = True
                   ) -> Iterator[StreamEvent]:
        """Like `run`, as events while the command runs (nothing is sent until iterated)."""
        body = c.run_body(command, image, profile, fast)
        try:
            with self._http.stream("POST", "/run/stream", json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise error_from_status(response.status_code, response.text)
                kind = response.headers.get("content-type", "")
                if "text/event-stream" not in kind:
                    raise StreamError(f"expected text/event-stream, got {kind or 'nothing'}")
                parser = c.SSEParser()
                for line in response.iter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield event
                        if parser.done:
                            return
        except httpx.TimeoutException as exc:
            raise NetworkError(f"Stream timed out: {exc}") from exc
        except httpx.TransportError as exc:
            raise NetworkError(f"Stream failed: {exc}") from exc

    def batch_run(self, commands: list[list[str]]) -> BatchRunResponse:
        return self._call(c.batch_run(commands))

    # -- sandboxes --

    def list_sandboxes(self) -> list[SandboxInfo]:
        return self._call(c.list_sandboxes())

    def get_backends(self) -> BackendDiscovery:
        return self._call(c.get_backends())

    def create_sandbox(self, name: str, *, image: str | None = None, vcpus: int | None = None,
                       memory_mb: int | None = None, profile: SecurityProfile | None = None,
                       backend: str | None = None, source_url: str | None = None,
                       source_ref: str | None = None, volumes: list[str] | None = None,
                       secrets: list[str] | None = None,
                       secret_files: list[str] | None = None) -> SandboxInfo:
        options = {"backend": backend, "image": image, "vcpus": vcpus, "memory_mb": memory_mb,
                   "profile": profile, "source_url": source_url, "source_ref": source_ref,
                   "volumes": volumes, "secrets": secrets, "secret_files": secret_files}
        return self._call(c.create_sandbox(name, options))

    def get_sandbox(self, name: str) -> SandboxInfo:
        return self._call(c.get_sandbox(name))

    def get_sandbox_by_uuid(self, uuid: str) -> SandboxInfo:
        return self._call(c.get_sandbox_by_uuid(uuid))

    def remove_sandbox(self, name: str) -> None:
        self._call(c.remove_sandbox(name))

    def get_sandbox_logs(self, name: str) -> list[dict[str, Any]]:
        return self._call(c.get_sandbox_logs(name))

    def extend_ttl(self, name: str, *, by: str) -> str | None:
        """Push the sandbox's expiry `by` a duration such as "30m"; the new expiry time."""
        return self._call(c.extend_ttl(name, by))

    def sandbox(self, name: str, *, image: str | None = None, vcpus: int | None = None,
                memory_mb: int | None = None, profile: SecurityProfile | None = None
                ) -> SandboxSession:
        """Create the sandbox now; the returned session removes it when its `with` ends."""
        self.create_sandbox(name, image=image, vcpus=vcpus, memory_mb=memory_mb,
                            profile=profile)
        return SandboxSession(name, self)

    # -- commands in a sandbox --

    def exec_in_sandbox(self, name: str, command: list[str], *, env: list[str] | None = None,
                        workdir: str | None = None, sudo: bool | None = None) -> RunOutput:
        return self._call(c.exec_in_sandbox(name, command, env, workdir, sudo))

    def exec_detached(self, name: str, command: list[str], *, env: list[str] | None = None,
                      workdir: str | None = None, sudo: bool | None = None
                      ) -> DetachedCommand:
        return self._call(c.exec_detached(name, command, env, workdir, sudo))

    def detached_status(self, name: str, cmd_id: str) -> DetachedCommand:
        return self._call(c.detached_status(name, cmd_id))

    def detached_logs(self, name: str, cmd_id: str, *, stream: str | None = None
                      ) -> DetachedLogsResponse:
        return self._call(c.detached_logs(name, cmd_id, stream))

    def detached_kill(self, name: str, cmd_id: str) -> str:
        return self._call(c.detached_kill(name, cmd_id))

    def detached_list(self, name: str) -> list[DetachedCommand]:
        return self._call(c.detached_list(name))

    # -- files --

    def read_file(self, name: str, path: str) -> FileReadResponse:
        return self._call(c.read_file(name, path))

    def write_file(self, name: str, path: str, content: str, *, encoding: str = "utf8") -> str:
        return self._call(c.write_file(name, path, content, encoding))

    def delete_file(self, name: str, path: str) -> str:
        return self._call(c.delete_file(name, path))

    def write_files(self, name: str, files: dict[str, str]) -> BatchFileWriteResponse:
        return self._call(c.write_files(name, files))

    # -- snapshots --

    def list_snapshots(self) -> list[SnapshotMeta]:
        return self._call(c.list_snapshots())

    def take_snapshot(self, sandbox: str, *, snapshot_name: str | None = None) -> SnapshotMeta:
        return self._call(c.take_snapshot(sandbox, snapshot_name))

    def get_snapshot(self, name: str) -> SnapshotMeta:
        return self._call(c.get_snapshot(name))

    def delete_snapshot(self, name: str) -> None:
        self._call(c.delete_snapshot(name))

    def restore_snapshot(self, name: str) -> SandboxInfo:
        return self._call(c.restore_snapshot(name))

    # -- durable resources: part of the SDK, not of this server (it answers 404) --

    def list_orchestrations(self) -> list[dict[str, Any]]:
        return self._call(c.opaque("GET", "/orchestrations"))

    def create_orchestration(self, orchestration: dict[str, Any]) -> dict[str, Any]:
        return self._call(c.opaque("POST", "/orchestrations", orchestration, True))

    def get_orchestration(self, orchestration_id: str) -> dict[str, Any]:
        return self._call(c.opaque("GET", f"/orchestrations/{c.seg(orchestration_id)}"))

    def signal_orchestration(self, orchestration_id: str, event: dict[str, Any]
                             ) -> dict[str, Any]:
        path = f"/orchestrations/{c.seg(orchestration_id)}/events"
        return self._call(c.opaque("POST", path, event, True))

    def terminate_orchestration(self, orchestration_id: str,
                                payload: dict[str, Any] | None = None) -> dict[str, Any]:
        path = f"/orchestrations/{c.seg(orchestration_id)}/terminate"
        return self._call(c.opaque("POST", path, payload or {}, True))

    def list_orchestration_definitions(self) -> list[dict[str, Any]]:
        return self._call(c.opaque("GET", "/orchestrations/definitions"))

    def upsert_orchestration_definition(self, definition: dict[str, Any]) -> dict[str, Any]:
        return self._call(c.opaque("POST", "/orchestrations/definitions", definition, True))

    def get_orchestration_definition(self, name: str) -> dict[str, Any]:
        return self._call(c.opaque("GET", f"/orchestrations/definitions/{c.seg(name)}"))

    def delete_orchestration_definition(self, name: str) -> str:
        return self._call(c.opaque_text("DELETE", f"/orchestrations/definitions/{c.seg(name)}"))

    def list_objects(self) -> list[dict[str, Any]]:
        return self._call(c.opaque("GET", "/objects"))

    def create_object(self, obj: dict[str, Any]) -> dict[str, Any]:
        return self._call(c.opaque("POST", "/objects", obj, True))

    def get_object(self, object_id: str) -> dict[str, Any]:
        return self._call(c.opaque("GET", f"/objects/{c.seg(object_id)}"))

    def call_object(self, class_name: str, object_id: str, method: str,
                    args: dict[str, Any] | None = None) -> dict[str, Any]:
        path = f"/objects/{c.seg(class_name)}/{c.seg(object_id)}/call/{c.seg(method)}"
        return self._call(c.opaque("POST", path, args or {}, True))

    def delete_object(self, object_id: str) -> str:
        return self._call(c.opaque_text("DELETE", f"/objects/{c.seg(object_id)}"))

    def patch_object(self, object_id: str, *, storage: dict[str, Any] | None = None,
                     status: str | None = None) -> dict[str, Any]:
        body = {k: v for k, v in (("storage", storage), ("status", status)) if v is not None}
        return self._call(c.opaque("PATCH", f"/objects/{c.seg(object_id)}", body, True))

    def list_schedules(self) -> list[dict[str, Any]]:
        return self._call(c.opaque("GET", "/schedules"))

    def create_schedule(self, schedule: dict[str, Any]) -> dict[str, Any]:
        return self._call(c.opaque("POST", "/schedules", schedule, True))

    def get_schedule(self, schedule_id: str) -> dict[str, Any]:
        return self._call(c.opaque("GET", f"/schedules/{c.seg(schedule_id)}"))

    def delete_schedule(self, schedule_id: str) -> str:
        return self._call(c.opaque_text("DELETE", f"/schedules/{c.seg(schedule_id)}"))

    def list_stores(self) -> list[dict[str, Any]]:
        return self._call(c.opaque("GET", "/stores"))

    def create_store(self, store: dict[str, Any]) -> dict[str, Any]:
        return self._call(c.opaque("POST", "/stores", store, True))

    def get_store(self, store_id: str) -> dict[str, Any]:
        return self._call(c.opaque("GET", f"/stores/{c.seg(store_id)}"))

    def delete_store(self, store_id: str) -> str:
        return self._call(c.opaque_text("DELETE", f"/stores/{c.seg(store_id)}"))

    def query_store(self, store_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        return self._call(c.opaque("POST", f"/stores/{c.seg(store_id)}/query", payload, True))

    def execute_store(self, store_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        return self._call(c.opaque("POST", f"/stores/{c.seg(store_id)}/execute", payload,
                                   True))

    def command_store(self, store_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        return self._call(c.opaque("POST", f"/stores/{c.seg(store_id)}/command", payload,
                                   True))
