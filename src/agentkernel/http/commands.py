"""Commands and file reads over HTTP, bounded: output kept up to a cap (then the command is
killed), cancelled when the client leaves, streamed with back-pressure, files read capped."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol

from starlette.concurrency import run_in_threadpool

from ..daemon.api import ExecRequest, ExecResult, OnOutput, OutputKind, RunRequest, SandboxService
from ..errors import AgentKernelError, AgentRequestError, TooLarge, UsageError

CHUNK = 256 * 1024  # raw bytes per piece of a streamed JSON answer


class Handle(Protocol):
    """A started command (daemon.manager.ExecHandle)."""

    def pump(self, on_output: OnOutput | None = None, *, collect: bool = True
             ) -> ExecResult: ...
    def abort(self) -> None: ...
    def signal(self, signo: int) -> None: ...
    def close_stdin(self) -> None: ...


class CommandService(SandboxService, Protocol):
    """The service plus the calls the HTTP API needs to stay bounded (the daemon's manager)."""

    def open_run(self, req: RunRequest, *, stdin: bool = False) -> Handle: ...
    def open_exec(self, name: str, req: ExecRequest, *, stdin: bool = False,
                  pty: tuple[int, int] | None = None) -> Handle: ...
    def stat_file(self, name: str, path: str) -> dict[str, Any]: ...
    def read_file_to(self, name: str, path: str, out: Any, *,
                     max_bytes: int | None = None) -> int: ...


class ClientGone(AgentKernelError):
    """The client closed its connection before the answer: its command was cancelled."""

    http_status = 499


def _failed_start(exc: AgentRequestError) -> ExecResult:
    code = exc.exit_code if exc.exit_code in (126, 127) else 126
    return ExecResult(code, b"", b"", message=exc.message)


class Job:
    """One command from open to exit, on a worker thread; `cancel()` from any thread kills
    it (and, for a one-shot run, its sandbox goes with it)."""

    def __init__(self, opener: Callable[[], Handle], on_output: OnOutput, *,
                 close_stdin: bool) -> None:
        self._opener = opener
        self._on_output = on_output
        self._close_stdin = close_stdin
        self._lock = threading.Lock()
        self._handle: Handle | None = None
        self._cancelled = False

    def run(self) -> ExecResult:
        try:
            handle = self._opener()
        except AgentRequestError as exc:
            if exc.exit_code in (126, 127):
                return _failed_start(exc)  # reported as a shell would: a result
            raise
        with self._lock:
            cancelled = self._cancelled
            if not cancelled:
                self._handle = handle
        if cancelled:
            handle.abort()
            with contextlib.suppress(Exception):  # take its last output: the channel ends
                handle.pump(None, collect=False)
            raise ClientGone("the client went away")
        if self._close_stdin:  # a one-shot run gets no input: EOF at once
            handle.close_stdin()
        return handle.pump(self._on_output, collect=False)

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            handle = self._handle
        if handle is not None:
            handle.abort()

    def kill(self) -> None:
        """SIGKILL the command only: it still ends with an exit status, the run finishes."""
        with self._lock:
            handle = self._handle
        if handle is not None:
            handle.signal(signal.SIGKILL)


class Capped:
    """stdout and stderr of one command, at most `limit` bytes together. The first byte over
    calls `over` (which kills the command) and everything after it is dropped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit
        self.out = bytearray()
        self.err = bytearray()
        self.truncated = False
        self.over: Callable[[], None] = lambda: None

    def __call__(self, kind: OutputKind, data: bytes) -> None:
        if self.truncated:
            return
        buf = self.out if kind == "stdout" else self.err
        if len(data) <= self.left:
            buf += data
            self.left -= len(data)
            return
        buf += data[: self.left]
        self.left = 0
        self.truncated = True
        self.over()


def capped_job(opener: Callable[[], Handle], limit: int, *, close_stdin: bool
               ) -> tuple[Job, Capped]:
    cap = Capped(limit)
    job = Job(opener, cap, close_stdin=close_stdin)
    cap.over = job.kill
    return job, cap


def result_fields(res: ExecResult, cap: Capped | None = None) -> dict[str, Any]:
    """The small fields of a finished command's `data` (output and stderr come apart)."""
    out: dict[str, Any] = {"exit_code": res.exit_code, "success": res.exit_code == 0}
    if res.signal is not None:
        out["signal"] = res.signal
    if res.timed_out:
        out["timed_out"] = True
    if res.oom_killed:
        out["oom_killed"] = True
    message = res.message
    if cap is not None and cap.truncated:
        out["truncated"] = True
        out["success"] = False
        message = (f"output over the limit of {cap.limit} bytes (max_output_bytes): "
                   "truncated, and the command was killed")
    if message:
        out["message"] = message
    return out


def truncation_note(cap: Capped) -> bytes:
    return (f"\n[agentkernel: output truncated at {cap.limit} bytes; "
            "the command was killed]\n").encode()


def result_dict(res: ExecResult, cap: Capped) -> dict[str, Any]:
    """A finished command as `data`, for answers that hold several (batch)."""
    err = bytes(cap.err) + (truncation_note(cap) if cap.truncated else b"")
    return {"output": bytes(cap.out).decode("utf-8", "replace"),
            "stderr": err.decode("utf-8", "replace"), **result_fields(res, cap)}


async def wait_disconnect(receive: Callable[[], Any]) -> None:
    """Returns once the client has closed its connection (the body was read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def run_cancellable(receive: Callable[[], Any], work: Callable[[], Any],
                          cancel: Callable[[], None]) -> Any:
    """`work()` on a worker thread; if the client leaves first, `cancel()` and ClientGone."""
    task = asyncio.ensure_future(run_in_threadpool(work))
    watcher = asyncio.ensure_future(wait_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        cancel()
        with contextlib.suppress(Exception):
            await task  # the sandbox is torn down; its errors go nowhere
        raise ClientGone("the client went away")
    finally:
        watcher.cancel()


# -- JSON answers written piece by piece --

def _text_pieces(data: bytes | bytearray) -> Iterator[bytes]:
    """A JSON string's contents (no quotes) for `data` decoded as UTF-8, invalid bytes
    replaced, escaped a piece at a time: a NUL is six bytes escaped, so the whole answer
    is never built at once."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    view = memoryview(data)
    for i in range(0, len(view), CHUNK):
        text = decoder.decode(view[i:i + CHUNK])
        if text:
            yield json.dumps(text, ensure_ascii=False)[1:-1].encode()
    rest = decoder.decode(b"", final=True)
    if rest:
        yield json.dumps(rest, ensure_ascii=False)[1:-1].encode()


def _base64_pieces(data: bytes | bytearray) -> Iterator[bytes]:
    import base64

    view = memoryview(data)
    step = CHUNK - CHUNK % 3  # whole groups of 3 bytes: the pieces concatenate
    for i in range(0, len(view), step):
        yield base64.b64encode(view[i:i + step])


def envelope_pieces(small: dict[str, Any], big: dict[str, Iterator[bytes]]) -> Iterator[bytes]:
    """`{"success":true,"data":{...small, ...big},"error":null}`, big values as strings."""
    head = json.dumps(small, ensure_ascii=False, separators=(",", ":"), default=str)
    yield b'{"success":true,"error":null,"data":' + head[:-1].encode()
    first = head == "{}"
    for key, pieces in big.items():
        yield (b"" if first else b",") + json.dumps(key).encode() + b':"'
        first = False
        yield from pieces
        yield b'"'
    yield b"}}"


def result_pieces(res: ExecResult, cap: Capped) -> Iterator[bytes]:
    err = (bytes(cap.err) + truncation_note(cap)) if cap.truncated else cap.err
    return envelope_pieces(result_fields(res, cap),
                           {"output": _text_pieces(cap.out), "stderr": _text_pieces(err)})


def file_pieces(data: bytearray) -> Iterator[bytes]:
    """A file's `data`: UTF-8 text as is, anything else base64 (as before, in pieces)."""
    try:
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        view = memoryview(data)
        for i in range(0, len(view), CHUNK):
            decoder.decode(view[i:i + CHUNK])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return envelope_pieces({"encoding": "base64", "size": len(data)},
                               {"content": _base64_pieces(data)})
    return envelope_pieces({"encoding": "utf8", "size": len(data)},
                           {"content": _text_pieces(data)})


# -- files --

class _Sink:
    """Collects a file read into one buffer; refuses past `limit`."""

    def __init__(self, limit: int, path: str) -> None:
        self.buf = bytearray()
        self.limit = limit
        self.path = path

    def write(self, data: bytes) -> int:
        if len(self.buf) + len(data) > self.limit:
            raise TooLarge(f"{self.path} is larger than {self.limit} bytes (max_file_bytes)")
        self.buf += data
        return len(data)


def read_file_capped(svc: CommandService, name: str, path: str, limit: int) -> bytearray:
    """A regular file's bytes, at most `limit` of them; a device, FIFO, socket or
    directory is refused (400), a larger file too (413). The agent checks the type itself
    on the descriptor it reads, so swapping the file after the stat gains nothing, and it
    stops after limit+1 bytes whatever the file is."""
    st = svc.stat_file(name, path)
    if st.get("type") != "file":
        kind = {"dir": "a directory"}.get(str(st.get("type")), "not a regular file")
        raise UsageError(f"{path} is {kind}: only regular files can be read")
    if int(st.get("size", 0)) > limit:
        raise TooLarge(f"{path} is larger than {limit} bytes (max_file_bytes)")
    sink = _Sink(limit, path)
    svc.read_file_to(name, path, sink, max_bytes=limit)
    return sink.buf


# -- server-sent events --

def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class Pipe:
    """Output from the command's thread to the event loop. The thread waits while `budget`
    bytes are not yet handed to the client, so a reader that stops reading stops the
    command's output, not the server's memory."""

    def __init__(self, loop: asyncio.AbstractEventLoop, budget: int) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.budget = budget
        self.pending = 0
        self.closed = False
        self._cond = threading.Condition()

    def post(self, item: tuple[str, Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: the client left
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def output(self, kind: OutputKind, data: bytes) -> None:
        with self._cond:
            while self.pending >= self.budget and not self.closed:
                self._cond.wait()
            if self.closed:
                raise ClientGone("the client went away")
            self.pending += len(data)
        self.post(("output", (kind, data)))

    def sent(self, n: int) -> None:
        with self._cond:
            self.pending -= n
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


async def stream_events(job_for: Callable[[OnOutput], Job], pipe: Pipe, started: bytes,
                        keepalive: float, on_error: Callable[[BaseException], bytes]
                        ) -> AsyncIterator[bytes]:
    """Server-sent events for one command, each `output` as the command produces it.

    Starlette cancels this generator when the client disconnects: the `finally` then
    cancels the command (and the one-shot sandbox goes).
    """
    job = job_for(pipe.output)

    def work() -> None:
        try:
            pipe.post(("done", job.run()))
        except BaseException as exc:  # delivered as an `error` event
            pipe.post(("error", exc))

    yield started
    threading.Thread(target=work, name="ak-http-stream", daemon=True).start()
    decoders = {k: codecs.getincrementaldecoder("utf-8")("replace") for k in ("stdout", "stderr")}
    finished = False
    try:
        while True:
            try:
                kind, payload = await asyncio.wait_for(pipe.queue.get(), keepalive)
            except TimeoutError:
                yield b": keepalive\n\n"
                continue
            if kind == "output":
                stream, chunk = payload
                text = decoders[stream].decode(chunk)
                if text:
                    yield sse("output", {"data": text, "stream": stream})
                pipe.sent(len(chunk))  # counted once it has gone to the client
                continue
            finished = True
            for stream, decoder in decoders.items():
                rest = decoder.decode(b"", final=True)
                if rest:
                    yield sse("output", {"data": rest, "stream": stream})
            if kind == "done":
                res: ExecResult = payload
                done: dict[str, Any] = {"exit_code": res.exit_code,
                                        "success": res.exit_code == 0}
                if res.message:
                    done["message"] = res.message
                yield sse("done", done)
            else:
                yield on_error(payload)
            return
    finally:
        pipe.close()
        if not finished:
            job.cancel()
