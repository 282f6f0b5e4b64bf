"""A started sandbox and the commands in it, as the manager holds them: `Live`, `ExecHandle`,
the agent client that adopts a dead daemon's commands, `failed_start`."""

from __future__ import annotations

import contextlib
import secrets
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..agent.client import AgentClient, Execution, ExitStatus, _ChanQueue
from ..agent.protocol import Frame
from ..errors import AgentRequestError, Cancelled, ProtocolError, SandboxError
from .api import ExecResult, OnOutput

if TYPE_CHECKING:
    from ..sandbox import Sandbox


class AdoptingClient(AgentClient):
    """An AgentClient that keeps frames for channels it does not know yet.

    After a daemon restart the agent replays output of commands started over the previous
    connection under their old ids; the manager re-attaches its detached commands to them.
    """

    def __init__(self, *args: Any, expect: set[int] | None = None,
                 orphans: dict[int, list[Frame]] | None = None, **kwargs: Any) -> None:
        self._expect = set(expect or ())
        self._orphans: dict[int, list[Frame]] = dict(orphans or {})
        super().__init__(*args, **kwargs)
        # Commands of the lost connection that nobody adopts (a dead daemon's plain execs)
        # may still run under low ids: number this connection's channels far from them.
        self._next_chan = secrets.randbelow(1 << 30) + (1 << 20)

    @classmethod
    def connect(cls, path: Path, expect: set[int], timeout: float = 5.0,
                orphans: dict[int, list[Frame]] | None = None) -> AdoptingClient:
        import socket

        from ..paths import connect_socket_file

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            connect_socket_file(sock, path)  # (its dir may be the sandbox's to write)
        except OSError:
            sock.close()
            raise
        sock.settimeout(None)

        def shut() -> None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

        from typing import BinaryIO, cast

        return cls(cast(BinaryIO, sock.makefile("rb", buffering=0)),
                   cast(BinaryIO, sock.makefile("wb", buffering=0)), on_close=shut,
                   expect=expect, orphans=orphans)

    def _deliver(self, frame: Frame) -> None:
        with self._lock:
            if frame.chan in self._expect and frame.chan not in self._chans:
                self._orphans.setdefault(frame.chan, []).append(frame)
                return
        super()._deliver(frame)

    def take_orphans(self) -> dict[int, list[Frame]]:
        """The frames kept so far for channels nobody adopted yet (for the next attempt)."""
        with self._lock:
            orphans, self._orphans = self._orphans, {}
        return orphans

    def adopt(self, chan: int, pid: int) -> Execution:
        """An Execution for a command started over an earlier connection."""
        q: _ChanQueue = self._new_queue(chan)
        with self._lock:
            self._expect.discard(chan)
            for frame in self._orphans.pop(chan, []):
                q.put(frame, wait=False)  # already in memory; a full queue asks for PAUSE
            if not self._alive:
                q.end()
            self._chans[chan] = q
            self._next_chan = max(self._next_chan, chan + 1)
        return Execution(self, chan, q, pid)


@dataclass
class Live:
    """A running persistent sandbox: its agent channel and what must be torn down."""

    name: str
    backend: str
    client: AgentClient
    scratch: Path
    pid: int | None
    pid_start: int | None
    helpers: list[tuple[int, int | None]]
    sandbox: Sandbox | None = None  # None when adopted from an earlier daemon
    execs: set[ExecHandle] = field(default_factory=set)


class ExecHandle:
    """A started command: feed stdin, signal, resize, then `pump` its output to the end."""

    def __init__(self, execution: Execution, *, timeout: float | None,
                 oom: Callable[[], bool], memory_mb: int | None,
                 finish: Callable[[ExecHandle, ExecResult | None], None] | None = None,
                 info: dict[str, Any] | None = None) -> None:
        self.execution = execution
        self.timeout = timeout
        self._oom = oom
        self._memory_mb = memory_mb
        self._finish = finish
        self._finished = False
        self.aborted = False
        self._lock = threading.Lock()
        self.info: dict[str, Any] = info or {}

    def write_stdin(self, data: bytes) -> None:
        with contextlib.suppress(ProtocolError):
            self.execution.write_stdin(data)

    def close_stdin(self) -> None:
        with contextlib.suppress(ProtocolError):
            self.execution.close_stdin()

    def signal(self, signo: int) -> None:
        with contextlib.suppress(ProtocolError, ValueError):
            self.execution.signal(signo)

    def resize(self, rows: int, cols: int) -> None:
        with contextlib.suppress(ProtocolError, ValueError):
            self.execution.resize(rows, cols)

    def pump(self, on_output: OnOutput | None = None, *, collect: bool = True,
             max_output: int | None = None) -> ExecResult:
        """Deliver output as it comes until the command exits; then finish the handle.

        on_output runs on this thread: while it blocks, the agent is told to pause the
        command (back-pressure). With `collect`, at most `max_output` bytes (stdout and
        stderr together) are kept; the command runs on, its result says `truncated`.
        Raises Cancelled once `abort` was called.
        """
        out: list[bytes] = []
        err: list[bytes] = []
        room = max_output if max_output is not None else -1
        truncated = False
        result: ExecResult | None = None
        try:
            try:
                for kind, payload in self.execution.events():
                    if isinstance(payload, bytes):
                        if collect:
                            keep = payload if room < 0 else payload[:room]
                            truncated = truncated or len(keep) < len(payload)
                            room = room if room < 0 else room - len(keep)
                            if keep:
                                (out if kind == "stdout" else err).append(keep)
                        if on_output is not None:
                            on_output("stdout" if kind == "stdout" else "stderr", payload)
                    elif isinstance(payload, ExitStatus):
                        result = self._result(payload, b"".join(out), b"".join(err))
                        result.truncated = truncated
            except Cancelled:
                raise
            except ProtocolError:
                if self.aborted:
                    raise Cancelled("the command was cancelled") from None
                if not self._oom():
                    raise SandboxError("the sandbox died while the command ran") from None
                result = self._result(None, b"".join(out), b"".join(err))
                result.truncated = truncated
            if result is None:
                raise ProtocolError("the agent ended the command without an exit status")
            return result
        finally:
            self.finish(result)

    def abort(self) -> None:
        """The caller went away: kill the command and release everything.

        Never waits for the agent: the channel is dropped at once (a thread pumping it
        raises Cancelled) and the kill is sent by the agent client's own thread.
        """
        self.aborted = True
        self.execution.cancel()
        self.finish(None)

    def kill(self) -> None:
        """End the command (its sandbox is going away); its pump still gets the end."""
        self.signal(signal.SIGKILL)
        self.finish(None)

    def finish(self, result: ExecResult | None) -> None:
        with self._lock:
            if self._finished:
                return
            self._finished = True
        if self._finish is not None:
            self._finish(self, result)

    def _result(self, status: ExitStatus | None, out: bytes, err: bytes) -> ExecResult:
        """planner.outcome's answer (None: the sandbox died under the command)."""
        from ..planner import outcome

        o = outcome(status, timeout=self.timeout, oom=self._oom, memory_mb=self._memory_mb)
        return ExecResult(o.exit_code, out, err, o.signal, timed_out=o.timed_out,
                          oom_killed=o.oom_killed, message=o.message)


def failed_start(exc: AgentRequestError) -> ExecResult:
    """A command that could not start (not found, not executable) as a result, not an error."""
    from ..planner import failed_start as failed

    o = failed(exc.exit_code, exc.message)
    return ExecResult(o.exit_code, b"", b"", message=o.message)
