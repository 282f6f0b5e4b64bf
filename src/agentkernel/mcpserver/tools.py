"""The MCP tools (names as the original's: `sandbox_run`, ...), on the official SDK's MCPServer.

Every input has a schema with limits; every tool answers with structured content (its
output schema) plus a text rendering; anything that goes wrong is a tool error
(`is_error`), never a protocol error; long commands report progress about every second.
The sandbox service is reached through `ops` (ops.py), made on the first tool call: a
server that is only listed, or never used, starts no daemon and imports none of it.
"""

# No `from __future__ import annotations`: the SDK reads these signatures at runtime.

import base64
import binascii
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import anyio
import anyio.to_thread
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from .. import __version__
from ..errors import AgentKernelError, NotFound
from ..names import MAX_NAME_LEN, validate_sandbox_name, validate_sandbox_path
from .ops import Output, SandboxOps

KIB = 1024
MIB = 1024 * KIB
NAME_PATTERN = r"^[A-Za-z0-9]+([-_][A-Za-z0-9]+)*$"  # names.validate_sandbox_name's rule
ENV_KEY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
WORKSPACE = "/workspace"  # where a sandbox sees the project
PROGRESS_EVERY = 1.0  # seconds between progress notifications of a running command
MAX_CONCURRENT_COMMANDS = 16  # per server process: each holds a worker thread
# An MCP client is an agent, trusted less than the user: the image it names is pulled from
# no loopback, private or link-local address the user's settings do not name (a registry
# "on" 127.0.0.1:PORT would point the host's pulls at any local service).
AGENTS_IMAGE: dict[str, Any] = {"registry_public_only": True}

T = TypeVar("T")

# ---------------------------------------------------------------- input types

Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_LEN, pattern=NAME_PATTERN,
                            description="sandbox name: letters, digits, single - or _ "
                                        "between them")]
Command = Annotated[list[Annotated[str, Field(max_length=64 * KIB)]],
                    Field(min_length=1, max_length=1024,
                          description='argv list, e.g. ["python3", "-c", "print(1)"]; for '
                                      'pipes or && use ["sh", "-c", "..."]')]
Env = Annotated[dict[Annotated[str, Field(pattern=ENV_KEY_PATTERN, max_length=256)],
                     Annotated[str, Field(max_length=64 * KIB)]],
                Field(max_length=256, description="environment variables for the command")]
Cwd = Annotated[str, Field(min_length=1, max_length=4096,
                           description=f"working directory inside the sandbox; relative "
                                       f"paths are under {WORKSPACE} (the project)")]
Timeout = Annotated[float, Field(ge=1, le=3600,
                                 description="kill the command after this many seconds "
                                             "(exit code 124, timed_out true)")]
Stdin = Annotated[str, Field(max_length=1 * MIB, description="text given to the command's "
                                                             "standard input")]
MaxOutput = Annotated[int, Field(ge=1 * KIB, le=4 * MIB,
                                 description="bytes kept of each of stdout and stderr (the "
                                             "last ones; truncated says if any were dropped)")]
Image = Annotated[str, Field(min_length=1, max_length=256,
                             description="OCI image (e.g. python:3.12-alpine) or host; "
                                         "default: detected from the project")]
Profile = Annotated[Literal["permissive", "moderate", "restrictive"],
                    Field(description="security profile; moderate (default): public egress "
                                      "only, copy-on-write project; restrictive: no network, "
                                      "read-only project; permissive: host network, "
                                      "writable project")]
SandboxPath = Annotated[str, Field(min_length=1, max_length=4096,
                                   description="absolute path inside the sandbox")]

# ---------------------------------------------------------------- output types


class RunOutput(BaseModel):
    exit_code: int = Field(description="the command's exit status; 124 timeout, 128+N "
                                       "signal N, 126/127 could not start")
    stdout: str
    stderr: str
    truncated: bool = Field(description="output beyond max_output_bytes was dropped")
    timed_out: bool
    signal: int | None = None
    message: str | None = Field(None, description="why the sandbox, not the command, "
                                                  "ended it")
    duration_ms: int
    sandbox: str | None = None
    backend: str | None = None
    image: str | None = None
    profile: str | None = None


class SandboxOut(BaseModel):
    name: str
    status: str
    backend: str
    image: str
    profile: str | None = None
    created_at: str | None = None
    expires_at: str | None = None


class CreateOutput(SandboxOut):
    isolation: str | None = None
    memory_mb: int | None = None
    project: str | None = Field(None, description=f"host dir shown at {WORKSPACE}")


class ListOutput(BaseModel):
    sandboxes: list[SandboxOut]


class StateOutput(BaseModel):
    name: str
    status: str


class RemoveOutput(BaseModel):
    name: str
    removed: bool = Field(description="false: there was no such sandbox")


class WriteOutput(BaseModel):
    path: str
    bytes: int


class ReadOutput(BaseModel):
    path: str
    content: str
    encoding: Literal["utf8", "base64"]
    size: int


class EgressEntry(BaseModel):
    time: float
    kind: str  # dns, tcp, tls, http, close, policy, note
    host: str | None = None
    port: int | None = None
    allowed: bool | None = None
    rule: str | None = None
    line: str  # as `agentkernel egress NAME log` prints it


class EgressLogOutput(BaseModel):
    name: str
    entries: list[EgressEntry]
    dropped: int  # older entries not returned (max_entries)


class AgentOut(BaseModel):
    id: str
    name: str
    installed: bool
    version: str | None
    path: str | None
    auth: str = Field(description="env:VAR, oauth:~/file or missing (names only, no values)")
    mcp: str = Field(description="scopes whose config has agentkernel's MCP server")
    plugin: str


class AgentsOutput(BaseModel):
    agents: list[AgentOut]


# ---------------------------------------------------------------- helpers


def _result(model: BaseModel, text: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text)],
                          structured_content=model.model_dump(mode="json"))


async def _blocking(fn: Callable[[], T]) -> T:
    """A service call on a worker thread; our errors become tool errors."""
    return await _mapped(anyio.to_thread.run_sync(fn))


async def _mapped(work: Awaitable[T]) -> T:
    """`work` awaited; our errors become tool errors."""
    try:
        return await work
    except AgentKernelError as exc:
        raise ToolError(exc.message) from None
    except OSError as exc:
        raise ToolError(f"{type(exc).__name__}: {exc.strerror or exc}") from None


def _check_name(name: str) -> str:
    try:
        return validate_sandbox_name(name)
    except AgentKernelError as exc:
        raise ToolError(exc.message) from None


def _check_path(path: str) -> str:
    try:
        return validate_sandbox_path(path)
    except AgentKernelError as exc:
        raise ToolError(exc.message) from None


def _workdir(cwd: str | None) -> str | None:
    if not cwd:
        return None
    return _check_path(cwd if cwd.startswith("/") else f"{WORKSPACE}/{cwd}")


def _env(env: dict[str, str] | None) -> dict[str, str]:
    for key, value in (env or {}).items():
        if "\x00" in value or "=" in key:
            raise ToolError(f"environment variable {key[:64]!r} is malformed")
    return dict(env or {})


def _render_run(out: RunOutput) -> str:
    head = f"exit code {out.exit_code}"
    if out.timed_out:
        head += " (timed out)"
    where = ", ".join(x for x in (out.sandbox and f"sandbox {out.sandbox}",
                                  out.backend and f"backend {out.backend}",
                                  f"{out.duration_ms} ms") if x)
    lines = [f"{head}; {where}"]
    if out.message:
        lines.append(out.message)
    if out.truncated:
        lines.append("(output truncated: only the last bytes of each stream are kept)")
    lines += ["--- stdout ---", out.stdout.rstrip("\n"), "--- stderr ---",
              out.stderr.rstrip("\n")]
    return "\n".join(lines)


def _sandbox_out(row: dict[str, Any]) -> SandboxOut:
    return SandboxOut(name=str(row.get("name")), status=str(row.get("status")),
                      backend=str(row.get("backend")), image=str(row.get("image")),
                      profile=row.get("profile"), created_at=row.get("created_at"),
                      expires_at=row.get("expires_at"))


# ---------------------------------------------------------------- the server


class Tools:
    """The tools' shared state: how to reach the service, the project, the bounds."""

    def __init__(self, ops_factory: Callable[[], SandboxOps], project: Path | None,
                 extra_run_fields: Callable[[], dict[str, Any]] | None = None) -> None:
        self._ops_factory = ops_factory
        self._ops: SandboxOps | None = None
        self.project = project
        self.extra_run_fields = extra_run_fields or dict
        self.limiter = anyio.CapacityLimiter(MAX_CONCURRENT_COMMANDS)

    @property
    def ops(self) -> SandboxOps:
        if self._ops is None:
            self._ops = self._ops_factory()
        return self._ops

    async def command(self, ctx: Context, start: Callable[[Output], Awaitable[dict[str, Any]]],
                      max_output: int) -> CallToolResult:
        """Run a command to its end with progress notifications; cancelled (or its client
        gone), the command goes too: `start`'s coroutine is cancelled (ops.py)."""
        out = Output(max_output)
        started = time.monotonic()
        box: dict[str, Any] = {}

        async def work() -> None:
            try:
                box["result"] = await _mapped(start(out))
            except Exception as exc:  # raised below, not wrapped in the task group's
                box["error"] = exc
            finally:
                done.set()

        done = anyio.Event()
        async with self.limiter, anyio.create_task_group() as tg:
            tg.start_soon(work)
            tick = 0
            await ctx.report_progress(tick, None, "started")
            while not done.is_set():
                with anyio.move_on_after(PROGRESS_EVERY):
                    await done.wait()
                if not done.is_set():
                    tick += 1
                    await ctx.report_progress(
                        tick, None, f"running for {time.monotonic() - started:.0f} s, "
                                    f"{out.total} bytes of output")
        if "error" in box:
            raise box["error"]
        result = box["result"]
        info = result.get("info") or {}
        model = RunOutput(
            exit_code=int(result.get("exit_code", 125)), stdout=out.text(1),
            stderr=out.text(2), truncated=out.truncated,
            timed_out=bool(result.get("timed_out")), signal=result.get("signal"),
            message=result.get("message"),
            duration_ms=int((time.monotonic() - started) * 1000),
            sandbox=info.get("sandbox"), backend=info.get("backend"),
            image=info.get("image"), profile=info.get("profile"))
        return _result(model, _render_run(model))


def build_server(ops_factory: Callable[[], SandboxOps], project: Path | None = None,
                 extra_run_fields: Callable[[], dict[str, Any]] | None = None) -> MCPServer:
    """The MCP server over `ops_factory()`'s service; `project` is shown at /workspace."""
    server = MCPServer(
        "agentkernel", version=__version__, log_level="WARNING",
        instructions="Run commands and untrusted code in isolated agentkernel sandboxes. "
                     "sandbox_run runs one command in a fresh sandbox; sandbox_create, "
                     "sandbox_exec and the file tools work with a named one that keeps its "
                     "files. The project is visible at /workspace.")
    tools = Tools(ops_factory, project, extra_run_fields)
    _add_command_tools(server, tools)
    _add_lifecycle_tools(server, tools)
    _add_file_tools(server, tools)
    _add_agent_tools(server)
    _add_egress_tools(server)
    return server


def _add_command_tools(server: MCPServer, tools: Tools) -> None:
    @server.tool(title="Run a command in a fresh sandbox", annotations=ToolAnnotations(
        read_only_hint=False, destructive_hint=False, idempotent_hint=False,
        open_world_hint=True))
    async def sandbox_run(
        command: Command, ctx: Context, image: Image | None = None,
        profile: Profile | None = None,
        network: Annotated[bool | None, Field(description="false: no network at all; "
                                                          "default: the profile's")] = None,
        cwd: Cwd | None = None, env: Env | None = None, timeout_s: Timeout = 120,
        stdin: Stdin | None = None, max_output_bytes: MaxOutput = 256 * KIB,
    ) -> Annotated[CallToolResult, RunOutput]:
        """Run one command in a fresh, isolated sandbox that is removed afterwards. The
        project directory is at /workspace (copy-on-write under the default profile)."""
        req: dict[str, Any] = {
            "argv": list(command), "image": image, "profile": profile,
            "env": _env(env), "workdir": _workdir(cwd), "timeout": float(timeout_s),
            "cwd": str(tools.project) if tools.project else None,
            "no_network": network is False, **tools.extra_run_fields(), **AGENTS_IMAGE}
        data = stdin.encode() if stdin is not None else None
        return await tools.command(
            ctx, lambda out: tools.ops.run(req, out, data), max_output_bytes)

    @server.tool(title="Run a command in a named sandbox", annotations=ToolAnnotations(
        read_only_hint=False, destructive_hint=False, idempotent_hint=False,
        open_world_hint=True))
    async def sandbox_exec(
        name: Name, command: Command, ctx: Context, cwd: Cwd | None = None,
        env: Env | None = None, timeout_s: Timeout = 120, stdin: Stdin | None = None,
        max_output_bytes: MaxOutput = 256 * KIB,
    ) -> Annotated[CallToolResult, RunOutput]:
        """Run a command in a sandbox made with sandbox_create (its files persist)."""
        name = _check_name(name)
        req: dict[str, Any] = {"argv": list(command), "env": _env(env),
                               "workdir": _workdir(cwd), "timeout": float(timeout_s)}
        data = stdin.encode() if stdin is not None else None
        return await tools.command(
            ctx, lambda out: tools.ops.exec(name, req, out, data), max_output_bytes)


def _add_lifecycle_tools(server: MCPServer, tools: Tools) -> None:
    @server.tool(title="Create a named sandbox", annotations=ToolAnnotations(
        read_only_hint=False, destructive_hint=False, idempotent_hint=False,
        open_world_hint=False))
    async def sandbox_create(
        name: Name, image: Image | None = None, profile: Profile | None = None,
        mount_project: Annotated[bool, Field(description=f"show the project at "
                                                         f"{WORKSPACE}")] = True,
        env: Env | None = None,
        ttl_s: Annotated[float | None, Field(ge=60, le=30 * 86400,
                                             description="remove it after this many "
                                                         "seconds")] = None,
    ) -> Annotated[CallToolResult, CreateOutput]:
        """Create and start a sandbox that keeps its files until sandbox_remove."""
        name = _check_name(name)
        project = str(tools.project) if mount_project and tools.project else None
        req = {"name": name, "image": image, "profile": profile, "env": _env(env),
               "workdir_source": project, "ttl_seconds": ttl_s, **AGENTS_IMAGE}
        info = await _blocking(lambda: tools.ops.create(req))
        model = CreateOutput(**_sandbox_out(info).model_dump(),
                             isolation=info.get("isolation"), memory_mb=info.get("memory_mb"),
                             project=project)
        return _result(model, f"sandbox {name} created: {model.status}, backend "
                              f"{model.backend} ({model.isolation}), image {model.image}, "
                              f"profile {model.profile}"
                              + (f", project {project} at {WORKSPACE}" if project else ""))

    @server.tool(title="List sandboxes", annotations=ToolAnnotations(
        read_only_hint=True, destructive_hint=False, idempotent_hint=True,
        open_world_hint=False))
    async def sandbox_list() -> Annotated[CallToolResult, ListOutput]:
        """The named sandboxes and their state."""
        rows = await _blocking(tools.ops.list)
        model = ListOutput(sandboxes=[_sandbox_out(r) for r in rows])
        text = "\n".join(f"{s.name}\t{s.status}\t{s.backend}\t{s.image}"
                         for s in model.sandboxes) or "no sandboxes"
        return _result(model, text)

    @server.tool(title="Remove a sandbox", annotations=ToolAnnotations(
        read_only_hint=False, destructive_hint=True, idempotent_hint=True,
        open_world_hint=False))
    async def sandbox_remove(name: Name) -> Annotated[CallToolResult, RemoveOutput]:
        """Remove a sandbox and everything it stored."""
        name = _check_name(name)

        def remove() -> bool:
            try:
                tools.ops.lifecycle("remove", name)
            except NotFound:
                return False
            except AgentKernelError as exc:
                if getattr(exc, "kind", "") == "NotFound":
                    return False
                raise
            return True

        removed = await _blocking(remove)
        return _result(RemoveOutput(name=name, removed=removed),
                       f"sandbox {name} {'removed' if removed else 'did not exist'}")

    for op, done, doc in (("start", "started", "Start a stopped sandbox (its files are kept)."),
                          ("stop", "stopped", "Stop a sandbox, keeping its files.")):
        _add_state_tool(server, tools, op, done, doc)


def _add_state_tool(server: MCPServer, tools: Tools, op: str, done: str, doc: str) -> None:
    async def state_tool(name: Name) -> Annotated[CallToolResult, StateOutput]:
        name = _check_name(name)
        info = await _blocking(lambda: tools.ops.lifecycle(op, name))
        status = str((info or {}).get("status", done))
        return _result(StateOutput(name=name, status=status), f"sandbox {name}: {status}")

    server.add_tool(state_tool, name=f"sandbox_{op}", title=f"{op.title()} a sandbox",
                    description=doc, annotations=ToolAnnotations(
                        read_only_hint=False, destructive_hint=False, idempotent_hint=True,
                        open_world_hint=False))


def _add_file_tools(server: MCPServer, tools: Tools) -> None:
    @server.tool(title="Write a file into a sandbox", annotations=ToolAnnotations(
        read_only_hint=False, destructive_hint=True, idempotent_hint=True,
        open_world_hint=False))
    async def sandbox_file_write(
        name: Name, path: SandboxPath,
        content: Annotated[str, Field(max_length=12 * MIB, description="the file's content "
                                                                        "(at most 8 MiB)")],
        encoding: Literal["utf8", "base64"] = "utf8",
        mode: Annotated[str, Field(pattern=r"^0?[0-7]{3}$",
                                   description="permission bits, octal")] = "0644",
    ) -> Annotated[CallToolResult, WriteOutput]:
        """Write (or overwrite) a file in a named sandbox; parent dirs are created."""
        name = _check_name(name)
        path = _check_path(path)
        if encoding == "base64":
            try:
                data = base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError):
                raise ToolError("content is not valid base64") from None
        else:
            data = content.encode()
        if len(data) > 8 * MIB:
            raise ToolError(f"content is {len(data)} bytes (at most {8 * MIB})")
        size = await _blocking(lambda: tools.ops.write_file(name, path, data, int(mode, 8)))
        return _result(WriteOutput(path=path, bytes=size), f"wrote {size} bytes to {path}")

    @server.tool(title="Read a file from a sandbox", annotations=ToolAnnotations(
        read_only_hint=True, destructive_hint=False, idempotent_hint=True,
        open_world_hint=False))
    async def sandbox_file_read(
        name: Name, path: SandboxPath,
        max_bytes: Annotated[int, Field(ge=1, le=8 * MIB, description="refuse files larger "
                                                                      "than this")] = 1 * MIB,
    ) -> Annotated[CallToolResult, ReadOutput]:
        """Read a regular file from a named sandbox (text as utf8, anything else base64)."""
        name = _check_name(name)
        path = _check_path(path)
        data = await _blocking(lambda: tools.ops.read_file(name, path, max_bytes))
        try:
            content, encoding = data.decode("utf-8"), "utf8"
        except UnicodeDecodeError:
            content, encoding = base64.b64encode(data).decode(), "base64"
        model = ReadOutput(path=path, content=content, encoding=encoding,  # type: ignore[arg-type]
                           size=len(data))
        text = content if encoding == "utf8" else f"[binary file, {len(data)} bytes, " \
                                                  f"base64]\n{content}"
        return _result(model, text)


def _add_agent_tools(server: MCPServer) -> None:
    @server.tool(title="List AI coding agents on the host", annotations=ToolAnnotations(
        read_only_hint=True, destructive_hint=False, idempotent_hint=True,
        open_world_hint=False))
    async def agents_list() -> Annotated[CallToolResult, AgentsOutput]:
        """The coding agents agentkernel knows: installed or not, version, how they would
        authenticate (variable or file names only), and whether agentkernel is wired in."""
        from ..agents.status import all_status

        rows = await _blocking(all_status)
        model = AgentsOutput(agents=[AgentOut(
            id=r.id, name=r.name, installed=r.path is not None, version=r.version,
            path=r.path, auth=r.auth, mcp=r.mcp, plugin=r.plugin) for r in rows])
        text = "\n".join(f"{a.id}\t{a.version or 'not installed'}\t{a.auth}\tmcp={a.mcp}"
                         for a in model.agents)
        return _result(model, text)


def _add_egress_tools(server: MCPServer) -> None:
    @server.tool(title="A sandbox's egress log", annotations=ToolAnnotations(
        read_only_hint=True, destructive_hint=False, idempotent_hint=True,
        open_world_hint=False))
    async def sandbox_egress_log(
        name: Name,
        max_entries: Annotated[int, Field(ge=1, le=1000, description="the newest this many")]
        = 200,
    ) -> Annotated[CallToolResult, EgressLogOutput]:
        """What a running sandbox's network tried, and whether its egress policy allowed it
        and by which rule (names, addresses, ports; never bodies or secret values)."""
        name = _check_name(name)
        docs = await _blocking(lambda: _egress_docs(name))
        kept = docs[-max_entries:]
        model = EgressLogOutput(name=name, entries=[_egress_entry(d) for d in kept],
                                dropped=len(docs) - len(kept))
        text = "\n".join(e.line for e in model.entries) or "(no egress yet)"
        return _result(model, text)


def _egress_docs(name: str) -> list[dict[str, object]]:
    """The gate's log of sandbox `name` (bounded by the gate: it starts over past 2 MiB)."""
    from ..egress_gate import read_log, scratch_of

    docs, _offset = read_log(scratch_of(name))
    return docs


def _egress_entry(doc: dict[str, object]) -> EgressEntry:
    from ..egress_gate import format_entry

    def text(key: str) -> str | None:
        value = doc.get(key)
        return str(value)[:300] if value is not None else None

    port = doc.get("port")
    allowed = doc.get("allowed")
    return EgressEntry(
        time=float(str(doc.get("t", 0))), kind=str(doc.get("kind", "note"))[:20],
        host=text("host") or text("addr"), port=port if isinstance(port, int) else None,
        allowed=allowed if isinstance(allowed, bool) else None, rule=text("rule"),
        line=format_entry(doc)[:500])
