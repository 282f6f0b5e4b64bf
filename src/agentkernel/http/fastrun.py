"""`POST /run` served as a plain ASGI layer behind the guards, beside FastAPI's route of it.

A warm run costs a few milliseconds; FastAPI's routing, dependency solving and exception
layers added about one more per request. This layer answers the common case itself: a
JSON body that `RunBody` accepts, run as the route runs it (`capped_job`,
`run_cancellable`, the same envelope). Anything else (another path or method, another
content type, a body that does not validate) goes on to FastAPI with the body as it was
read, so every error answer and the OpenAPI document stay the route's own. It sits inside
HostGuard, AuthMiddleware and BodyLimitMiddleware: nothing reaches it unchecked.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

from pydantic import ValidationError

from ..daemon.api import RunRequest
from ..errors import AgentKernelError
from . import models as m
from .commands import ClientGone, CommandService, capped_job, result_pieces, run_cancellable
from .guards import ASGIApp, Message, Receive, Scope, Send, envelope_error, send_json
from .limits import Limits
from .parsing import (
    check_argv,
    check_backend,
    check_image,
    check_profile,
    check_workdir,
    parse_env,
)

log = logging.getLogger("agentkernel.http")
SEND_CHUNK = 64 * 1024  # as app.SEND_CHUNK: an answer under this goes out in one piece


class FastRun:
    """Serve `POST /run` without FastAPI's layers; hand everything else on."""

    def __init__(self, app: ASGIApp, service: CommandService, limits: Limits) -> None:
        self.app = app
        self.svc = service
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] != "POST"
                or scope["path"] != "/run" or not _json_body(scope)):
            await self.app(scope, receive, send)
            return
        try:
            body = await _read_body(receive)
        except AgentKernelError as exc:  # e.g. BodyTooLarge, from the limit's receive
            await send_json(send, *envelope_error(exc.http_status, exc.message))
            return
        if body is None:
            return  # the client left while sending its body
        req = _run_request(body)
        if req is None:  # FastAPI's route answers it, with the route's own error
            await self.app(scope, _replay(body, receive), send)
            return
        await self._run(req, scope, receive, send)

    async def _run(self, req: RunRequest, scope: Scope, receive: Receive, send: Send
                   ) -> None:
        job, cap = capped_job(lambda: self.svc.open_run(req), self.limits.max_output,
                              close_stdin=True)
        try:
            res = await run_cancellable(receive, job.run, job.cancel)
        except ClientGone as exc:
            await send_json(send, *envelope_error(499, exc.message))
            return
        except AgentKernelError as exc:
            if exc.http_status >= 500:
                log.warning("%s: %s", type(exc).__name__, exc.message)
            await send_json(send, *envelope_error(exc.http_status, exc.message))
            return
        except Exception as exc:
            log.error("unhandled error in a request", exc_info=exc)
            await send_json(send, *envelope_error(500, f"internal error: {type(exc).__name__}"))
            return
        await _send_pieces(scope, receive, send, result_pieces(res, cap))


def _json_body(scope: Scope) -> bool:
    """Whether the request says its body is JSON (as FastAPI reads it: application/json)."""
    for key, value in scope.get("headers", []):
        if key == b"content-type":
            kind = bytes(value).split(b";", 1)[0].strip().lower()
            return kind == b"application/json"
    return False


async def _read_body(receive: Receive) -> bytes | None:
    """The whole body (the body limit's receive bounds it); None if the client left."""
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


def run_request(body: m.RunBody) -> RunRequest:
    """A run's request from its checked body (`POST /run`, `/run/stream`, this layer)."""
    return RunRequest(argv=check_argv(list(body.command)), image=check_image(body.image),
                      profile=check_profile(body.profile), backend=check_backend(body.backend),
                      env=parse_env(body.env), workdir=check_workdir(body.workdir),
                      timeout=body.timeout)


def _run_request(body: bytes) -> RunRequest | None:
    """The request the route would make of `body` (parsed and validated as FastAPI does:
    JSON, then the model), or None where the route would answer an error."""
    try:
        data = json.loads(body)
        if not isinstance(data, dict):
            return None
        return run_request(m.RunBody.model_validate(data))
    except (ValueError, RecursionError, ValidationError, AgentKernelError):
        return None  # (RecursionError: nesting too deep for json; the route says what)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives `body` once, then the connection's own messages."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_pieces(scope: Scope, receive: Receive, send: Send,
                       pieces: Iterator[bytes]) -> None:
    """The answer's envelope: one body when it is small; else streamed as the route does
    (app.pieces_response: the rest is encoded on a worker thread, not on the loop)."""
    first = bytearray()
    for piece in pieces:
        first += piece
        if len(first) >= SEND_CHUNK:
            break
    else:
        await send_json(send, 200, bytes(first))
        return
    from starlette.responses import StreamingResponse

    def chunks() -> Iterator[bytes]:
        yield bytes(first)
        buf = bytearray()
        for piece in pieces:
            buf += piece
            if len(buf) >= SEND_CHUNK:
                yield bytes(buf)
                buf = bytearray()
        if buf:
            yield bytes(buf)

    await StreamingResponse(chunks(), media_type="application/json")(scope, receive, send)
