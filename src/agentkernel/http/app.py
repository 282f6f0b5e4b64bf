"""The FastAPI application: every route of the SDK contract, served over a `SandboxService`."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..daemon.api import (
    BackendInfo,
    CreateRequest,
    DetachedInfo,
    ExecRequest,
    ExecResult,
    OnOutput,
    RunRequest,
    SandboxInfo,
    SnapshotInfo,
)
from ..errors import AgentKernelError, UsageError
from ..names import validate_sandbox_name, validate_sandbox_path
from . import models as m
from .commands import (
    ClientGone,
    CommandService,
    Job,
    Pipe,
    capped_job,
    file_pieces,
    read_file_capped,
    result_dict,
    result_pieces,
    run_cancellable,
    sse,
    stream_events,
)
from .fastrun import FastRun, run_request
from .guards import DEFAULT_MAX_BODY, AuthMiddleware, BodyLimitMiddleware, HostGuard
from .limits import Limits
from .parsing import (
    check_argv,
    check_backend,
    check_image,
    check_profile,
    check_workdir,
    parse_duration,
    parse_env,
)

log = logging.getLogger("agentkernel.http")

KEEPALIVE_SECONDS = 10.0
BATCH_WORKERS = 8
THREADS = 256  # blocking service calls (a long exec holds one) run on this many threads
CAPABILITY_KEYS = tuple(m.CapabilitiesOut.model_fields)
UNIMPLEMENTED = ("/orchestrations", "/objects", "/schedules", "/stores")

_ERR: dict[int | str, dict[str, Any]] = {
    code: {"model": m.ErrorEnvelope, "description": text}
    for code, text in (
        (400, "invalid input (name, path, body)"),
        (401, "missing or wrong API key"),
        (403, "a cross-origin request (an Origin that is not an allowed host)"),
        (404, "unknown sandbox, file, command, snapshot or route"),
        (409, "the sandbox or snapshot exists already, or is in the wrong state"),
        (413, "request body too large, or a file over max_file_bytes"),
        (421, "a Host header that is neither a loopback name nor an allowed host"),
    )
}


def _doc(model: Any, name: str, *codes: int) -> dict[str, Any]:
    """Route options for the OpenAPI document: the success envelope and the error ones."""
    responses = {c: _ERR[c] for c in (400, 401, 403, 404, 413, 421, *codes)}
    return {"response_model": m.envelope_of(model, name), "responses": responses}


def ok(data: Any, status: int = 200) -> Response:
    body = json.dumps({"success": True, "data": data, "error": None}, default=str,
                      ensure_ascii=False, separators=(",", ":"))
    return Response(body.encode(), status_code=status, media_type="application/json")


def fail(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps({"success": False, "data": None, "error": message}, ensure_ascii=False)
    return Response(body.encode(), status_code=status, media_type="application/json",
                    headers=headers)


SEND_CHUNK = 64 * 1024  # bytes of encoded answer gathered before each send


def pieces_response(pieces: Iterator[bytes]) -> Response:
    """A JSON envelope sent as it is encoded (a big output is never held escaped).

    Small pieces are gathered up to SEND_CHUNK: an answer that fits goes out as one
    plain response, a bigger one as a stream of chunks (Starlette hands each item of a
    plain iterator to a worker thread: one hop per piece would cost more than the run).
    """
    first = _gather(pieces)
    if len(first) < SEND_CHUNK:
        return Response(bytes(first), media_type="application/json")

    def chunks() -> Iterator[bytes]:
        yield bytes(first)
        while chunk := _gather(pieces):
            yield bytes(chunk)

    return StreamingResponse(chunks(), media_type="application/json")


def _gather(pieces: Iterator[bytes]) -> bytearray:
    """The next pieces, joined, until SEND_CHUNK bytes or the end (bounded: one piece
    is at most a few times commands.CHUNK)."""
    buf = bytearray()
    for piece in pieces:
        buf += piece
        if len(buf) >= SEND_CHUNK:
            break
    return buf


def sandbox_json(info: SandboxInfo) -> dict[str, Any]:
    data = asdict(info)
    data.pop("rootfs")  # the SDKs' contract has no such field
    if data.get("agent") is None:
        data.pop("agent", None)  # ours, only on an agent's sandbox
    return data


def detached_json(info: DetachedInfo) -> dict[str, Any]:
    return asdict(info)


def snapshot_json(info: SnapshotInfo) -> dict[str, Any]:
    return asdict(info)


def backend_json(info: BackendInfo) -> dict[str, Any]:
    caps = {key: bool(info.capabilities.get(key, False)) for key in CAPABILITY_KEYS}
    return {"backend": info.backend, "configured": info.configured, "usable": info.usable,
            "readiness_reason": info.readiness_reason, "isolation": info.isolation,
            "capabilities": caps}


def default_backend(backends: list[BackendInfo]) -> str | None:
    from ..backends import by_strength

    usable = {b.backend for b in backends if b.usable and b.configured}
    for name in by_strength():  # as `auto`: strongest first
        if name in usable:
            return name
    return next(iter(sorted(usable)), None)


def _name(name: str) -> str:
    return validate_sandbox_name(name)


def _file_path(raw: str) -> str:
    # The SDKs append the path raw after /files/, so "/tmp/a" arrives as "/files//tmp/a":
    # prefixing "/" and collapsing empty segments gives the same path either way.
    if raw.strip("/") == "":
        raise UsageError("file path must not be empty")
    return validate_sandbox_path("/" + raw)


def _cmd_id(cmd_id: str) -> str:
    if not (0 < len(cmd_id) <= 128) or not all(c.isascii() and (c.isalnum() or c in "-_.")
                                               for c in cmd_id):
        raise UsageError(f"invalid command id {cmd_id[:40]!r}")
    return cmd_id


def _exec_request(body: m.ExecBody) -> ExecRequest:
    return ExecRequest(argv=check_argv(list(body.command)), env=parse_env(body.env),
                       workdir=check_workdir(body.workdir), sudo=bool(body.sudo),
                       timeout=body.timeout)


def _stream_error(exc: BaseException) -> bytes:
    if isinstance(exc, AgentKernelError):
        return sse("error", {"message": exc.message, "status": exc.http_status})
    log.error("run stream failed", exc_info=exc)
    return sse("error", {"message": f"internal error: {type(exc).__name__}", "status": 500})


def _strip_422(schema: dict[str, Any]) -> dict[str, Any]:
    """FastAPI documents 422 for validation errors; this API answers them with 400."""
    for item in schema.get("paths", {}).values():
        for op in item.values():
            if isinstance(op, dict):
                op.get("responses", {}).pop("422", None)
    schemas = schema.get("components", {}).get("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    return schema


def create_app(
    service: CommandService,
    *,
    api_key: str | None = None,
    allowed_hosts: frozenset[str] | None = None,
    limits: Limits | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    keepalive: float = KEEPALIVE_SECONDS,
) -> FastAPI:
    """The API over `service`. With `api_key`, every route but /health and /openapi.json
    needs `Authorization: Bearer <api_key>`. With `allowed_hosts` (TCP: always), only
    requests whose Host is a loopback name or one of them are served, and none with a
    foreign Origin."""

    from starlette.routing import Route

    from ..mcpserver.http import LazyMCP

    mcp_app = LazyMCP(service)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        import anyio
        import anyio.to_thread

        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        async with anyio.create_task_group() as tg:  # /mcp's session manager runs in it
            mcp_app.task_group = tg
            yield
            tg.cancel_scope.cancel()

    app = FastAPI(
        title="agentkernel", version=__version__, lifespan=lifespan,
        docs_url=None, redoc_url=None, openapi_url="/openapi.json",
        description="Run commands in isolated sandboxes. Every answer is the envelope "
                    '`{"success", "data", "error"}`; see docs/http-api.md.',
    )
    register_errors(app)
    add_routes(app, service, keepalive, limits or Limits())
    # MCP over streamable HTTP, behind the same guards as every route (mcpserver/http.py).
    app.router.routes.append(Route("/mcp", endpoint=mcp_app, methods=["GET", "POST",
                                                                      "DELETE"]))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "AGENTKERNEL_API_KEY, or the key `serve` "
                                          "stored in the data dir (api.key)"}}
            schema["security"] = [{"bearer": []}]
            schema["paths"]["/health"]["get"]["security"] = []
            app.openapi_schema = _strip_422(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    # POST /run's common case without FastAPI's layers (fastrun), inside every guard.
    app.add_middleware(FastRun, service=service, limits=limits or Limits())
    app.add_middleware(BodyLimitMiddleware, limit=max_body)
    if api_key:
        app.add_middleware(AuthMiddleware, api_key=api_key)
    if allowed_hosts is not None:
        app.add_middleware(HostGuard, allowed=allowed_hosts)  # the outermost: first to run
    return app


def register_errors(app: FastAPI) -> None:
    """Map every error to the envelope, in one place: our errors carry their HTTP status."""

    @app.exception_handler(AgentKernelError)
    async def agentkernel_error(_req: Request, exc: AgentKernelError) -> Response:
        if isinstance(exc, ClientGone):  # nobody reads this answer
            return fail(499, exc.message)
        if exc.http_status >= 500:
            log.warning("%s: %s", type(exc).__name__, exc.message)
        return fail(exc.http_status, exc.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(_req: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        if not errors:
            return fail(400, "invalid request")
        first = errors[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body",))
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return fail(400, f"{where or 'body'}: {first.get('msg', 'invalid')}{more}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(req: Request, exc: StarletteHTTPException) -> Response:
        status = exc.status_code
        if isinstance(exc.__cause__, AgentKernelError):  # e.g. the body limit, hit while
            cause = exc.__cause__                        # FastAPI was reading the body
            return fail(cause.http_status, cause.message)
        if isinstance(exc.__cause__, RecursionError):  # FastAPI's json.loads of `[[[[…`
            usage = UsageError("a request body must be JSON: it nests too deeply")
            return fail(usage.http_status, usage.message)
        if status == 404 and req.url.path.startswith(UNIMPLEMENTED):
            return fail(404, f"{req.url.path}: durable orchestrations, objects, schedules "
                             "and stores are not implemented by this server")
        if status == 404 and b"%2f" in req.scope.get("raw_path", b"").lower():
            # An id with an encoded '/' (Node's encodeURIComponent) is decoded before
            # routing and then matches nothing; no name or id may contain '/'.
            return fail(400, "a sandbox name, snapshot name or id cannot contain '/'")
        if status == 404:
            return fail(404, f"no route {req.method} {req.url.path}")
        if status == 405:
            return fail(405, f"method {req.method} not allowed on {req.url.path}",
                        headers=dict(exc.headers or {}))
        return fail(status if status >= 400 else 500, str(exc.detail))

    @app.exception_handler(Exception)
    async def crashed(_req: Request, exc: Exception) -> Response:
        log.error("unhandled error in a request", exc_info=exc)
        return fail(500, f"internal error: {type(exc).__name__}")


def add_routes(app: FastAPI, svc: CommandService, keepalive: float, limits: Limits) -> None:
    """Every route of docs/http-api.md. Plain handlers run on FastAPI's thread pool, as the
    service blocks; those that run commands are async, to cancel them when the client
    leaves, and keep at most `limits.max_output` bytes of output."""

    async def command(request: Request, opener: Any, close_stdin: bool) -> Response:
        job, cap = capped_job(opener, limits.max_output, close_stdin=close_stdin)
        res = await run_cancellable(request.receive, job.run, job.cancel)
        return pieces_response(result_pieces(res, cap))

    # -- health, one-shot runs --

    @app.get("/health", tags=["health"], **_doc(Literal["ok"], "HealthResponse"))
    async def health() -> Response:
        return ok("ok")

    @app.post("/run", tags=["run"], **_doc(m.RunOut, "RunResponse"))
    async def run(body: m.RunBody, request: Request) -> Response:
        req = run_request(body)
        return await command(request, lambda: svc.open_run(req), True)

    @app.post(
        "/run/stream", tags=["run"], response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {"schema": {
                             "type": "object", "description": "the JSON data of one event"}}},
                         "description": "named events: started, output (as produced), "
                                        "done, or error; `: keepalive` during silence"},
                   **{c: _ERR[c] for c in (400, 401, 413)}},
    )
    async def run_stream(body: m.RunBody) -> Response:
        req = run_request(body)  # input errors are a 400, before the stream starts
        fast = True if body.fast is None else body.fast
        started = sse("started", {"command": req.argv, "fast": fast,
                                  "timestamp": datetime.now(UTC).isoformat()})
        pipe = Pipe(asyncio.get_running_loop(), limits.stream_buffer)

        def job_for(on_output: OnOutput) -> Job:
            return Job(lambda: svc.open_run(req), on_output, close_stdin=True)

        return StreamingResponse(
            stream_events(job_for, pipe, started, keepalive, _stream_error),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/batch/run", tags=["run"], **_doc(m.BatchOut, "BatchRunResponse"))
    async def batch_run(body: m.BatchBody, request: Request) -> Response:
        reqs = [RunRequest(argv=check_argv(list(c.command))) for c in body.commands]
        share = max(4096, limits.max_output // max(1, len(reqs)))  # the batch's total cap
        jobs = [capped_job(partial(svc.open_run, req), share, close_stdin=True)
                for req in reqs]

        def one(job_cap: tuple[Job, Any]) -> dict[str, Any]:
            job, cap = job_cap
            try:
                res: ExecResult = job.run()
            except AgentKernelError as exc:
                return {"output": None, "error": exc.message, "success": False}
            return result_dict(res, cap) | {"error": None}

        def work() -> list[dict[str, Any]]:
            with ThreadPoolExecutor(min(BATCH_WORKERS, len(jobs))) as pool:
                return list(pool.map(one, jobs))

        def cancel() -> None:
            for job, _ in jobs:
                job.cancel()

        return ok({"results": await run_cancellable(request.receive, work, cancel)})

    # -- the host --

    @app.get("/backends", tags=["host"], **_doc(m.BackendsOut, "BackendsResponse"))
    def backends() -> Response:
        found = svc.backends()
        return ok({"default_backend": default_backend(found),
                   "backends": [backend_json(b) for b in found]})

    @app.get("/agents", tags=["host"], **_doc(m.AgentsOut, "AgentsResponse"))
    def agents() -> Response:
        """The AI coding agents a sandbox can be made for (POST /sandboxes `agent`)."""
        from ..agents.status import sandbox_agents

        return ok({"agents": sandbox_agents()})

    # -- sandboxes --

    @app.get("/sandboxes", tags=["sandboxes"], **_doc(list[m.SandboxOut], "SandboxListResponse"))
    def list_sandboxes() -> Response:
        return ok([sandbox_json(s) for s in svc.list_sandboxes()])

    @app.post("/sandboxes", status_code=201, tags=["sandboxes"],
              **_doc(m.SandboxOut, "SandboxResponse", 409))
    def create_sandbox(body: m.CreateBody) -> Response:
        unsupported = [key for key in ("volumes", "secrets", "secret_files", "source_url")
                       if getattr(body, key)]
        if unsupported:
            raise UsageError(f"not supported by this server: {', '.join(unsupported)}")
        req = CreateRequest(
            name=_name(body.name), image=check_image(body.image),
            profile=check_profile(body.profile), backend=check_backend(body.backend),
            vcpus=body.vcpus, memory_mb=body.memory_mb, env=parse_env(body.env),
            ttl_seconds=parse_duration(body.ttl) if body.ttl else None,
            agent=body.agent,  # checked by the planner (agents/registry: known ids only)
            allow_hosts=list(body.egress.allow) if body.egress else [],
            deny_hosts=list(body.egress.deny) if body.egress else [],
        )
        return ok(sandbox_json(svc.create(req)), 201)

    # Declared before /sandboxes/{name}, as the contract asks.
    @app.get("/sandboxes/by-uuid/{uuid}", tags=["sandboxes"],
             **_doc(m.SandboxOut, "SandboxResponse"))
    def get_by_uuid(uuid: str) -> Response:
        if not (0 < len(uuid) <= 64) or not all(c in "0123456789abcdefABCDEF-" for c in uuid):
            raise UsageError(f"invalid uuid {uuid[:40]!r}")
        return ok(sandbox_json(svc.get_by_uuid(uuid)))

    @app.get("/sandboxes/{name}", tags=["sandboxes"], **_doc(m.SandboxOut, "SandboxResponse"))
    def get_sandbox(name: str) -> Response:
        return ok(sandbox_json(svc.get(_name(name))))

    @app.delete("/sandboxes/{name}", tags=["sandboxes"], **_doc(str, "MessageResponse", 409))
    def remove_sandbox(name: str) -> Response:
        svc.remove(_name(name))
        return ok("Sandbox removed")

    @app.post("/sandboxes/{name}/start", tags=["sandboxes"],
              **_doc(m.SandboxOut, "SandboxResponse", 409))
    def start_sandbox(name: str) -> Response:
        return ok(sandbox_json(svc.start(_name(name))))

    @app.post("/sandboxes/{name}/stop", tags=["sandboxes"],
              **_doc(m.SandboxOut, "SandboxResponse", 409))
    def stop_sandbox(name: str) -> Response:
        return ok(sandbox_json(svc.stop(_name(name))))

    @app.post("/sandboxes/{name}/extend", tags=["sandboxes"],
              **_doc(m.ExtendOut, "ExtendResponse", 409))
    def extend(name: str, body: m.ExtendBody) -> Response:
        seconds = parse_duration(body.by)
        return ok({"expires_at": svc.extend(_name(name), seconds)})

    @app.get("/sandboxes/{name}/logs", tags=["sandboxes"],
             **_doc(list[dict[str, Any]], "LogsResponse"))
    def sandbox_logs(name: str) -> Response:
        return ok(svc.logs(_name(name)))

    @app.get("/sandboxes/{name}/egress", tags=["sandboxes"],
             **_doc(list[dict[str, Any]], "EgressLogResponse"))
    def sandbox_egress(name: str) -> Response:
        """Ours, beyond the SDKs: the sandbox's egress decisions from the host's audit log
        (time, host, port, allowed, rule, bytes; never bodies or secret values)."""
        return ok(svc.egress_log(_name(name)))

    # -- commands in a sandbox --

    @app.post("/sandboxes/{name}/exec", tags=["exec"], **_doc(m.RunOut, "RunResponse", 409))
    async def exec_in(name: str, body: m.ExecBody, request: Request) -> Response:
        req, sandbox = _exec_request(body), _name(name)
        return await command(request, lambda: svc.open_exec(sandbox, req), False)

    @app.post(
        "/sandboxes/{name}/exec/stream", tags=["exec"], response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {"schema": {
                             "type": "object", "description": "the JSON data of one event"}}},
                         "description": "as /run/stream: started, output, done or error "
                                        "(ours, beyond the SDKs' contract: e.g. an agent's "
                                        "headless run in its sandbox)"},
                   **{c: _ERR[c] for c in (400, 401, 413)}},
    )
    async def exec_stream(name: str, body: m.ExecBody) -> Response:
        req, sandbox = _exec_request(body), _name(name)  # a 400 before the stream starts
        started = sse("started", {"command": req.argv, "sandbox": sandbox,
                                  "timestamp": datetime.now(UTC).isoformat()})
        pipe = Pipe(asyncio.get_running_loop(), limits.stream_buffer)

        def job_for(on_output: OnOutput) -> Job:
            return Job(lambda: svc.open_exec(sandbox, req), on_output, close_stdin=True)

        return StreamingResponse(
            stream_events(job_for, pipe, started, keepalive, _stream_error),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/sandboxes/{name}/exec/detach", tags=["exec"],
              **_doc(m.DetachedOut, "DetachedResponse", 409))
    def exec_detached(name: str, body: m.ExecBody) -> Response:
        req = _exec_request(body)
        return ok(detached_json(svc.exec_detached(_name(name), req)))

    @app.get("/sandboxes/{name}/exec/detached", tags=["exec"],
             **_doc(list[m.DetachedOut], "DetachedListResponse"))
    def detached_list(name: str) -> Response:
        return ok([detached_json(d) for d in svc.detached_list(_name(name))])

    @app.get("/sandboxes/{name}/exec/detached/{cmd_id}", tags=["exec"],
             **_doc(m.DetachedOut, "DetachedResponse"))
    def detached_status(name: str, cmd_id: str) -> Response:
        return ok(detached_json(svc.detached_status(_name(name), _cmd_id(cmd_id))))

    @app.get("/sandboxes/{name}/exec/detached/{cmd_id}/logs", tags=["exec"],
             **_doc(m.DetachedLogsOut, "DetachedLogsResponse"))
    def detached_logs(name: str, cmd_id: str,
                      stream: Literal["stdout", "stderr"] | None = Query(None)) -> Response:
        out, err = svc.detached_logs(_name(name), _cmd_id(cmd_id))
        if stream == "stderr":
            return ok({"stderr": err.decode("utf-8", "replace")})
        return ok({"stdout": out.decode("utf-8", "replace")})

    @app.delete("/sandboxes/{name}/exec/detached/{cmd_id}", tags=["exec"],
                **_doc(str, "MessageResponse"))
    def detached_kill(name: str, cmd_id: str) -> Response:
        svc.detached_kill(_name(name), _cmd_id(cmd_id))
        return ok("Command killed")

    # -- files --

    @app.post("/sandboxes/{name}/files", tags=["files"],
              **_doc(m.WrittenOut, "FilesWrittenResponse", 409))
    def write_files(name: str, body: m.FilesWriteBody) -> Response:
        sandbox = _name(name)
        files = [(validate_sandbox_path(p), c.encode("utf-8", "surrogatepass"))
                 for p, c in body.files.items()]  # every path is checked before any write
        for path, data in files:
            svc.write_file(sandbox, path, data)
        return ok({"written": len(files)})

    @app.get("/sandboxes/{name}/files/{path:path}", tags=["files"],
             **_doc(m.FileOut, "FileResponse"))
    async def read_file(name: str, path: str) -> Response:
        sandbox, where = _name(name), _file_path(path)
        data = await run_in_threadpool(read_file_capped, svc, sandbox, where, limits.max_file)
        return pieces_response(file_pieces(data))

    @app.put("/sandboxes/{name}/files/{path:path}", tags=["files"],
             **_doc(str, "MessageResponse", 409))
    def write_file(name: str, path: str, body: m.FileWriteBody) -> Response:
        sandbox, where = _name(name), _file_path(path)
        if body.encoding == "base64":
            try:
                data = base64.b64decode(body.content, validate=True)
            except (binascii.Error, ValueError):
                raise UsageError("content is not valid base64") from None
        else:
            data = body.content.encode("utf-8", "surrogatepass")
        size = svc.write_file(sandbox, where, data)
        return ok(f"Wrote {size} bytes to {where}")

    @app.delete("/sandboxes/{name}/files/{path:path}", tags=["files"],
                **_doc(str, "MessageResponse", 409))
    def delete_file(name: str, path: str) -> Response:
        sandbox, where = _name(name), _file_path(path)
        svc.delete_file(sandbox, where)
        return ok(f"Deleted {where}")

    # -- snapshots --

    @app.get("/snapshots", tags=["snapshots"],
             **_doc(list[m.SnapshotOut], "SnapshotListResponse"))
    def list_snapshots() -> Response:
        return ok([snapshot_json(s) for s in svc.snapshots()])

    @app.post("/snapshots", status_code=201, tags=["snapshots"],
              **_doc(m.SnapshotOut, "SnapshotResponse", 409))
    def take_snapshot(body: m.SnapshotBody) -> Response:
        snap = _name(body.name) if body.name else None
        return ok(snapshot_json(svc.snapshot(_name(body.sandbox), snap)), 201)

    @app.get("/snapshots/{snapshot}", tags=["snapshots"],
             **_doc(m.SnapshotOut, "SnapshotResponse"))
    def get_snapshot(snapshot: str) -> Response:
        return ok(snapshot_json(svc.get_snapshot(_name(snapshot))))

    @app.delete("/snapshots/{snapshot}", tags=["snapshots"], **_doc(str, "MessageResponse"))
    def delete_snapshot(snapshot: str) -> Response:
        svc.delete_snapshot(_name(snapshot))
        return ok("Snapshot deleted")

    @app.post("/snapshots/{snapshot}/restore", tags=["snapshots"],
              **_doc(m.SandboxOut, "SandboxResponse", 409))
    def restore_snapshot(snapshot: str) -> Response:
        return ok(sandbox_json(svc.restore_snapshot(_name(snapshot))))

