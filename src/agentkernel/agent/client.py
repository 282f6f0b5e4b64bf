"""AgentClient: talk protocol v1 to an ak-agent over any pair of byte streams."""

from __future__ import annotations

import contextlib
import errno as errno_mod
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, TYPE_CHECKING, BinaryIO, NamedTuple, cast

from ..errors import (
    AgentRequestError,
    Cancelled,
    CommandNotExecutable,
    CommandNotFound,
    PathNotFound,
    ProtocolError,
    TooLarge,
)
from .protocol import (
    FEATURE_QUERY,
    FILE_CHUNK,
    FILE_TYPES,
    HEADER_SIZE,
    MAX_PING,
    STDIN_CHUNK,
    Frame,
    T,
    Tag,
    as_i32,
    as_str,
    as_uint,
    decode_header,
    decode_tlvs,
    encode_clone,
    encode_exec,
    encode_tlvs,
    path_bytes,
    tlv_dict,
    u8,
    u32,
    u64,
    winsize,
)

if TYPE_CHECKING:
    import socket

_NOT_EXECUTABLE = {
    errno_mod.EACCES,
    errno_mod.ENOEXEC,
    errno_mod.EISDIR,
    errno_mod.ENOTDIR,
    errno_mod.ELOOP,
    errno_mod.ETXTBSY,
    errno_mod.EPERM,
    errno_mod.ENAMETOOLONG,
}
_MAX_U32 = 0xFFFFFFFF
_STRAY_OUTPUT = (T.STDOUT, T.STDERR, T.EXIT)

# Flow control, per channel: once this many bytes (of output, and of any frame) wait for
# their reader the agent is told to PAUSE the channel (it stops reading the command's pipes,
# so the command blocks on write), and to RESUME once the reader got below LOW_WATER. The
# reader thread itself waits only beyond HARD_LIMIT (an agent without PAUSE, or one not
# reading the channel): memory stays bounded whatever the agent does, and one stalled
# reader stalls only its own channel as long as PAUSE works.
LOW_WATER = 128 * 1024
HIGH_WATER = 512 * 1024
HARD_LIMIT = 4 * 1024 * 1024
ERROR_KEPT = 300  # characters of a channel error's message kept (the last 100 are)
_ONE_WRITE = 64 * 1024  # a frame's payload up to this size is copied to join its header
_FLOW_FRAMES = (b"frame type 0x10 ", b"frame type 0x11 ", b"frame type 0x12 ")


class _ChanQueue:
    """One channel's frames, bounded in bytes; asks for PAUSE/RESUME as it fills and drains."""

    def __init__(self, flow: Callable[[int, str], None], chan: int) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._items: deque[Frame] = deque()
        self._flow = flow
        self.chan = chan
        self.bytes = 0
        self.paused = False
        self.ended = False  # the agent connection is gone
        self.closed = False  # the host forgot the channel: frames are dropped

    def put(self, frame: Frame, wait: bool = True) -> None:
        """From the reader thread: queue a frame, waiting while the channel is over its limit.
        Every frame counts, not only output: a stream of replies or errors of 1 MiB each is
        no cheaper to keep (one the agent never sends is the sandbox's to forge: a gVisor
        command can write into its agent's pipe)."""
        size = len(frame.payload)
        with self._cond:
            while wait and self.bytes and self.bytes + size > HARD_LIMIT and not self.closed:
                self._cond.wait()
            if self.closed:
                return
            self._items.append(frame)
            self.bytes += size
            self._cond.notify_all()
            pause = not self.paused and self.bytes >= HIGH_WATER
            self.paused = self.paused or pause
        if pause:
            self._flow(self.chan, "pause")

    def get(self, timeout: float | None) -> Frame | None:
        """The next frame; None once the connection ended or the channel was closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items and not self.ended and not self.closed:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise queue.Empty
                self._cond.wait(left)
            if not self._items:
                return None
            frame = self._items.popleft()
            if frame.payload:
                self.bytes -= len(frame.payload)
                self._cond.notify_all()
            resume = self.paused and self.bytes <= LOW_WATER
            self.paused = self.paused and not resume
        if resume:
            self._flow(self.chan, "resume")
        return frame

    def ready(self, wait: float = 0.0) -> bool:
        """Whether a frame is queued (waiting up to `wait` seconds for one): the next
        get() will not wait."""
        if self._items or wait <= 0:
            return bool(self._items)
        deadline = time.monotonic() + wait
        with self._cond:
            while not self._items and not self.ended and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return bool(self._items)

    def end(self) -> None:
        with self._cond:
            self.ended = True
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._items.clear()
            self.bytes = 0
            self._cond.notify_all()


class ExitStatus(NamedTuple):
    """How a command ended."""

    code: int | None
    signal: int | None
    timed_out: bool = False
    core: bool = False

    @property
    def shell_code(self) -> int:
        """The exit status a shell would report: code, or 128 + signal."""
        if self.code is not None:
            return self.code
        return 128 + (self.signal or 0)


class AgentInfo(NamedTuple):
    """What the agent announced in HELLO."""

    version: int
    pid: int
    name: str
    uid: int
    features: int = 0  # FEATURE_* bits (revision 1.3; an older agent announces none)


class FileStat(NamedTuple):
    """STAT_RESULT."""

    type: str  # "file", "dir", "symlink" or "other"
    mode: int
    size: int
    mtime_ns: int
    uid: int
    gid: int
    link_target: str | None = None

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"

    @property
    def is_file(self) -> bool:
        return self.type == "file"


class DirEntry(NamedTuple):
    """One LIST_RESULT entry (symlinks are not followed)."""

    name: str
    type: str
    size: int
    mode: int


def _error_fields(frame: Frame) -> tuple[int, str, str | None]:
    try:
        tags = tlv_dict(frame.payload)
        err = as_uint(tags.get(Tag.ERRNO, b"\0\0\0\0"), "errno")
        msg = as_str(tags.get(Tag.MESSAGE, b"")) or os.strerror(err)
        stage = as_str(tags[Tag.STAGE]) if Tag.STAGE in tags else None
    except ProtocolError:
        return 0, "malformed ERROR frame", None
    return err, msg, stage


def _request_error(frame: Frame, context: str) -> AgentRequestError:
    err, msg, _ = _error_fields(frame)
    cls = PathNotFound if err == errno_mod.ENOENT else AgentRequestError
    return cls(f"{context}: {msg}", err)


def _unexpected(frame: Frame, context: str) -> ProtocolError:
    return ProtocolError(f"{context}: unexpected frame type 0x{frame.type:02x}")


class Execution:
    """One running command. Consume its output with events() or wait()."""

    def __init__(self, client: AgentClient, chan: int, q: _ChanQueue, pid: int, *,
                 has_stdin: bool = True) -> None:
        self._client = client
        self._q = q
        self.id = chan
        self.pid = pid
        self.status: ExitStatus | None = None
        # Started without stdin (the agent gave it /dev/null): an EOF frame would only be
        # dropped by the agent, after a write and a wake-up on the request's path.
        self._has_stdin = has_stdin

    def write_stdin(self, data: bytes) -> None:
        view = memoryview(data)
        for i in range(0, len(view), STDIN_CHUNK):
            self._client._send(T.STDIN, self.id, view[i : i + STDIN_CHUNK])

    def close_stdin(self) -> None:
        if self._has_stdin:
            self._client._send(T.STDIN, self.id, b"")

    def signal(self, signo: int) -> None:
        self._client._send(T.SIGNAL, self.id, u32(signo))

    def kill(self) -> None:
        self.signal(9)

    def resize(self, rows: int, cols: int) -> None:
        self._client._send(T.RESIZE, self.id, winsize(rows, cols))

    def ask_ended(self) -> bool:
        """Ask the agent whether this command has ended (QUERY, revision 1.3), for a command
        adopted from an earlier connection whose EXIT may have been sent to it and lost.

        The answer comes as this command's events: its EXIT (again, if it ended lately), or
        an ERROR (the agent knows no such command: events() raises), or nothing new (it still
        runs: its EXIT comes when it ends). False, and nothing asked, for an agent without
        QUERY (before 1.3): such a command's lost EXIT stays lost.
        """
        if not self._client.answers_query:
            return False
        self._client._send(T.QUERY, self.id)
        return True

    def cancel(self) -> None:
        """Give up on the command: it is killed, its output dropped, its waiters woken
        (they raise Cancelled). Never blocks on the agent."""
        self._client.cancel(self.id)

    def ready(self, wait: float = 0.0) -> bool:
        """Whether the next event is here already, waiting up to `wait` seconds for it (a
        caller may then send what it holds with it, in one write)."""
        return self._q.ready(wait)

    def _next(self, timeout: float | None) -> tuple[str, bytes | ExitStatus]:
        while True:
            frame = self._client._get(self._q, timeout, "command output")
            if frame.type == T.STDOUT:
                return "stdout", frame.payload
            if frame.type == T.STDERR:
                return "stderr", frame.payload
            if frame.type == T.EXIT:
                self._client._close_chan(self.id)
                self._same_command(frame.payload, "EXIT")
                self.status = _parse_exit(frame.payload)
                return "exit", self.status
            if frame.type == T.STARTED:  # QUERY's answer: the command still runs
                self._same_command(frame.payload, "STARTED")
                continue
            if frame.type == T.ERROR:
                raise _request_error(frame, f"command {self.id}")
            raise _unexpected(frame, f"command {self.id}")

    def _same_command(self, payload: bytes, what: str) -> None:
        """A pid the agent names (STARTED, EXIT since 1.3) must be this command's: a channel
        a later command took over answers QUERY for that command, not for this one."""
        if what == "STARTED":
            pid = as_uint(payload, "pid")
        else:
            tags = tlv_dict(payload)
            if Tag.PID not in tags:
                return  # an agent before 1.3
            pid = as_uint(tags[Tag.PID], "pid")
        if self.pid and pid != self.pid:
            raise ProtocolError(f"command {self.id}: the agent's {what} names pid {pid}, "
                                f"not {self.pid}: the channel now holds another command")

    def events(self) -> Iterator[tuple[str, bytes | ExitStatus]]:
        """("stdout", bytes) / ("stderr", bytes) as produced, then ("exit", ExitStatus)."""
        while self.status is None:
            yield self._next(None)

    def wait(self, timeout: float | None = None) -> tuple[bytes, bytes, ExitStatus]:
        """Collect output until exit; TimeoutError if it takes longer than timeout seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        out: list[bytes] = []
        err: list[bytes] = []
        while self.status is None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            kind, value = self._next(left)
            if kind == "stdout":
                out.append(cast(bytes, value))
            elif kind == "stderr":
                err.append(cast(bytes, value))
        return b"".join(out), b"".join(err), self.status


def _parse_exit(payload: bytes) -> ExitStatus:
    tags = tlv_dict(payload)
    code = as_i32(tags[Tag.CODE]) if Tag.CODE in tags else None
    sig = as_uint(tags[Tag.SIGNAL], "signal") if Tag.SIGNAL in tags else None
    if code is None and sig is None:
        raise ProtocolError("EXIT carries neither CODE nor SIGNAL")
    return ExitStatus(
        code=code,
        signal=sig,
        timed_out=bool(as_uint(tags.get(Tag.TIMED_OUT, b"\0"))),
        core=bool(as_uint(tags.get(Tag.CORE, b"\0"))),
    )


class AgentClient:
    """Host end of one agent channel; thread-safe, one reader thread demultiplexes replies."""

    def __init__(
        self, rfile: IO[bytes], wfile: IO[bytes], *, on_close: Callable[[], None] | None = None
    ) -> None:
        self._r = rfile
        self._w = wfile
        self._on_close = on_close
        self._wlock = threading.Lock()
        self._lock = threading.Lock()
        self._chans: dict[int, _ChanQueue] = {}
        self._hello_q = self._new_queue(0)
        self._hello_seen = False  # (the reader thread's alone)
        self._next_chan = 1
        self._alive = True
        self._closed = False
        self._dead_reason = "agent channel closed"
        self._info: AgentInfo | None = None
        # Errors the agent reported on channel 0 (unknown frame types and the like).
        self.channel_errors: list[tuple[int, str]] = []
        # False once the agent said it does not know PAUSE/RESUME/CANCEL (before 1.2).
        self.flow_control = True
        self._flow_cond = threading.Condition(threading.Lock())
        self._flow_want: dict[int, str] = {}
        self._flow_thread: threading.Thread | None = None
        self._reader = threading.Thread(target=self._read_loop, name="ak-agent-reader", daemon=True)
        self._reader.start()

    @classmethod
    def from_fds(cls, rfd: int, wfd: int) -> AgentClient:
        """Take ownership of two fds (or one bidirectional fd passed twice)."""
        if rfd == wfd:
            wfd = os.dup(wfd)
        rfile = open(rfd, "rb", buffering=0)  # noqa: SIM115 - owned by the client
        wfile = open(wfd, "wb", buffering=0)  # noqa: SIM115
        return cls(cast(BinaryIO, rfile), cast(BinaryIO, wfile))

    @classmethod
    def from_socket(cls, sock: socket.socket) -> AgentClient:
        """Take ownership of a connected stream socket."""

        def shut() -> None:
            with contextlib.suppress(OSError):
                sock.shutdown(2)  # SHUT_RDWR, without importing socket (~3 ms) for it
            sock.close()

        rfile = sock.makefile("rb", buffering=0)
        wfile = sock.makefile("wb", buffering=0)
        return cls(cast(BinaryIO, rfile), cast(BinaryIO, wfile), on_close=shut)

    # ---- plumbing ----

    @property
    def alive(self) -> bool:
        return self._alive

    def _read_exact(self, n: int) -> bytes | None:
        chunks: list[bytes] = []
        while n:
            data = self._r.read(n)
            if not data:
                return None
            chunks.append(data)
            n -= len(data)
        return b"".join(chunks)

    def _read_loop(self) -> None:
        reason = "agent closed the channel"
        try:
            while True:
                head = self._read_exact(HEADER_SIZE)
                if head is None:
                    break
                length, ftype, flags, chan = decode_header(head)
                payload = self._read_exact(length) if length else b""
                if payload is None:
                    reason = "agent channel ended mid-frame"
                    break
                self._deliver(Frame(ftype, chan, payload, flags))
        except ProtocolError as e:
            reason = f"agent sent garbage: {e.message}"
        except (OSError, ValueError) as e:
            reason = f"agent channel failed: {e}"
        with self._lock:
            self._alive = False
            self._dead_reason = reason
            waiters = [*self._chans.values(), self._hello_q]
        for q in waiters:
            q.end()
        with self._flow_cond:
            self._flow_cond.notify_all()

    def _deliver(self, frame: Frame) -> None:
        with self._lock:
            q = self._chans.get(frame.chan)
        if q is not None:
            q.put(frame)
        elif frame.chan == 0 and frame.type == T.HELLO:
            # One per connection: later ones went to a queue nobody reads again, kept for
            # the sandbox's life (1 MiB each, without end: tests/test_redteam7_agent_frames.py).
            if self._hello_seen:
                raise ProtocolError("a second HELLO")
            self._hello_seen = True
            self._hello_q.put(frame)
        elif frame.chan == 0 and frame.type == T.ERROR:
            err, msg, _ = _error_fields(frame)
            if err == errno_mod.EOPNOTSUPP and any(f in msg.encode() for f in _FLOW_FRAMES):
                self.flow_control = False  # an agent before 1.2: HARD_LIMIT still holds
            # (the message cut: 100 of 1 MiB each were 100 MiB kept per sandbox)
            self.channel_errors.append((err, msg[:ERROR_KEPT]))
            del self.channel_errors[:-100]
        # Anything else belongs to a channel nobody waits for any more (late output): drop it.

    def _new_queue(self, chan: int) -> _ChanQueue:
        return _ChanQueue(self._flow, chan)

    def _open_chan(self, chan: int | None = None) -> tuple[int, _ChanQueue]:
        with self._lock:
            if not self._alive:
                raise ProtocolError(self._dead_reason)
            if chan is None:
                while True:
                    chan = self._next_chan
                    self._next_chan = self._next_chan % _MAX_U32 + 1
                    if chan not in self._chans:
                        break
            q = self._chans[chan] = self._new_queue(chan)
        return chan, q

    def _close_chan(self, chan: int) -> None:
        with self._lock:
            q = self._chans.pop(chan, None)
        if q is not None:
            q.close()  # a reader thread waiting for room in it goes on

    def _get(self, q: _ChanQueue, timeout: float | None, what: str) -> Frame:
        try:
            frame = q.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"timed out waiting for {what}") from None
        if frame is None:
            if q.closed:
                raise Cancelled(f"{what}: cancelled")
            raise ProtocolError(f"{self._dead_reason} (while waiting for {what})")
        return frame

    # ---- flow control: sent by a thread of its own, never by the reader or a consumer ----

    def _flow(self, chan: int, action: str) -> None:
        """Ask for PAUSE, RESUME or CANCEL of a channel (coalesced, sent asynchronously).

        The reader thread must never wait for the agent to read (the agent may be waiting
        for us), and a consumer that cancels must not either: a thread of our own sends.
        """
        with self._flow_cond:
            if self._flow_want.get(chan) == "cancel":
                return
            self._flow_want[chan] = action
            if self._flow_thread is None:
                self._flow_thread = threading.Thread(target=self._flow_loop, daemon=True,
                                                     name="ak-agent-flow")
                self._flow_thread.start()
            self._flow_cond.notify_all()

    def _flow_loop(self) -> None:
        while True:
            with self._flow_cond:
                while not self._flow_want and self._alive and not self._closed:
                    self._flow_cond.wait()
                if not self._alive or self._closed:
                    return
                want, self._flow_want = self._flow_want, {}
            for chan, action in want.items():
                try:
                    self._send_flow(chan, action)
                except ProtocolError:
                    return

    def _send_flow(self, chan: int, action: str) -> None:
        if action == "cancel":
            if self.flow_control:
                self._send(T.CANCEL, chan)
            self._send(T.SIGNAL, chan, u32(9))  # an agent before 1.2 (harmless after CANCEL)
        elif self.flow_control:
            with self._lock:
                open_ = chan in self._chans
            if open_ or action == "resume":
                self._send(T.PAUSE if action == "pause" else T.RESUME, chan)

    def cancel(self, chan: int) -> None:
        """Forget a channel: its waiters raise Cancelled, its frames are dropped, and the agent
        is told to kill its command or drop its transfer."""
        self._close_chan(chan)
        if self._alive and not self._closed:
            self._flow(chan, "cancel")

    def queued_bytes(self) -> int:
        """Output bytes waiting in every channel's queue (for tests and status)."""
        with self._lock:
            queues = list(self._chans.values())
        return sum(q.bytes for q in queues)

    def _send(self, ftype: int, chan: int, payload: bytes | memoryview = b"") -> None:
        header = len(payload).to_bytes(4, "little") + ftype.to_bytes(2, "little")
        header += b"\0\0" + chan.to_bytes(4, "little")
        # A small frame goes in one write: one syscall, one wake-up of the agent.
        parts = (header + payload,) if len(payload) <= _ONE_WRITE else (header, payload)
        with self._wlock:
            if not self._alive or self._closed:
                raise ProtocolError(self._dead_reason)
            try:
                for part in parts:
                    view = memoryview(part)
                    while view:
                        n = self._w.write(view)
                        if n is None:
                            raise ProtocolError("agent channel is non-blocking")
                        view = view[n:]
                self._w.flush()  # a no-op for raw files; saves buffered ones from stalling
            except OSError as e:
                raise ProtocolError(f"cannot write to agent: {e}") from e

    def _request(self, ftype: int, payload: bytes, what: str) -> tuple[int, _ChanQueue]:
        chan, q = self._open_chan()
        try:
            self._send(ftype, chan, payload)
        except BaseException:
            self._close_chan(chan)
            raise
        return chan, q

    def _simple(self, ftype: int, payload: bytes, what: str) -> Frame:
        """One request, one reply (OK/STAT_RESULT/...); raises on ERROR."""
        chan, q = self._request(ftype, payload, what)
        try:
            frame = self._get(q, None, what)
        finally:
            self._close_chan(chan)
        if frame.type == T.ERROR:
            raise _request_error(frame, what)
        return frame

    # ---- API ----

    def hello(self, timeout: float = 10.0) -> AgentInfo:
        """Wait for the agent's HELLO."""
        if self._info is not None:
            return self._info
        try:
            frame = self._get(self._hello_q, timeout, "agent HELLO")
        except TimeoutError:
            raise ProtocolError(f"agent sent no HELLO within {timeout} s") from None
        try:
            tags = tlv_dict(frame.payload)
            info = AgentInfo(
                version=as_uint(tags[Tag.VERSION]),
                pid=as_uint(tags[Tag.PID]),
                name=as_str(tags.get(Tag.AGENT_NAME, b"")),
                uid=as_uint(tags[Tag.AGENT_UID]),
                features=as_uint(tags[Tag.FEATURES]) if Tag.FEATURES in tags else 0,
            )
        except KeyError as e:
            raise ProtocolError(f"HELLO lacks tag {e}") from None
        if info.version != 1:
            raise ProtocolError(f"agent speaks protocol v{info.version}, this host speaks v1")
        self._info = info
        return info

    @property
    def answers_query(self) -> bool:
        """Whether the agent announced QUERY in its HELLO (revision 1.3)."""
        return self._info is not None and bool(self._info.features & FEATURE_QUERY)

    def ping(self, timeout: float = 5.0) -> float:
        """Round trip time in seconds."""
        token = os.urandom(8)
        start = time.monotonic()
        chan, q = self._request(T.PING, token, "ping")
        try:
            frame = self._get(q, timeout, "PONG")
        except TimeoutError:
            raise ProtocolError(f"agent did not answer a ping within {timeout} s") from None
        finally:
            self._close_chan(chan)
        if frame.type != T.PONG or frame.payload != token:
            raise ProtocolError("agent answered a ping with something else")
        assert len(token) <= MAX_PING
        return time.monotonic() - start

    def exec(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        timeout: float | None = None,
        stdin: bool = False,
        pty: tuple[int, int] | None = None,
        rlimits: Sequence[tuple[int, int, int]] = (),
        umask: int | None = None,
        given_stdio: bool = False,
        sent: Callable[[], None] | None = None,
    ) -> Execution:
        """Start a command. env is the complete environment (None = empty). With
        `given_stdio` its stdin and stdout are the descriptor the agent was started with
        (`--give`; once): its output never comes through this channel. `sent`: called
        once the request is on its way, before its answer is awaited (work beside the
        command's start: daemon/runs sends a run's grant there)."""
        timeout_ms = 0
        if timeout is not None:
            if timeout <= 0:
                raise ValueError("timeout must be positive")
            timeout_ms = min(_MAX_U32, max(1, math.ceil(timeout * 1000)))
        payload = encode_exec(
            argv,
            env=list(env.items()) if env is not None else None,
            cwd=cwd,
            uid=uid,
            gid=gid,
            timeout_ms=timeout_ms,
            stdin=stdin,
            pty=pty,
            rlimits=rlimits,
            umask=umask,
            given_stdio=given_stdio,
        )
        for _ in range(16):
            chan, q = self._request(T.EXEC, payload, "exec")
            if sent is not None:
                then: Callable[[], None] = sent
                sent = None  # (once: a retry under another id is the same start)
                try:
                    then()
                except BaseException:
                    self._close_chan(chan)
                    raise
            frame = self._get(q, None, "exec reply")
            while frame.type in _STRAY_OUTPUT:
                # Output of a command an earlier connection started under this id (replayed
                # by a reconnecting agent): ours is refused with EBUSY after it.
                frame = self._get(q, None, "exec reply")
            if frame.type == T.STARTED and len(frame.payload) == 4:
                return Execution(self, chan, q, as_uint(frame.payload),
                                 has_stdin=(stdin or pty is not None) and not given_stdio)
            self._close_chan(chan)
            if frame.type != T.ERROR:
                raise _unexpected(frame, "exec")
            err, msg, stage = _error_fields(frame)
            if err == errno_mod.EBUSY and stage is None:
                continue  # id still held by a command of an earlier connection: take another
            cmd = argv[0]
            if stage == "exec" and err == errno_mod.ENOENT:
                raise CommandNotFound(f"{cmd}: command not found", err)
            if stage == "exec" and err in _NOT_EXECUTABLE:
                raise CommandNotExecutable(f"{cmd}: cannot execute: {os.strerror(err)}", err)
            raise AgentRequestError(f"{cmd}: {msg}", err)
        raise AgentRequestError("exec: no free channel id", errno_mod.EBUSY)

    def read_file_to(
        self, path: str, out: IO[bytes], *, offset: int | None = None, length: int | None = None,
        max_bytes: int | None = None,
    ) -> int:
        """Stream a regular file from the sandbox into out; returns the byte count.

        `max_bytes`: a file with more (from `offset`) is refused with TooLarge; what was
        written to `out` by then is the caller's to discard.
        """
        items = [(Tag.PATH.value, path_bytes(path))]
        if offset is not None:
            items.append((Tag.OFFSET.value, u64(offset)))
        if max_bytes is not None:
            # One byte more than allowed tells "too large" from "exactly the cap".
            length = max_bytes + 1 if length is None else min(length, max_bytes + 1)
        if length is not None:
            items.append((Tag.LENGTH.value, u64(length)))
        what = f"read {path}"
        chan, q = self._request(T.FILE_READ, encode_tlvs(items), what)
        total = 0
        ended = False  # the agent finished the transfer (FILE_END or ERROR)
        try:
            while True:
                frame = self._get(q, None, what)
                if frame.type == T.FILE_DATA:
                    total += len(frame.payload)
                    if max_bytes is not None and total > max_bytes:
                        raise TooLarge(f"{path} is larger than the {max_bytes}-byte limit")
                    out.write(frame.payload)
                elif frame.type == T.FILE_END:
                    ended = True
                    size = as_uint(tlv_dict(frame.payload).get(Tag.SIZE, u64(total)))
                    if size != total:
                        raise ProtocolError(f"{what}: agent sent {total} bytes, announced {size}")
                    return total
                elif frame.type == T.ERROR:
                    ended = True
                    raise _request_error(frame, what)
                else:
                    raise _unexpected(frame, what)
        except BaseException:
            if not ended:
                self.cancel(chan)  # the agent stops reading the file for nobody
            raise
        finally:
            self._close_chan(chan)

    def read_file(self, path: str, max_bytes: int | None = None) -> bytes:
        chunks: list[bytes] = []

        class _Sink:
            def write(self, b: bytes) -> int:
                chunks.append(b)
                return len(b)

        self.read_file_to(path, cast(BinaryIO, _Sink()), max_bytes=max_bytes)
        return b"".join(chunks)

    def write_file(
        self,
        path: str,
        data: bytes | IO[bytes],
        *,
        mode: int = 0o644,
        append: bool = False,
        mkdirs: bool = False,
    ) -> int:
        """Write (atomically unless append) a file in the sandbox; returns the byte count."""
        payload = encode_tlvs(
            [
                (Tag.PATH, path_bytes(path)),
                (Tag.MODE, u32(mode)),
                (Tag.APPEND, u8(int(append))),
                (Tag.MKDIRS, u8(int(mkdirs))),
            ]
        )
        what = f"write {path}"
        chan, q = self._request(T.FILE_WRITE, payload, what)
        try:
            frame = self._get(q, None, what)
            if frame.type == T.ERROR:
                raise _request_error(frame, what)
            if frame.type != T.OK:
                raise _unexpected(frame, what)
            try:
                self._send_chunks(chan, data)
            except BaseException:
                self.cancel(chan)  # the agent drops the temporary file, frees the transfer
                raise
            self._send(T.FILE_CLOSE, chan)
            frame = self._get(q, None, what)
            if frame.type == T.ERROR:
                raise _request_error(frame, what)
            if frame.type != T.OK:
                raise _unexpected(frame, what)
            return as_uint(tlv_dict(frame.payload).get(Tag.SIZE, u64(0)))
        finally:
            self._close_chan(chan)

    def _send_chunks(self, chan: int, data: bytes | IO[bytes]) -> None:
        if isinstance(data, bytes | bytearray | memoryview):
            view = memoryview(data)
            for i in range(0, len(view), FILE_CHUNK):
                self._send(T.FILE_CHUNK, chan, view[i : i + FILE_CHUNK])
        else:
            while chunk := data.read(FILE_CHUNK):
                self._send(T.FILE_CHUNK, chan, chunk)

    def stat(self, path: str, follow: bool = True) -> FileStat:
        payload = encode_tlvs([(Tag.PATH, path_bytes(path)), (Tag.FOLLOW, u8(int(follow)))])
        frame = self._simple(T.STAT, payload, f"stat {path}")
        if frame.type != T.STAT_RESULT:
            raise _unexpected(frame, "stat")
        tags = tlv_dict(frame.payload)
        try:
            return FileStat(
                type=FILE_TYPES.get(as_uint(tags[Tag.TYPE]), "other"),
                mode=as_uint(tags[Tag.ST_MODE]),
                size=as_uint(tags[Tag.ST_SIZE]),
                mtime_ns=as_uint(tags[Tag.MTIME_NS]),
                uid=as_uint(tags[Tag.ST_UID]),
                gid=as_uint(tags[Tag.ST_GID]),
                link_target=as_str(tags[Tag.LINK_TARGET]) if Tag.LINK_TARGET in tags else None,
            )
        except KeyError as e:
            raise ProtocolError(f"STAT_RESULT lacks tag {e}") from None

    def list_dir(self, path: str) -> list[DirEntry]:
        what = f"list {path}"
        chan, q = self._request(T.LIST, encode_tlvs([(Tag.PATH, path_bytes(path))]), what)
        entries: list[DirEntry] = []
        try:
            while True:
                frame = self._get(q, None, what)
                if frame.type == T.OK:
                    return entries
                if frame.type == T.ERROR:
                    raise _request_error(frame, what)
                if frame.type != T.LIST_RESULT:
                    raise _unexpected(frame, what)
                entries.extend(_parse_entries(frame.payload))
        finally:
            self._close_chan(chan)

    def mkdir(self, path: str, mode: int = 0o755, parents: bool = False) -> None:
        payload = encode_tlvs(
            [(Tag.PATH, path_bytes(path)), (Tag.MODE, u32(mode)), (Tag.PARENTS, u8(int(parents)))]
        )
        self._simple(T.MKDIR, payload, f"mkdir {path}")

    def remove(self, path: str, recursive: bool = False) -> None:
        payload = encode_tlvs([(Tag.PATH, path_bytes(path)), (Tag.RECURSIVE, u8(int(recursive)))])
        self._simple(T.REMOVE, payload, f"remove {path}")

    def clone_init(self, *, hostname: str | None = None, wallclock_ns: int | None = None,
                   disks: Sequence[tuple[str, str, bool]] = (), entropy_bytes: int = 64,
                   timeout: float = 30.0) -> AgentInfo:
        """CLONE: make a VM restored from a snapshot its own machine (fresh entropy from the
        host's CSPRNG, host name, wall clock, its own disks). The agent greets with a new
        HELLO before it answers; returns what that HELLO says."""
        payload = encode_clone(os.urandom(entropy_bytes), hostname=hostname,
                               wallclock_ns=wallclock_ns, disks=disks)
        self._info = None
        chan, q = self._request(T.CLONE, payload, "clone")
        try:
            frame = self._get(q, timeout, "clone")
        finally:
            self._close_chan(chan)
        if frame.type == T.ERROR:
            raise _request_error(frame, "clone")
        if frame.type != T.OK:
            raise _unexpected(frame, "clone")
        return self.hello(timeout=0.1)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Ask the agent to kill everything and exit; returns once it answered or hung up."""
        try:
            _, q = self._open_chan(0)
        except ProtocolError:
            return
        try:
            self._send(T.SHUTDOWN, 0)
            self._get(q, timeout, "shutdown")
        except (ProtocolError, TimeoutError):
            pass
        finally:
            self._close_chan(0)

    def close(self) -> None:
        """Hang up: a non-listening agent then kills its processes and exits."""
        with self._wlock:
            if self._closed:
                return
            self._closed = True
        with self._flow_cond:
            self._flow_cond.notify_all()
        with self._lock:
            queues = list(self._chans.values())
        for q in queues:
            q.close()  # a reader thread waiting for room goes on, and sees the hang-up
        if self._on_close is not None:
            self._on_close()
        for f in (self._w, self._r):
            if f is self._r:
                # The reader sees EOF once the agent is gone; do not yank its fd from under it.
                self._reader.join(timeout=5.0)
                if self._reader.is_alive():
                    continue
            with contextlib.suppress(OSError):
                f.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse_entries(payload: bytes) -> list[DirEntry]:
    entries: list[DirEntry] = []
    cur: dict[int, bytes] = {}

    def flush() -> None:
        if Tag.NAME in cur:
            entries.append(
                DirEntry(
                    name=as_str(cur[Tag.NAME]),
                    type=FILE_TYPES.get(as_uint(cur.get(Tag.TYPE, b"\4")), "other"),
                    size=as_uint(cur.get(Tag.ST_SIZE, u64(0))),
                    mode=as_uint(cur.get(Tag.ST_MODE, u32(0))),
                )
            )

    for tag, value in decode_tlvs(payload):
        if tag == Tag.NAME:
            flush()
            cur = {}
        cur[tag] = value
    flush()
    return entries
