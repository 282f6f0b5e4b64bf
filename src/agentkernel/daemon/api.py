"""The service interface the daemon's SandboxManager offers to the CLI, the HTTP API and MCP.

This file is the contract between `daemon/manager.py` (which implements it) and its
callers (`daemon/server.py` on the unix socket, `http/` for the REST API). Plain data
in and out; every error is an `agentkernel.errors.AgentKernelError` subclass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

SandboxStatus = Literal["running", "paused", "stopped", "dormant", "archived"]
OutputKind = Literal["stdout", "stderr"]
# Called with each chunk as the command produces it (real streaming).
OnOutput = Callable[[OutputKind, bytes], None]


@dataclass
class CreateRequest:
    name: str
    image: str | None = None  # None: auto (config / `alpine:3.20`)
    profile: str | None = None  # permissive | moderate | restrictive; None: config/moderate
    backend: str | None = None  # auto | namespaces | gvisor | microvm; None: auto
    vcpus: int | None = None
    memory_mb: int | None = None  # profiles.UNLIMITED (0): no cap
    pids: int | None = None  # likewise
    workdir_source: str | None = None  # host project dir shown at /workspace (`--dir`)
    env: dict[str, str] = field(default_factory=dict)
    ttl_seconds: float | None = None  # removed automatically when it expires
    cpus: float | None = None  # fractional CPU limit (the CLI's --cpus); wins over vcpus
    # The caller's context (planner.CallerContext; the CLI sends it): its variables that
    # change a plan (context.CONTEXT_ENV_KEYS) and its user config file. None: the
    # daemon's own context (HTTP callers).
    caller_env: dict[str, str] | None = None
    user_config: str | None = None
    # Egress policy entries on top of the project's [network] lists (egress_policy).
    allow_hosts: list[str] = field(default_factory=list)
    deny_hosts: list[str] = field(default_factory=list)
    add_hosts: list[str] = field(default_factory=list)
    # Stored secrets' names (secrets_store): placeholders in the sandbox, values at its gate.
    secrets: list[str] = field(default_factory=list)
    # An AI coding agent of the registry (agents/registry.toml): its install, variables,
    # API hosts and stored key come with it (planner.with_agent).
    agent: str | None = None
    # From the MCP tools: no registry on a non-public address unless the caller's settings
    # name it (planner.RunRequest.registry_public_only).
    registry_public_only: bool = False


@dataclass
class SandboxInfo:
    name: str
    uuid: str
    status: SandboxStatus
    backend: str
    isolation: str
    image: str
    profile: str
    vcpus: int | None
    memory_mb: int | None
    created_at: str  # RFC 3339, UTC
    expires_at: str | None = None
    # What backs the root: "image REF (digest)", or the host's userland when the image
    # could not be had (offline_fallback = "host"). Ours, not in the SDKs' JSON.
    rootfs: str = ""
    agent: str | None = None  # the agent it was created for (`create --agent`)


@dataclass
class ExecRequest:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    timeout: float | None = None
    sudo: bool = False  # run as root inside (the default user already is root today)
    stdin: bytes | None = None


@dataclass
class ExecResult:
    exit_code: int  # shell-style: 128+N for a signal, 124 timeout, 137 OOM
    stdout: bytes
    stderr: bytes
    signal: int | None = None
    timed_out: bool = False
    oom_killed: bool = False
    message: str | None = None  # why the sandbox, not the command, ended it
    # The collected stdout/stderr stopped at the output cap (the command ran to its end).
    truncated: bool = False
    egress: list[str] = field(default_factory=list)  # a one-shot run's refusals, as lines


@dataclass
class RunRequest:
    """A one-shot run: a fresh sandbox (from the warm pool when one is ready), then gone."""

    argv: list[str]
    image: str | None = None
    profile: str | None = None
    backend: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    timeout: float | None = None
    cwd: str | None = None  # host project dir for /workspace; None: no project dir
    # Additions for the CLI's `run` through the daemon (same meaning as its flags):
    no_network: bool = False
    memory_mb: int | None = None  # profiles.UNLIMITED (0): no cap
    pids: int | None = None  # likewise
    cpus: float | None = None
    config_path: str | None = None  # an explicit --config (absolute)
    # The caller's context, as in CreateRequest; None: the daemon's own (HTTP callers).
    caller_env: dict[str, str] | None = None
    user_config: str | None = None
    data_dir: str | None = None  # the caller's data dir: a daemon with another one refuses
    # `run --agent` (planner.with_agent): the agent, the variable its key is in and that
    # key's value (for the gate of the sandbox the run takes only: never planned, stored
    # or shown), where the project is shown, and the run's egress flags.
    agent: str | None = None
    agent_key: str | None = None
    agent_key_value: str | None = field(default=None, repr=False)
    workspace_at: str | None = None
    agent_settings: bool = False  # --settings: the caller's instructions and skills, copied
    allow_hosts: list[str] = field(default_factory=list)
    deny_hosts: list[str] = field(default_factory=list)
    add_hosts: list[str] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)
    registry_public_only: bool = False  # as CreateRequest's


@dataclass
class DetachedInfo:
    id: str
    sandbox: str
    command: list[str]
    pid: int
    status: Literal["running", "completed", "failed"]
    started_at: str
    exit_code: int | None = None
    truncated: bool = False  # its log reached the cap; later output was dropped


@dataclass
class SnapshotInfo:
    name: str
    sandbox: str
    image_tag: str
    backend: str
    created_at: str
    base_image: str | None = None
    vcpus: int | None = None
    memory_mb: int | None = None


@dataclass
class BackendInfo:
    backend: str
    configured: bool
    usable: bool
    readiness_reason: str
    isolation: str
    capabilities: dict[str, bool]


@dataclass
class PoolKeyStatus:
    image: str
    profile: str
    backend: str
    warm: int
    in_use: int
    min: int
    max: int
    workspace: str | None = None  # ad-hoc keys: the project dir they mount
    starting: int = 0
    last_error: str | None = None
    hits: int = 0  # runs served warm since the key was made
    misses: int = 0  # runs that found no warm sandbox and started one themselves
    waited: int = 0  # of the hits: runs that waited for a start under way
    late: int = 0  # of the misses: runs that waited for a start, then started their own
    target: int = 0  # warm sandboxes the key aims for now (from its recent takes/s)
    rate: float = 0.0  # takes/s, recent average
    start_ms: float = 0.0  # how long a start takes, recent average
    memory_kib: int = 0  # one warm sandbox, measured (0: not yet)


class SandboxService(Protocol):
    """What the daemon can do. Thread-safe: HTTP and socket requests call it concurrently."""

    # persistent sandboxes
    def create(self, req: CreateRequest) -> SandboxInfo: ...
    def get(self, name: str) -> SandboxInfo: ...  # NotFound
    def get_by_uuid(self, uuid: str) -> SandboxInfo: ...
    def list_sandboxes(self) -> list[SandboxInfo]: ...
    def start(self, name: str) -> SandboxInfo: ...
    def stop(self, name: str) -> SandboxInfo: ...  # keeps the filesystem
    def remove(self, name: str) -> None: ...  # deletes everything
    def extend(self, name: str, seconds: float) -> str | None: ...  # new expires_at

    # commands
    # Collected output stops at max_output bytes (default: the daemon's max_output_bytes)
    # and the result says `truncated`. on_output is called from the thread that reads the
    # command: while it blocks, the command is paused (back-pressure), nothing piles up.
    def exec(self, name: str, req: ExecRequest, on_output: OnOutput | None = None, *,
             max_output: int | None = None) -> ExecResult: ...
    def run(self, req: RunRequest, on_output: OnOutput | None = None, *,
            max_output: int | None = None) -> ExecResult: ...
    def exec_detached(self, name: str, req: ExecRequest) -> DetachedInfo: ...
    def detached_list(self, name: str) -> list[DetachedInfo]: ...
    def detached_status(self, name: str, cmd_id: str) -> DetachedInfo: ...
    def detached_logs(self, name: str, cmd_id: str, *, max_bytes: int | None = None
                      ) -> tuple[bytes, bytes]: ...
    def detached_kill(self, name: str, cmd_id: str) -> None: ...
    def logs(self, name: str) -> list[dict[str, object]]: ...  # audit entries
    # Its egress decisions from the host's audit log (egress_audit), newest last.
    def egress_log(self, name: str) -> list[dict[str, object]]: ...

    # files (paths inside the sandbox, validated with names.validate_sandbox_path)
    # Regular files only (devices, FIFOs, sockets are refused by the agent); a file over
    # max_bytes (default: the daemon's max_file_read_bytes) is refused with TooLarge.
    def read_file(self, name: str, path: str, *, max_bytes: int | None = None) -> bytes: ...
    def write_file(self, name: str, path: str, data: bytes, mode: int = 0o644) -> int: ...
    def delete_file(self, name: str, path: str) -> None: ...

    # snapshots (where the backend can keep a sandbox's filesystem)
    def snapshot(self, name: str, snapshot_name: str | None = None) -> SnapshotInfo: ...
    def snapshots(self) -> list[SnapshotInfo]: ...
    def get_snapshot(self, snapshot_name: str) -> SnapshotInfo: ...
    def delete_snapshot(self, snapshot_name: str) -> None: ...
    def restore_snapshot(self, snapshot_name: str) -> SandboxInfo: ...

    # the host
    def backends(self) -> list[BackendInfo]: ...
    def pool_status(self) -> list[PoolKeyStatus]: ...


def iter_output(
    call: Callable[[OnOutput], ExecResult],
) -> Iterator[tuple[OutputKind, bytes] | ExecResult]:
    """Turn a callback-style exec/run into an iterator (for SSE), on a worker thread.

    The queue between them is bounded: a consumer that stops iterating pauses the command.
    """
    import queue
    import threading

    q: queue.Queue[tuple[OutputKind, bytes] | ExecResult | BaseException] = queue.Queue(16)

    def work() -> None:
        try:
            q.put(call(lambda kind, data: q.put((kind, data))))
        except BaseException as exc:
            q.put(exc)

    threading.Thread(target=work, daemon=True).start()
    while True:
        item = q.get()
        if isinstance(item, BaseException):
            raise item
        yield item
        if isinstance(item, ExecResult):
            return


def to_json(value: Any) -> Any:
    """Records (dataclasses, named tuples), bytes (as latin-1 text), tuples into JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return {k: to_json(v) for k, v in value._asdict().items()}
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    return value
