"""The SDK's data models (pydantic): what the API returns, validated leniently."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

SecurityProfile = Literal["permissive", "moderate", "restrictive"]
SandboxStatus = Literal["running", "paused", "stopped", "dormant", "archived"]
StreamEventType = Literal["started", "progress", "output", "done", "error"]
DetachedStatus = Literal["running", "completed", "failed"]

# Durable resources: the server decides their shape (this server answers 404 for them).
Orchestration = dict[str, Any]
OrchestrationDefinition = dict[str, Any]
DurableObject = dict[str, Any]
Schedule = dict[str, Any]
DurableStore = dict[str, Any]
DurableStoreQueryResult = dict[str, Any]
DurableStoreExecuteResult = dict[str, Any]
DurableStoreCommandResult = dict[str, Any]


class RunOutput(BaseModel):
    """A finished command. `output` is its stdout; the rest is sent by agentkernel's server."""

    output: str
    exit_code: int | None = None
    stderr: str | None = None
    success: bool | None = None
    truncated: bool | None = None  # the server kept only max_output_bytes and killed it


class SandboxInfo(BaseModel):
    name: str
    uuid: str | None = None
    status: SandboxStatus
    backend: str
    image: str | None = None
    vcpus: int | None = None
    memory_mb: int | None = None
    created_at: str | None = None
    isolation: str | None = None
    profile: str | None = None
    expires_at: str | None = None


class BackendCapabilities(BaseModel):
    mount_cwd: bool
    mount_home: bool
    attach: bool
    host_volumes: bool
    ssh: bool
    proxy_secret_bindings: bool
    secret_files: bool
    snapshots: bool
    resume: bool
    full_state_pause_resume: bool
    full_state_fork: bool
    endpoints: bool


class BackendDescriptor(BaseModel):
    backend: str
    configured: bool
    usable: bool
    readiness_reason: str
    capabilities: BackendCapabilities
    isolation: str | None = None


class BackendDiscovery(BaseModel):
    default_backend: str | None = None
    backends: list[BackendDescriptor]


class RunOptions(BaseModel):
    image: str | None = None
    profile: SecurityProfile | None = None
    fast: bool = True


class CreateSandboxOptions(BaseModel):
    backend: str | None = None
    image: str | None = None
    vcpus: int | None = None
    memory_mb: int | None = None
    profile: SecurityProfile | None = None
    source_url: str | None = None
    source_ref: str | None = None
    volumes: list[str] | None = None
    secrets: list[str] | None = None
    secret_files: list[str] | None = None


class ExecOptions(BaseModel):
    env: list[str] = []
    workdir: str | None = None
    sudo: bool | None = None


class StreamEvent(BaseModel):
    """One server-sent event of `run_stream`."""

    type: StreamEventType
    data: dict[str, Any]


class FileReadResponse(BaseModel):
    content: str
    encoding: str  # "utf8" or "base64"
    size: int  # bytes, decoded


class BatchCommand(BaseModel):
    command: list[str]


class BatchResult(BaseModel):
    output: str | None = None
    error: str | None = None
    exit_code: int | None = None
    stderr: str | None = None
    success: bool | None = None


class BatchRunResponse(BaseModel):
    results: list[BatchResult]


class BatchFileWriteResponse(BaseModel):
    written: int


class DetachedCommand(BaseModel):
    id: str
    sandbox: str
    command: list[str]
    pid: int
    status: DetachedStatus
    exit_code: int | None = None
    started_at: str


class DetachedLogsResponse(BaseModel):
    stdout: str | None = None
    stderr: str | None = None


class ExtendTtlResponse(BaseModel):
    expires_at: str | None = None


class SnapshotMeta(BaseModel):
    name: str
    sandbox: str
    image_tag: str
    backend: str
    base_image: str | None = None
    vcpus: int | None = None
    memory_mb: int | None = None
    created_at: str


class PageLink(BaseModel):
    text: str
    href: str


class PageResult(BaseModel):
    title: str
    url: str
    text: str
    links: list[PageLink] = []


class AriaSnapshot(BaseModel):
    snapshot: str
    url: str
    title: str
    refs: list[str] = []


class BrowserEvent(BaseModel):
    seq: int
    type: str
    page: str
    ts: str
