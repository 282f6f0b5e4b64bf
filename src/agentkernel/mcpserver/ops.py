"""What the MCP tools ask of the sandbox service, over the daemon socket or in-process.

`DaemonOps` is the stdio server's way (`agentkernel mcp-server`): the daemon's unix socket
through `daemon.client`, like every other front door, the daemon started on the first call.
`ServiceOps` is for `/mcp` on `serve`, which lives in the daemon: the same service the HTTP
API calls. Both are blocking; the tools call them on worker threads. Output is collected
into a bounded `Output`; a `Call` lets the caller abort a command from another thread (a
cancelled tool call takes its command, and a one-shot run its sandbox, with it).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Protocol

STDIN_CHUNK = 64 * 1024


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

    def run(self, req: dict[str, Any], out: Output, stdin: bytes | None,
            call: Call) -> dict[str, Any]: ...
    def exec(self, name: str, req: dict[str, Any], out: Output, stdin: bytes | None,
             call: Call) -> dict[str, Any]: ...
    def create(self, req: dict[str, Any]) -> dict[str, Any]: ...
    def list(self) -> list[dict[str, Any]]: ...
    def lifecycle(self, op: str, name: str) -> dict[str, Any] | None: ...
    def read_file(self, name: str, path: str, max_bytes: int) -> bytes: ...
    def write_file(self, name: str, path: str, data: bytes, mode: int) -> int: ...


class DaemonOps:
    """Over the daemon's unix socket (started on the first call if none runs)."""

    def run(self, req: dict[str, Any], out: Output, stdin: bytes | None,
            call: Call) -> dict[str, Any]:
        return self._stream("run", req, out, stdin, call)

    def exec(self, name: str, req: dict[str, Any], out: Output, stdin: bytes | None,
             call: Call) -> dict[str, Any]:
        return self._stream("exec", {**req, "name": name, "tty": None}, out, stdin, call)

    def _stream(self, op: str, req: dict[str, Any], out: Output, stdin: bytes | None,
                call: Call) -> dict[str, Any]:
        import socket

        from ..daemon import client

        lines = client.open_stream(op, {**req, "stdin_open": stdin is not None},
                                   auto_start=True)
        assert lines is not None  # auto_start: a daemon runs, or open_stream raised

        def hang_up() -> None:
            # The daemon then aborts the command (and removes a run's sandbox).
            with contextlib.suppress(OSError):
                lines.sock.shutdown(socket.SHUT_RDWR)

        call.on_abort(hang_up)
        if stdin is not None:
            threading.Thread(target=_feed, args=(lines, stdin), daemon=True,
                             name="ak-mcp-stdin").start()
        try:
            while True:
                msg = lines.recv()
                if msg is None:
                    if call.aborted:
                        raise client.DaemonError("the command was cancelled")
                    raise client.DaemonError("the daemon closed the connection mid-command")
                ev = msg.get("ev")
                if ev == "out":
                    out.add(int(msg.get("s", 1)), str(msg.get("d", "")).encode("latin-1"))
                elif ev == "started":
                    req["_info"] = msg.get("info") or {}
                elif ev == "exit":
                    result = dict(msg.get("result") or {})
                    result["info"] = req.get("_info") or {}
                    return result
                elif msg.get("ok") is False:
                    client._raise(msg)
        finally:
            lines.sock.close()

    def create(self, req: dict[str, Any]) -> dict[str, Any]:
        from ..daemon import client

        return dict(client.call("create", req))

    def list(self) -> list[dict[str, Any]]:
        from ..daemon import client

        return list(client.call("list_sandboxes"))

    def lifecycle(self, op: str, name: str) -> dict[str, Any] | None:
        from ..daemon import client

        data = client.call(op, {"name": name})
        return dict(data) if isinstance(data, dict) else None

    def read_file(self, name: str, path: str, max_bytes: int) -> bytes:
        from ..daemon import client

        data = client.call("read_file", {"name": name, "path": path, "max_bytes": max_bytes})
        return str(data).encode("latin-1")

    def write_file(self, name: str, path: str, data: bytes, mode: int) -> int:
        from ..daemon import client

        return int(client.call("write_file", {"name": name, "path": path,
                                              "data": data.decode("latin-1"), "mode": mode}))


def _feed(lines: Any, data: bytes) -> None:
    """A command's stdin, on its own thread: a command that answers its input while we
    still send it must not deadlock against us."""
    try:
        for i in range(0, len(data), STDIN_CHUNK):
            lines.send({"op": "stdin", "d": data[i : i + STDIN_CHUNK].decode("latin-1")})
        lines.send({"op": "eof"})
    except OSError:
        pass  # the command ended (or was aborted) before it read everything


class ServiceOps:
    """In the daemon's process (the HTTP API's `/mcp`): the service the HTTP routes use."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def run(self, req: dict[str, Any], out: Output, stdin: bytes | None,
            call: Call) -> dict[str, Any]:
        from ..daemon.api import RunRequest

        fields = {k: v for k, v in req.items() if k in RunRequest.__dataclass_fields__}
        handle = self.service.open_run(RunRequest(**fields), stdin=stdin is not None)
        return self._pump(handle, out, stdin, call)

    def exec(self, name: str, req: dict[str, Any], out: Output, stdin: bytes | None,
             call: Call) -> dict[str, Any]:
        from ..daemon.api import ExecRequest

        fields = {k: v for k, v in req.items() if k in ExecRequest.__dataclass_fields__}
        handle = self.service.open_exec(name, ExecRequest(**fields), stdin=stdin is not None)
        return self._pump(handle, out, stdin, call)

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
