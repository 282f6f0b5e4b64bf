"""`AsyncAgentKernel`: the asyncio client, method for method the official SDK's async one."""

from __future__ import annotations

from collections.abc import AsyncIterator
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
                      ) -> httpx.AsyncBaseTransport | None:
    """As `sync.default_transport`, for asyncio."""
    path = c.daemon_api_socket(base_url)
    if path:
        from ._uds import AsyncDaemonTransport

        return AsyncDaemonTransport(path)
    key = settings.keyed() if settings is not None else None
    if key:
        from ._keyed import AsyncStoredKeyTransport

        return AsyncStoredKeyTransport(key)
    return None


class AsyncSandboxSession:
    """A sandbox that `async with` removes on the way out, even when the body raised."""

    def __init__(self, name: str, client: AsyncAgentKernel) -> None:
        self.name = name
        self._client = client
        self._removed = False

    async def run(self, command: list[str], *, env: list[str] | None = None,
                  workdir: str | None = None, sudo: bool | None = None) -> RunOutput:
        return await self._client.exec_in_sandbox(self.name, command, env=env,
                                                  workdir=workdir, sudo=sudo)

    async def info(self) -> SandboxInfo:
        return await self._client.get_sandbox(self.name)

    async def write_files(self, files: dict[str, str]) -> BatchFileWriteResponse:
        return await self._client.write_files(self.name, files)

    async def remove(self) -> None:
        """Remove the sandbox once; later calls do nothing (a failed removal is not retried)."""
        if self._removed:
            return
        self._removed = True
        await self._client.remove_sandbox(self.name)

    async def __aenter__(self) -> AsyncSandboxSession:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.remove()


class AsyncAgentKernel:
    """The asyncio twin of `AgentKernel`: same arguments, same methods, awaited."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None,
                 timeout: float | None = None, *,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        s = self._settings = c.settings(base_url, api_key, timeout)
        # The stored key goes only down connections to our own server (`_keyed` adds it).
        self._http = httpx.AsyncClient(
            base_url=s.base_url, headers=s.headers(stored=transport is not None),
            timeout=s.timeout, transport=transport or default_transport(base_url, s),
        )

    @property
    def base_url(self) -> str:
        return self._settings.base_url

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncAgentKernel:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def _call(self, call: c.Call[T]) -> T:
        try:
            if call.has_body:
                response = await self._http.request(call.method, call.path, json=call.json)
            else:
                response = await self._http.request(call.method, call.path)
        except httpx.TimeoutException as exc:
            raise NetworkError(f"Request timed out: {exc}") from exc
        except httpx.TransportError as exc:
            raise NetworkError(f"Failed to connect to {self.base_url}: {exc}") from exc
        return call.parse(c.unwrap(response.status_code, response.text))

    async def run_stream(self, command: list[str], *, image: str | None = None,
                         profile: SecurityProfile | None = None, fast: bool = True
                         ) -> AsyncIterator[StreamEvent]:
        """Start the run; errors before the stream are raised here, events come after."""
        body = c.run_body(command, image, profile, fast)
        request = self._http.build_request("POST", "/run/stream", json=body)
        try:
            response = await self._http.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise NetworkError(f"Request timed out: {exc}") from exc
        except httpx.TransportError as exc:
            raise NetworkError(f"Failed to connect to {self.base_url}: {exc}") from exc
        if response.status_code >= 400:
            await response.aread()
            await response.aclose()
            raise error_from_status(response.status_code, response.text)
        kind = response.headers.get("content-type", "")
        if "text/event-stream" not in kind:
            await response.aclose()
            raise StreamError(f"expected text/event-stream, got {kind or 'nothing'}")
        return self._events(response)

    async def _events(self, response: httpx.Response) -> AsyncIterator[StreamEvent]:
        parser = c.SSEParser()
        try:
            async for line in response.aiter_lines():
                event = parser.feed(line)
                if event is not None:
                    yield event
                    if parser.done:
                        return
        except httpx.TimeoutException as exc:
            raise NetworkError(f"Stream timed out: {exc}") from exc
        except httpx.TransportError as exc:
            raise NetworkError(f"Stream failed: {exc}") from exc
        finally:
            await response.aclose()

    async def health(self) -> str:
        return await self._call(c.health())

    async def run(self, command: list[str], *, image: str | None = None,
            profile: SecurityProfile | None = None, fast: bool = True) -> RunOutput:
        """Run a command in a fresh sandbox that is gone afterwards."""
        return await self._call(c.run(command, image, profile, fast))

    async def batch_run(self, commands: list[list[str]]) -> BatchRunResponse:
        return await self._call(c.batch_run(commands))

    # -- sandboxes --

    async def list_sandboxes(self) -> list[SandboxInfo]:
        return await self._call(c.list_sandboxes())

    async def get_backends(self) -> BackendDiscovery:
        return await self._call(c.get_backends())

    async def create_sandbox(self, name: str, *, image: str | None = None, vcpus: int | None = None,
                       memory_mb: int | None = None, profile: SecurityProfile | None = None,
                       backend: str | None = None, source_url: str | None = None,
                       source_ref: str | None = None, volumes: list[str] | None = None,
                       secrets: list[str] | None = None,
                       secret_files: list[str] | None = None) -> SandboxInfo:
        options = {"backend": backend, "image": image, "vcpus": vcpus, "memory_mb": memory_mb,
                   "profile": profile, "source_url": source_url, "source_ref": source_ref,
                   "volumes": volumes, "secrets": secrets, "secret_files": secret_files}
        return await self._call(c.create_sandbox(name, options))

    async def get_sandbox(self, name: str) -> SandboxInfo:
        return await self._call(c.get_sandbox(name))

    async def get_sandbox_by_uuid(self, uuid: str) -> SandboxInfo:
        return await self._call(c.get_sandbox_by_uuid(uuid))

    async def remove_sandbox(self, name: str) -> None:
        await self._call(c.remove_sandbox(name))

    async def get_sandbox_logs(self, name: str) -> list[dict[str, Any]]:
        return await self._call(c.get_sandbox_logs(name))

    async def extend_ttl(self, name: str, *, by: str) -> str | None:
        """Push the sandbox's expiry `by` a duration such as "30m"; the new expiry time."""
        return await self._call(c.extend_ttl(name, by))

    async def sandbox(self, name: str, *, image: str | None = None, vcpus: int | None = None,
                memory_mb: int | None = None, profile: SecurityProfile | None = None
                ) -> AsyncSandboxSession:
        """Create the sandbox now; the returned session removes it when its `with` ends."""
        await self.create_sandbox(name, image=image, vcpus=vcpus, memory_mb=memory_mb,
                            profile=profile)
        return AsyncSandboxSession(name, self)

    # -- commands in a sandbox --

    async def exec_in_sandbox(self, name: str, command: list[str], *, env: list[str] | None = None,
                        workdir: str | None = None, sudo: bool | None = None) -> RunOutput:
        return await self._call(c.exec_in_sandbox(name, command, env, workdir, sudo))

    async def exec_detached(self, name: str, command: list[str], *, env: list[str] | None = None,
                      workdir: str | None = None, sudo: bool | None = None
                      ) -> DetachedCommand:
        return await self._call(c.exec_detached(name, command, env, workdir, sudo))

    async def detached_status(self, name: str, cmd_id: str) -> DetachedCommand:
        return await self._call(c.detached_status(name, cmd_id))

    async def detached_logs(self, name: str, cmd_id: str, *, stream: str | None = None
                      ) -> DetachedLogsResponse:
        return await self._call(c.detached_logs(name, cmd_id, stream))

    async def detached_kill(self, name: str, cmd_id: str) -> str:
        return await self._call(c.detached_kill(name, cmd_id))

    async def detached_list(self, name: str) -> list[DetachedCommand]:
        return await self._call(c.detached_list(name))

    # -- files --

    async def read_file(self, name: str, path: str) -> FileReadResponse:
        return await self._call(c.read_file(name, path))

    async def write_file(self, name: str, path: str, content: str, *,
                         encoding: str = "utf8") -> str:
        return await self._call(c.write_file(name, path, content, encoding))

    async def delete_file(self, name: str, path: str) -> str:
        return await self._call(c.delete_file(name, path))

    async def write_files(self, name: str, files: dict[str, str]) -> BatchFileWriteResponse:
        return await self._call(c.write_files(name, files))

    # -- snapshots --

    async def list_snapshots(self) -> list[SnapshotMeta]:
        return await self._call(c.list_snapshots())

    async def take_snapshot(self, sandbox: str, *, snapshot_name: str | None = None
                            ) -> SnapshotMeta:
        return await self._call(c.take_snapshot(sandbox, snapshot_name))

    async def get_snapshot(self, name: str) -> SnapshotMeta:
        return await self._call(c.get_snapshot(name))

    async def delete_snapshot(self, name: str) -> None:
        await self._call(c.delete_snapshot(name))

    async def restore_snapshot(self, name: str) -> SandboxInfo:
        return await self._call(c.restore_snapshot(name))

    # -- durable resources: part of the SDK, not of this server (it answers 404) --

    async def list_orchestrations(self) -> list[dict[str, Any]]:
        return await self._call(c.opaque("GET", "/orchestrations"))

    async def create_orchestration(self, orchestration: dict[str, Any]) -> dict[str, Any]:
        return await self._call(c.opaque("POST", "/orchestrations", orchestration, True))

    async def get_orchestration(self, orchestration_id: str) -> dict[str, Any]:
        return await self._call(c.opaque("GET", f"/orchestrations/{c.seg(orchestration_id)}"))

    async def signal_orchestration(self, orchestration_id: str, event: dict[str, Any]
                             ) -> dict[str, Any]:
        path = f"/orchestrations/{c.seg(orchestration_id)}/events"
        return await self._call(c.opaque("POST", path, event, True))

    async def terminate_orchestration(self, orchestration_id: str,
                                payload: dict[str, Any] | None = None) -> dict[str, Any]:
        path = f"/orchestrations/{c.seg(orchestration_id)}/terminate"
        return await self._call(c.opaque("POST", path, payload or {}, True))

    async def list_orchestration_definitions(self) -> list[dict[str, Any]]:
        return await self._call(c.opaque("GET", "/orchestrations/definitions"))

    async def upsert_orchestration_definition(self, definition: dict[str, Any]) -> dict[str, Any]:
        return await self._call(c.opaque("POST", "/orchestrations/definitions", definition, True))

    async def get_orchestration_definition(self, name: str) -> dict[str, Any]:
        return await self._call(c.opaque("GET", f"/orchestrations/definitions/{c.seg(name)}"))

    async def delete_orchestration_definition(self, name: str) -> str:
        path = f"/orchestrations/definitions/{c.seg(name)}"
        return await self._call(c.opaque_text("DELETE", path))

    async def list_objects(self) -> list[dict[str, Any]]:
        return await self._call(c.opaque("GET", "/objects"))

    async def create_object(self, obj: dict[str, Any]) -> dict[str, Any]:
        return await self._call(c.opaque("POST", "/objects", obj, True))

    async def get_object(self, object_id: str) -> dict[str, Any]:
        return await self._call(c.opaque("GET", f"/objects/{c.seg(object_id)}"))

    async def call_object(self, class_name: str, object_id: str, method: str,
                    args: dict[str, Any] | None = None) -> dict[str, Any]:
        path = f"/objects/{c.seg(class_name)}/{c.seg(object_id)}/call/{c.seg(method)}"
        return await self._call(c.opaque("POST", path, args or {}, True))

    async def delete_object(self, object_id: str) -> str:
        return await self._call(c.opaque_text("DELETE", f"/objects/{c.seg(object_id)}"))

    async def patch_object(self, object_id: str, *, storage: dict[str, Any] | None = None,
                     status: str | None = None) -> dict[str, Any]:
        body = {k: v for k, v in (("storage", storage), ("status", status)) if v is not None}
        return await self._call(c.opaque("PATCH", f"/objects/{c.seg(object_id)}", body, True))

    async def list_schedules(self) -> list[dict[str, Any]]:
        return await self._call(c.opaque("GET", "/schedules"))

    async def create_schedule(self, schedule: dict[str, Any]) -> dict[str, Any]:
        return await self._call(c.opaque("POST", "/schedules", schedule, True))

    async def get_schedule(self, schedule_id: str) -> dict[str, Any]:
        return await self._call(c.opaque("GET", f"/schedules/{c.seg(schedule_id)}"))

    async def delete_schedule(self, schedule_id: str) -> str:
        return await self._call(c.opaque_text("DELETE", f"/schedules/{c.seg(schedule_id)}"))

    async def list_stores(self) -> list[dict[str, Any]]:
        return await self._call(c.opaque("GET", "/stores"))

    async def create_store(self, store: dict[str, Any]) -> dict[str, Any]:
        return await self._call(c.opaque("POST", "/stores", store, True))

    async def get_store(self, store_id: str) -> dict[str, Any]:
        return await self._call(c.opaque("GET", f"/stores/{c.seg(store_id)}"))

    async def delete_store(self, store_id: str) -> str:
        return await self._call(c.opaque_text("DELETE", f"/stores/{c.seg(store_id)}"))

    async def query_store(self, store_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        return await self._call(c.opaque("POST", f"/stores/{c.seg(store_id)}/query", payload, True))

    async def execute_store(self, store_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        return await self._call(c.opaque("POST", f"/stores/{c.seg(store_id)}/execute", payload,
                                   True))

    async def command_store(self, store_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        return await self._call(c.opaque("POST", f"/stores/{c.seg(store_id)}/command", payload,
                                   True))
