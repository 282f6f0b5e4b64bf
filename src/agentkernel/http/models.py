"""Request and response bodies of the HTTP API: bounded, null-tolerant, unknown keys ignored."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Bounds keep every generated input inside what the service can answer with a 4xx.
MAX_ARGS = 4096
MAX_ARG_LEN = 256 * 1024
MAX_ENV = 1024
MAX_BATCH = 64
MAX_FILES = 1024
MAX_STR = 4096

Arg = Annotated[str, Field(max_length=MAX_ARG_LEN)]
Command = Annotated[list[Arg], Field(min_length=1, max_length=MAX_ARGS)]
ShortStr = Annotated[str, Field(max_length=MAX_STR)]


class _In(BaseModel):
    """Every request body: extra keys are ignored, as the SDKs send fields we don't use."""

    model_config = ConfigDict(extra="ignore")


class RunBody(_In):
    command: Command
    image: ShortStr | None = None
    profile: ShortStr | None = None
    fast: bool | None = None  # the pool is used whenever one is warm; accepted and ignored
    backend: ShortStr | None = None
    env: Annotated[list[ShortStr], Field(max_length=MAX_ENV)] | None = None
    workdir: ShortStr | None = None
    timeout: Annotated[float, Field(gt=0, le=86400)] | None = None


class BatchItem(_In):
    command: Command


class BatchBody(_In):
    commands: Annotated[list[BatchItem], Field(min_length=1, max_length=MAX_BATCH)]


class EgressBody(_In):
    """Host patterns a sandbox may (allow) or may not (deny) reach (egress_policy)."""

    allow: Annotated[list[ShortStr], Field(max_length=256)] = []
    deny: Annotated[list[ShortStr], Field(max_length=256)] = []


class CreateBody(_In):
    name: ShortStr
    image: ShortStr | None = None
    profile: ShortStr | None = None
    backend: ShortStr | None = None
    vcpus: Annotated[int, Field(ge=1, le=64)] | None = None
    memory_mb: Annotated[int, Field(ge=64, le=256 * 1024)] | None = None
    source_url: ShortStr | None = None
    source_ref: ShortStr | None = None
    volumes: Annotated[list[ShortStr], Field(max_length=256)] | None = None
    secrets: Annotated[list[ShortStr], Field(max_length=256)] | None = None
    secret_files: Annotated[list[ShortStr], Field(max_length=256)] | None = None
    env: Annotated[list[ShortStr], Field(max_length=MAX_ENV)] | None = None
    ttl: ShortStr | None = None  # a duration such as "30m": removed when it expires
    # Ours, beyond the SDKs' contract (which never sends them): an AI coding agent of the
    # registry (GET /agents) and egress host patterns on top of its default.
    agent: ShortStr | None = None
    egress: EgressBody | None = None


class ExecBody(_In):
    command: Command
    env: Annotated[list[ShortStr], Field(max_length=MAX_ENV)] | None = None
    workdir: ShortStr | None = None
    sudo: bool | None = None
    timeout: Annotated[float, Field(gt=0, le=86400)] | None = None


class FileWriteBody(_In):
    content: str
    encoding: Literal["utf8", "utf-8", "base64"] | None = None


class FilesWriteBody(_In):
    files: Annotated[dict[ShortStr, str], Field(max_length=MAX_FILES)]


class ExtendBody(_In):
    by: ShortStr


class SnapshotBody(_In):
    sandbox: ShortStr
    name: ShortStr | None = None


# -- responses (documentation and the schemathesis conformance check) --


class Envelope(BaseModel):
    success: bool
    data: Any = None
    error: str | None = None


class ErrorEnvelope(BaseModel):
    success: Literal[False] = False
    error: str


class RunOut(BaseModel):
    output: str = Field(description="the command's stdout, decoded as UTF-8")
    stderr: str
    exit_code: int
    success: bool = Field(description="exit_code == 0, and the output was not truncated")
    signal: int | None = Field(None, description="the signal that ended the command")
    timed_out: bool | None = None
    oom_killed: bool | None = None
    truncated: bool | None = Field(
        None, description="stdout + stderr went over the server's max_output_bytes: what "
                          "came before is kept, the command was killed")
    message: str | None = Field(None, description="why the command ended, when not by itself")


class SandboxOut(BaseModel):
    name: str
    uuid: str
    status: Literal["running", "paused", "stopped", "dormant", "archived"]
    backend: str
    isolation: str
    image: str
    profile: str
    vcpus: int | None
    memory_mb: int | None
    created_at: str
    expires_at: str | None = None
    agent: str | None = None  # ours: only on a sandbox made for an agent


class AgentOut(BaseModel):
    id: str
    name: str
    npm: str
    installed: bool  # agentkernel's install (`agentkernel agents install ID`)
    version: str | None
    key: str  # "secret:NAME" (a stored secret covers it) or "missing"
    hosts: list[str]  # what its sandbox may reach by default


class AgentsOut(BaseModel):
    agents: list[AgentOut]


class FileOut(BaseModel):
    content: str
    encoding: Literal["utf8", "base64"]
    size: int


class WrittenOut(BaseModel):
    written: int


class BatchResultOut(BaseModel):
    output: str | None
    error: str | None
    stderr: str | None = None
    exit_code: int | None = None
    success: bool


class BatchOut(BaseModel):
    results: list[BatchResultOut]


class DetachedOut(BaseModel):
    id: str
    sandbox: str
    command: list[str]
    pid: int
    status: Literal["running", "completed", "failed"]
    started_at: str
    exit_code: int | None = None


class DetachedLogsOut(BaseModel):
    stdout: str | None = None
    stderr: str | None = None


class ExtendOut(BaseModel):
    expires_at: str | None


class SnapshotOut(BaseModel):
    name: str
    sandbox: str
    image_tag: str
    backend: str
    created_at: str
    base_image: str | None = None
    vcpus: int | None = None
    memory_mb: int | None = None


class CapabilitiesOut(BaseModel):
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


class BackendOut(BaseModel):
    backend: str
    configured: bool
    usable: bool
    readiness_reason: str
    isolation: str
    capabilities: CapabilitiesOut


class BackendsOut(BaseModel):
    default_backend: str | None
    backends: list[BackendOut]


_ENVELOPES: dict[str, type[BaseModel]] = {}


def envelope_of(model: Any, name: str) -> type[BaseModel]:
    """`{"success": true, "data": <model>}` as a named schema for the OpenAPI document."""
    from pydantic import create_model

    if name not in _ENVELOPES:
        _ENVELOPES[name] = create_model(
            name, success=(Literal[True], True), data=(model, ...), error=(str | None, None)
        )
    return _ENVELOPES[name]
