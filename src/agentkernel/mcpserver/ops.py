"""What the MCP tools ask of the sandbox service, over the daemon socket or in-process.

`DaemonOps` is the stdio server's way (`agentkernel mcp-server`): the daemon's unix socket
through `ipc.client`, like every other front door, the daemon started on the first call.
`ServiceOps` is for `/mcp` on `serve`, which lives in the daemon: the same service the HTTP
API calls. Commands (`run`, `exec`) are awaited: `DaemonOps` streams them on a non-blocking
socket in the event loop (no worker thread per call), `ServiceOps` pumps the service's
blocking handle on a worker thread. Output is collected into a bounded `Output`. A
cancelled call (or a client that left) takes its command with it, and a one-shot run its
sandbox: `DaemonOps` hangs up (the daemon aborts what the connection asked for),
`ServiceOps` aborts the handle. The other calls are blocking; the tools run them on worker
threads.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

STDIN_CHUNK = 64 * 1024
RECV_CHUNK = 256 * 1024
SPARE_DELAY = 0.02  # s after a command before its successor's connection is made
SPARE_MAX_AGE = 10.0  # s a spare connection is used for (the daemon waits 30 s for a request)


class Output:
    """stdout and stderr of one command, each kept to its last `limit` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.streams = {1: bytearray(), 2: bytearray()}
        self.total = 0  # bytes seen, kept or not
        self.truncated = False
        self._lock = threading.Lock()

    def add(self, stream: int, data: bytes) -> None:
        with self._lock:
            buf = self.streams[1 if stream == 1 else 2]
            buf += data
            self.total += len(data)
            if len(buf) > self.limit:
                del buf[: len(buf) - self.limit]  # keep the end: where errors usually are
                self.truncated = True

    def text(self, stream: int) -> str:
        with self._lock:
            return bytes(self.streams[stream]).decode(errors="replace")


class Call:
    """One running command's abort switch, usable from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abort: Any = None
        self.aborted = False

    def on_abort(self, fn: Any) -> None:
        with self._lock:
            self._abort = fn
            run_now = self.aborted
        if run_now:
            fn()

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            fn = self._abort
        if fn is not None:
            fn()


class SandboxOps(Protocol):
    """The calls the tools make; every error is an AgentKernelError."""

    async def run(self, req: dict[str, Any], out: Output,
                  stdin: bytes | None) -> dict[str, Any]: ...
    async def exec(self, name: str, req: dict[str, Any], out: Output,
                   stdin: bytes | None) -> dict[str, Any]: ...
    def create(self, req: dict[str, Any]) -> dict[str, Any]: ...
    def list(self) -> list[dict[str, Any]]: ...
    def lifecycle(self, op: str, name: str) -> dict[str, Any] | None: ...
    def read_file(self, name: str, path: str, max_bytes: int) -> bytes: ...
    def write_file(self, name: str, path: str, data: bytes, mode: int) -> int: ...


class DaemonOps:
    """Over the daemon's unix socket (started on the first call if none runs).

    A command's connection is made ahead: shortly after each command ends, one spare
    connection to the daemon is opened, which the next command takes. The daemon accepts
    a connection on a new thread and checks its peer (peer.py) before it reads a request:
    made ahead, that is off the next command's path (measured: 1.7 ms of a 6.6 ms run of
    `true` at p50 on a loaded 2-core machine). At most one spare per server, used only
    while younger than SPARE_MAX_AGE (the daemon answers and closes a connection that
    sends no request within 30 s) and while the daemon has neither answered nor closed
    it; else closed and a fresh connection made.
    """

    def __init__(self) -> None:
        self._spare: tuple[Any, float] | None = None  # (socket, when made)

    async def run(self, req: dict[str, Any], out: Output,
                  stdin: bytes | None) -> dict[str, Any]:
        return await self._command("run", req, out, stdin)

    async def exec(self, name: str, req: dict[str, Any], out: Output,
                   stdin: bytes | None) -> dict[str, Any]:
        return await self._command("exec", {**req, "name": name, "tty": None}, out, stdin)

    async def _command(self, op: str, req: dict[str, Any], out: Output,
                       stdin: bytes | None) -> dict[str, Any]:
        import asyncio

        args = {**req, "stdin_open": stdin is not None}
        try:
            return await _stream(await self._open(op, args), out, stdin)
        finally:
            # After the answer has gone out, not on its way: (the stdio server runs on
            # asyncio's loop or uvloop's)
            asyncio.get_running_loop().call_later(SPARE_DELAY, self._make_spare)

    async def _open(self, op: str, args: dict[str, Any]) -> _Lines:
        """The request sent on the spare connection if it is still good, else (or if the
        daemon turns out to have closed it meanwhile) on a fresh one."""
        import time

        from ..errors import AgentKernelError

        spare, self._spare = self._spare, None
        if spare is not None:
            sock, made = spare
            if time.monotonic() - made < SPARE_MAX_AGE and _untouched(sock):
                try:
                    return await _send_request(sock, op, args)
                except (AgentKernelError, OSError):
                    pass  # (closed by now, and by _send_request) a fresh one says why
            else:
                sock.close()
        return await _send_request(await _connect(), op, args)

    def _make_spare(self) -> None:
        """A spare connection to a daemon that already listens (none started for it)."""
        import time

        from ..ipc import client, wire

        if self._spare is not None:
            return
        sock = wire.unix_socket()
        sock.setblocking(False)
        try:
            sock.connect(client.socket_path())
        except OSError:
            sock.close()
            return
        self._spare = (sock, time.monotonic())

    def create(self, req: dict[str, Any]) -> dict[str, Any]:
        from ..ipc import client

        return dict(client.call("create", req))

    def list(self) -> list[dict[str, Any]]:
        from ..ipc import client

        return list(client.call("list_sandboxes"))

    def lifecycle(self, op: str, name: str) -> dict[str, Any] | None:
        from ..ipc import client

        data = client.call(op, {"name": name})
        return dict(data) if isinstance(data, dict) else None

    def read_file(self, name: str, path: str, max_bytes: int) -> bytes:
        from ..ipc import client

        data = client.call("read_file", {"name": name, "path": path, "max_bytes": max_bytes})
        return str(data).encode("latin-1")

    def write_file(self, name: str, path: str, data: bytes, mode: int) -> int:
        from ..ipc import client

        return int(client.call("write_file", {"name": name, "path": path,
                                              "data": data.decode("latin-1"), "mode": mode}))


class _Lines:
    """JSON lines (ipc/wire) on a connected, non-blocking socket, awaited in the event loop."""

    def __init__(self, sock: Any) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._buf = bytearray()

    async def send(self, obj: dict[str, Any]) -> None:
        import anyio

        from ..ipc import wire

        data = memoryview((wire.dumps(obj) + "\n").encode())
        while data:
            try:
                data = data[self.sock.send(data):]
            except (BlockingIOError, InterruptedError):
                await anyio.wait_writable(self.sock)

    async def recv(self) -> dict[str, Any] | None:
        import anyio

        from ..ipc import wire

        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                obj = wire.loads(bytes(self._buf[:i]))
                del self._buf[: i + 1]
                return obj if isinstance(obj, dict) else None
            await anyio.wait_readable(self.sock)
            try:
                chunk = self.sock.recv(RECV_CHUNK)
            except (BlockingIOError, InterruptedError):
                continue
            if not chunk:
                return None
            self._buf += chunk


async def _connect() -> Any:
    """A connection to the daemon: at once when it listens, else (none runs, or its
    backlog is full) the blocking way on a worker thread, starting it if need be."""
    import anyio

    from ..ipc import client, wire

    sock = wire.unix_socket()
    sock.setblocking(False)
    try:
        sock.connect(client.socket_path())
        return sock
    except OSError:
        sock.close()
    return await anyio.to_thread.run_sync(lambda: client.connect(auto_start=True))


def _untouched(sock: Any) -> bool:
    """The daemon has neither written to nor closed this connection (a spare it refused
    or timed out has its answer waiting, or its end closed)."""
    import select

    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
    return not poller.poll(0)


async def _send_request(sock: Any, op: str, args: dict[str, Any]) -> _Lines:
    """A streaming request sent on `sock` (ipc.client.open_stream, in the event loop)."""
    from ..ipc import client
    from ..paths import data_dir_str

    lines = _Lines(sock)
    try:
        try:
            await lines.send({"op": op, "args": args, "data_dir": data_dir_str()})
        except OSError as exc:
            # A daemon that refused us (busy) may have answered and hung up already.
            try:
                reply = await lines.recv()
            except (OSError, ValueError):
                reply = None
            if reply is not None and reply.get("ok") is False:
                client._raise(reply)
            raise client.DaemonError(
                f"the daemon closed the connection ({exc.strerror})") from None
    except BaseException:
        lines.sock.close()
        raise
    return lines


async def _stream(lines: _Lines, out: Output, stdin: bytes | None) -> dict[str, Any]:
    """One command whose request went out on `lines` (closed after), its output into
    `out`, to its exit. Cancelled, the connection closes: the daemon then aborts the
    command (and removes a run's sandbox)."""
    import anyio

    try:
        if stdin is None:
            return await _collect(lines, out)
        # Fed beside the reading: a command that answers its input while we still send
        # it must not deadlock against us.
        done: list[dict[str, Any] | BaseException] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(_feed, lines, stdin)
            try:
                done.append(await _collect(lines, out))
            except Exception as exc:  # raised below, not wrapped in the group's
                done.append(exc)
            tg.cancel_scope.cancel()  # (what is left of stdin no longer matters)
        if isinstance(done[0], BaseException):
            raise done[0]
        return done[0]
    finally:
        lines.sock.close()


async def _collect(lines: _Lines, out: Output) -> dict[str, Any]:
    """The command's events to its exit: output into `out`, then its result."""
    from ..ipc import client

    info: dict[str, Any] = {}
    while True:
        msg = await lines.recv()
        if msg is None:
            raise client.DaemonError("the daemon closed the connection mid-command")
        ev = msg.get("ev")
        if ev == "out":
            out.add(int(msg.get("s", 1)), str(msg.get("d", "")).encode("latin-1"))
        elif ev == "started":
            info = msg.get("info") or {}
        elif ev == "exit":
            return {**(msg.get("result") or {}), "info": info}
        elif msg.get("ok") is False:
            client._raise(msg)


async def _feed(lines: _Lines, data: bytes) -> None:
    try:
        for i in range(0, len(data), STDIN_CHUNK):
            await lines.send({"op": "stdin", "d": data[i : i + STDIN_CHUNK].decode("latin-1")})
        await lines.send({"op": "eof"})
    except OSError:
        pass  # the command ended (or was aborted) before it read everything


class ServiceOps:
    """In the daemon's process (the HTTP API's `/mcp`): the service the HTTP routes use."""

    def __init__(self, service: Any) -> None:
        self.service = service

    async def run(self, req: dict[str, Any], out: Output,
                  stdin: bytes | None) -> dict[str, Any]:
        from ..daemon.api import RunRequest

        fields = {k: v for k, v in req.items() if k in RunRequest.__dataclass_fields__}
        return await _threaded(lambda call: self._pump(
            self.service.open_run(RunRequest(**fields), stdin=stdin is not None),
            out, stdin, call))

    async def exec(self, name: str, req: dict[str, Any], out: Output,
                   stdin: bytes | None) -> dict[str, Any]:
        from ..daemon.api import ExecRequest

        fields = {k: v for k, v in req.items() if k in ExecRequest.__dataclass_fields__}
        return await _threaded(lambda call: self._pump(
            self.service.open_exec(name, ExecRequest(**fields), stdin=stdin is not None),
            out, stdin, call))

    @staticmethod
    def _pump(handle: Any, out: Output, stdin: bytes | None, call: Call) -> dict[str, Any]:
        call.on_abort(handle.abort)
        if stdin is None:
            handle.close_stdin()
        else:
            def feed() -> None:
                try:
                    for i in range(0, len(stdin), STDIN_CHUNK):
                        handle.write_stdin(stdin[i : i + STDIN_CHUNK])
                    handle.close_stdin()
                except Exception:  # noqa: S110 - the command ended before reading it all
                    pass

            threading.Thread(target=feed, daemon=True, name="ak-mcp-stdin").start()
        result = handle.pump(lambda kind, data: out.add(1 if kind == "stdout" else 2, data),
                             collect=False)
        return {"exit_code": result.exit_code, "signal": result.signal,
                "timed_out": result.timed_out, "oom_killed": result.oom_killed,
                "message": result.message, "info": dict(getattr(handle, "info", {}) or {})}

    def create(self, req: dict[str, Any]) -> dict[str, Any]:
        from ..daemon.api import CreateRequest, to_json

        return dict(to_json(self.service.create(CreateRequest(**req))))

    def list(self) -> list[dict[str, Any]]:
        from ..daemon.api import to_json

        return list(to_json(self.service.list_sandboxes()))

    def lifecycle(self, op: str, name: str) -> dict[str, Any] | None:
        from ..daemon.api import to_json

        data = to_json(getattr(self.service, op)(name))
        return dict(data) if isinstance(data, dict) else None

    def read_file(self, name: str, path: str, max_bytes: int) -> bytes:
        return bytes(self.service.read_file(name, path, max_bytes=max_bytes))

    def write_file(self, name: str, path: str, data: bytes, mode: int) -> int:
        return int(self.service.write_file(name, path, data, mode))


async def _threaded(fn: Any) -> dict[str, Any]:
    """`fn(call)` on a worker thread; cancelled, the call is aborted (its command with it)
    and the thread left to return on its own."""
    import anyio

    call = Call()
    try:
        return dict(await anyio.to_thread.run_sync(fn, call, abandon_on_cancel=True))
    except anyio.get_cancelled_exc_class():
        call.abort()
        raise
