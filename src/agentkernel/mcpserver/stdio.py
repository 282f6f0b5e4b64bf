"""`agentkernel mcp-server`: the MCP tools on stdin/stdout, reaching the daemon per call.

The SDK's stdio transport reads and writes through anyio's file wrappers, a worker thread
per line read, per write and per flush: three thread hops per call, each a wait for a
worker to be scheduled (most of the transport's share of a call on a loaded machine).
Where stdin and stdout are pipes or sockets (as an MCP client starts us), our transport
serves them in the event loop instead: it waits for the descriptors to be ready and reads
or writes them without blocking. Anything else (a terminal, a file) gets the SDK's.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

READ_CHUNK = 64 * 1024
# A request line longer than this is dropped (an error is answered in its place): the
# largest valid one, a file write of 8 MiB, is under 20 MiB even fully escaped.
MAX_LINE = 32 * 1024 * 1024


_FIXED: dict[str, Any] = {}  # what _run_fields takes from our environment, made once


def _run_fields() -> dict[str, Any]:
    """What the CLI's `run` also sends: the caller's context the daemon plans from (our
    environment's plan-changing variables and user config, context.py), and our data dir
    (a daemon of another one refuses). Our environment is read once (nothing changes it
    in this process); the user config file is looked for at every call (it may appear)."""
    from ..context import caller_env, user_config_path

    if not _FIXED:
        from ..paths import data_dir_str

        _FIXED.update(caller_env=caller_env(), data_dir=data_dir_str())
    return {"caller_env": dict(_FIXED["caller_env"]), "data_dir": _FIXED["data_dir"],
            "user_config": user_config_path()}


class FdLines:
    """Lines of text from a readable descriptor, awaited in the event loop (`async for`,
    as the SDK reads its stdin). Each line is at most MAX_LINE bytes; a longer one is
    skipped and stands as an empty line (which the SDK answers as a parse error)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buf = bytearray()
        self._skipping = False
        self._eof = False

    def __aiter__(self) -> FdLines:
        return self

    async def __anext__(self) -> str:
        import anyio

        while True:
            line = self._take()
            if line is not None:
                return line
            if self._eof:
                raise StopAsyncIteration
            await anyio.wait_readable(self.fd)
            try:
                chunk = os.read(self.fd, READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                continue  # (another reader was first: nothing is lost)
            if not chunk:
                self._eof = True
                if self._buf and not self._skipping:
                    self._buf += b"\n"  # the last line, without its newline
            self._buf += chunk

    def _take(self) -> str | None:
        """The next whole line in the buffer, or None; drops what an over-long line
        holds as it comes."""
        i = self._buf.find(b"\n")
        if i < 0:
            if len(self._buf) > MAX_LINE or (self._skipping and self._buf):
                self._buf.clear()
                self._skipping = True
            return None
        line = bytes(self._buf[: i + 1])
        del self._buf[: i + 1]
        if self._skipping or len(line) > MAX_LINE:
            self._skipping = False
            return "\n"
        return line.decode("utf-8", errors="replace")


class FdWriter:
    """Text to a non-blocking descriptor: `write` buffers, `flush` writes it all, waiting
    in the event loop whenever the reader lets the pipe fill."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._pending = bytearray()

    async def write(self, text: str) -> None:
        self._pending += text.encode()

    async def flush(self) -> None:
        import anyio

        data = memoryview(bytes(self._pending))
        self._pending.clear()
        while data:
            try:
                data = data[os.write(self.fd, data):]
            except (BlockingIOError, InterruptedError):
                await anyio.wait_writable(self.fd)


def _streamable(fd: int) -> bool:
    """A pipe or a socket: descriptors the event loop can wait on."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def claim_stdio() -> tuple[int, int, Callable[[], None]] | None:
    """Private duplicates of stdin and stdout for the transport, stdout's non-blocking,
    with fd 0 pointed at /dev/null and fd 1 at stderr meanwhile (as the SDK's transport
    does: nothing else we run reads our requests or writes into the protocol); and what
    puts it all back. None when either is not a pipe or socket."""
    import fcntl

    if not (_streamable(0) and _streamable(1)):
        return None
    rfd = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)
    wfd = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)
    flags = fcntl.fcntl(wfd, fcntl.F_GETFL)
    fcntl.fcntl(wfd, fcntl.F_SETFL, flags | os.O_NONBLOCK)  # (the description's: undone)
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)

    def restore() -> None:
        fcntl.fcntl(wfd, fcntl.F_SETFL, flags)
        os.dup2(rfd, 0)
        os.dup2(wfd, 1)
        os.close(rfd)
        os.close(wfd)

    return rfd, wfd, restore


async def serve_stdio(server: Any) -> None:
    """Serve `server` (an MCPServer) on our stdin and stdout until stdin ends."""
    from mcp.server.stdio import stdio_server

    claimed = claim_stdio()
    if claimed is None:
        await server.run_stdio_async()
        return
    rfd, wfd, restore = claimed
    try:
        # The SDK's stdio_server with streams given: its framing and JSON-RPC parsing, our
        # I/O. Then what MCPServer.run_stdio_async does with the streams.
        streams: Any = {"stdin": FdLines(rfd), "stdout": FdWriter(wfd)}
        async with stdio_server(**streams) as (read, write):
            lowlevel = server._lowlevel_server
            await lowlevel.run(read, write, lowlevel.create_initialization_options())
    finally:
        restore()


def main(project: str | None = None) -> int:
    import anyio

    from .ops import DaemonOps
    from .tools import build_server

    root = Path(project).resolve() if project else Path.cwd()
    server = build_server(DaemonOps, root, _run_fields)
    anyio.run(serve_stdio, server, backend_options=_loop_options())
    return 0


def _loop_options() -> dict[str, Any]:
    """uvloop's event loop where it is installed (a dependency: the egress gates run it):
    each call's wake-ups and callbacks cost less CPU than in asyncio's own loop."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}
