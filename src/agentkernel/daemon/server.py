"""The daemon process: a unix socket (0600, unsandboxed same-uid peers) speaking JSON lines."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from ..errors import (
    AgentKernelError,
    AgentRequestError,
    Busy,
    UsageError,
    as_agentkernel_error,
)
from ..paths import API_SOCKET, DAEMON_SOCKET, listen_unix, runtime_dir
from ..peer import refusal
from .api import CreateRequest, ExecRequest, ExecResult, RunRequest, to_json
from .common import WrongDaemon
from .handles import ExecHandle, failed_start
from .manager import SandboxManager

if typing.TYPE_CHECKING:
    from ..http.serve import RunningServer, ServeOptions

LOCK_NAME = "daemon.lock"
# One request line: a cp chunk (256 KiB, up to 6 JSON bytes per byte) fits; every connection
# may hold one, so this times max_connections bounds what requests can make us buffer.
MAX_LINE = 2 * 1024 * 1024
TOO_DEEP = "a request must be one line of JSON: it nests too deeply"
REQUEST_TIMEOUT = 30.0  # a connection that sends no request in this long is answered and closed
IDLE_CONN_THREADS = 4  # threads kept waiting for the next connection
HELD_BYTES = 64 * 1024  # output a stream holds back at most, to send it in one write
# A command's `started` line waits this long for its first output or its end, to go with
# it in one write (a short command: one write, one wake-up of the client, for all of it).
START_HOLD = 0.005

# Plain request/response operations: op -> (manager method, how to build its arguments).
_SIMPLE = {
    "get", "get_by_uuid", "list_sandboxes", "start", "stop", "remove", "extend",
    "detached_list", "detached_status", "detached_logs", "detached_kill", "logs",
    "read_file", "write_file", "delete_file", "stat_file", "snapshot", "snapshots",
    "get_snapshot", "delete_snapshot", "restore_snapshot", "backends", "pool_status",
    "agent_keys",
    "egress_log",
}




def error_json(exc: BaseException) -> dict[str, Any]:
    """Any failure as the error reply a client gets (mapped through errors.py)."""
    err = as_agentkernel_error(exc)
    kind = type(err).__name__ if err is exc or type(err) is not AgentKernelError \
        else "InternalError"
    return {"type": kind, "message": err.message, "exit_code": err.exit_code,
            "http_status": err.http_status}


class ClientGone(Exception):
    """The client's end of the socket failed or closed: nobody is left to answer."""


class _Conn:
    """One client connection: line reader and a locked line writer.

    Failures of this socket raise ClientGone, so that they are never mistaken for the
    daemon's own errors (those are answered).
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.rfile: IO[bytes] = sock.makefile("rb")
        self._wlock = threading.Lock()

    def send(self, obj: dict[str, Any]) -> None:
        self.send_all([obj])

    def send_all(self, objs: list[dict[str, Any]]) -> None:
        """Lines in one write."""
        data = "".join(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"
                       for obj in objs).encode()
        try:
            with self._wlock:
                self.sock.sendall(data)
        except OSError as exc:
            raise ClientGone(str(exc)) from None

    def recv(self) -> dict[str, Any] | None:
        try:
            line = self.rfile.readline(MAX_LINE + 1)
        except TimeoutError:
            raise
        except (OSError, ValueError) as exc:
            raise ClientGone(str(exc)) from None
        if not line:
            return None
        if len(line) > MAX_LINE or not line.endswith(b"\n"):
            raise UsageError(f"request line too long (at most {MAX_LINE} bytes)")
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise UsageError(f"a request must be one line of JSON: {exc}") from None
        except RecursionError:  # `[[[[…` deeper than the parser goes: the client's mistake
            raise UsageError(TOO_DEEP) from None
        if not isinstance(obj, dict):
            raise UsageError("a request must be a JSON object")
        return obj

    def buffered(self) -> bool:
        """Whether the client sent more than its request already (read into our buffer,
        or waiting in the socket), without blocking."""
        try:
            self.sock.setblocking(False)
            try:
                return bool(self.rfile.peek(1))  # type: ignore[attr-defined]
            finally:
                self.sock.setblocking(True)
        except (OSError, ValueError):
            return True  # let the control thread find out what it is

    def gone(self) -> bool:
        """Whether the client closed its end entirely (after a half-close it still waits)."""
        try:
            poller = select.poll()
            poller.register(self.sock, select.POLLIN)  # POLLHUP/POLLERR come regardless
            return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in poller.poll(0))
        except (OSError, ValueError):
            return True

    def close(self) -> None:
        # Shut down first: a control thread blocked reading this socket wakes up (EOF), and
        # the client sees the end of the conversation even while that thread holds it.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.rfile.close()
        with contextlib.suppress(OSError):
            self.sock.close()


class _Acceptors:
    """Threads that each wait in accept() on the listener and serve the connection they
    get themselves: no hand-over from an accepting thread to a serving one (on a VM a
    thread woken after a pause costs a paced request ~0.2 ms; a thread started per
    connection, ~60 us of CPU more). The kernel wakes one waiting thread per connection.
    IDLE_CONN_THREADS wait; the last one to take a connection starts another first, so
    that one always waits (max_connections bounds how many serve); beyond them a thread
    ends after its connection."""

    def __init__(self, listener: socket.socket, handle: Callable[[socket.socket], None],
                 stopped: Callable[[], bool]) -> None:
        self._listener = listener
        self._handle = handle
        self._stopped = stopped
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting in accept

    def start(self) -> None:
        with self._lock:
            for _ in range(IDLE_CONN_THREADS):
                self._spawn()

    def _spawn(self) -> None:
        """Under the lock: one more thread waiting in accept (RuntimeError: none to be
        had; the connections wait in the backlog for one that comes back)."""
        threading.Thread(target=self._run, daemon=True, name="ak-conn").start()
        self._idle += 1

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._stopped() or self._listener.fileno() < 0:
                    with self._lock:
                        self._idle -= 1
                    return
                time.sleep(0.05)  # e.g. out of descriptors: no spin while none come back
                continue
            with self._lock:
                self._idle -= 1
                if not self._idle:
                    with contextlib.suppress(RuntimeError):
                        self._spawn()
            self._handle(conn)
            with self._lock:
                if self._idle >= IDLE_CONN_THREADS:
                    return
                self._idle += 1


class _Watch:
    """One thread that waits for the first control line (or the hang-up) of every
    streaming connection, and only then starts that connection's control thread: most
    commands end before their client says anything, and a thread started per command
    costs each one a start-up hand-over and its CPU. Epoll, one-shot per connection."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[int, Callable[[], None]] = {}
        self._epoll: select.epoll | None = None

    def add(self, fd: int, on_ready: Callable[[], None]) -> None:
        """Call `on_ready` (on the watcher's thread) once `fd` is readable or hung up."""
        with self._lock:
            if self._epoll is None:
                self._epoll = select.epoll()
                threading.Thread(target=self._loop, args=(self._epoll,), daemon=True,
                                 name="ak-conn-watch").start()
            self._waiting[fd] = on_ready
            self._epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT)

    def remove(self, fd: int) -> None:
        """Stop waiting for `fd` (before it is closed: its number may be reused)."""
        with self._lock:
            if self._waiting.pop(fd, None) is not None and self._epoll is not None:
                with contextlib.suppress(OSError):
                    self._epoll.unregister(fd)

    def _loop(self, epoll: select.epoll) -> None:
        while True:
            try:
                events = epoll.poll()
            except InterruptedError:
                continue
            for fd, _ev in events:
                with self._lock:
                    on_ready = self._waiting.pop(fd, None)
                    if on_ready is not None:
                        with contextlib.suppress(OSError):
                            epoll.unregister(fd)
                if on_ready is not None:
                    try:
                        on_ready()
                    except Exception as exc:  # e.g. no thread to be had: it must not end us
                        print(f"agentkernel daemon: control thread: {exc}", file=sys.stderr,
                              flush=True)


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """A request dataclass's fields and their resolved annotations."""
    return typing.get_type_hints(cls)


def _fields(cls: type, args: dict[str, Any]) -> dict[str, Any]:
    """`args` checked against the request class: known fields only, each of its type."""
    hints = _field_types(cls)
    unknown = set(args) - set(hints)
    if unknown:
        raise UsageError(f"unknown field(s): {', '.join(sorted(unknown))}")
    for name, value in args.items():
        if not _conforms(value, hints[name]):
            raise UsageError(f"field {name!r}: expected {_type_name(hints[name])}, "
                             f"got {type(value).__name__}")
    return args


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a decoded JSON value fits a request field's annotation."""
    origin, params = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, p) for p in params)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is bytes:  # sent as latin-1 text
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, params[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _conforms(k, params[0]) and _conforms(v, params[1]) for k, v in value.items())
    if origin is typing.Literal:
        return value in params
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "")


class _SignalWake:
    """The main thread's wait for the daemon's end, woken by signals too. The kernel hands
    a process's SIGTERM to any of its threads that does not block it; Python runs the
    handler only in the main thread, and only once that thread runs bytecode again. A
    daemon with dozens of threads (pool, HTTP, agent channels) whose main thread sat in a
    blocking wait ignored SIGTERM until something else woke it (seen under load: `serve`
    still up 49 minutes after it). The C-level handler writes to this pipe whichever
    thread it ran in (`signal.set_wakeup_fd`), and so does `poke` (shutdown). Only in the
    main thread (where handlers run); elsewhere `wait` says so and the caller waits as
    before."""

    def __init__(self, *, active: bool = True) -> None:
        self._lock = threading.Lock()
        self.fds: tuple[int, int] | None = None
        self.previous = -1
        if not active or threading.current_thread() is not threading.main_thread():
            return
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except (ValueError, OSError):
            os.close(r)
            os.close(w)
            return
        self.fds = (r, w)

    def wait(self) -> bool:
        """Until a signal came or `poke` was called (True; a signal's handler runs as
        this returns), or False at once without a pipe."""
        with self._lock:
            fds = self.fds
        if fds is None:
            return False
        poller = select.poll()
        poller.register(fds[0], select.POLLIN)
        poller.poll()
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(fds[0], 512):
                pass
        return True

    def poke(self) -> None:
        with self._lock:
            if self.fds is not None:
                with contextlib.suppress(OSError):
                    os.write(self.fds[1], b"\0")

    def close(self) -> None:
        with self._lock:
            if self.fds is None:
                return
            with contextlib.suppress(ValueError, OSError):
                signal.set_wakeup_fd(self.previous)
            for fd in self.fds:
                os.close(fd)
            self.fds = None


class DaemonServer:
    """Accepts connections and serves each on its own thread."""

    def __init__(self, manager: SandboxManager, sock_path: Path) -> None:
        self.manager = manager
        self.sock_path = sock_path
        self.started = time.time()
        self._stop = threading.Event()
        self._listener = listen_unix(sock_path, 256)
        self.max_connections = manager.settings.max_connections
        self._active = 0  # connections being served right now
        self._last_active = time.monotonic()
        self._active_lock = threading.Lock()
        self._watch = _Watch()  # streaming connections' control lines
        self._acceptors = _Acceptors(self._listener, self._admit, self._stop.is_set)
        self._wake = _SignalWake(active=False)  # serve_forever's, once it runs
        self.config_path: str | None = None  # the config file this daemon loaded
        # HTTP listeners on TCP: the one `serve` started this daemon with, and those a later
        # `serve` attached (each lives as long as that `serve` holds its connection).
        self.http: list[RunningServer] = []

    def idle_seconds(self) -> float:
        """How long no connection has been open (0 while one is)."""
        with self._active_lock:
            return 0.0 if self._active else time.monotonic() - self._last_active

    def serve_forever(self) -> None:
        wake = self._wake = _SignalWake()  # a stop signal taken by any thread wakes us
        try:
            self._acceptors.start()
            while not self._stop.is_set():
                if not wake.wait():  # no pipe (not the main thread): as before
                    self._stop.wait()
        finally:
            self._stop.set()  # (the acceptors end when accept fails: they must know why)
            wake.close()
            self._close_listener()

    def _admit(self, conn: socket.socket) -> None:
        """Serve a connection just accepted (on the thread that accepted it), or refuse it
        at once beyond max_connections."""
        with self._active_lock:
            full = self._active >= self.max_connections
            self._active += 0 if full else 1
        if full:
            self._refuse(conn)
        else:
            self._serve(conn)

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.poke()
        self._close_listener()

    def _refuse(self, sock: socket.socket) -> None:
        """Answer a connection beyond the limit with an error at once (never queue it)."""
        busy = Busy(f"the daemon is busy: {self.max_connections} requests in progress "
                    "(daemon.max_connections); try again")
        try:
            sock.settimeout(1.0)
            sock.sendall((json.dumps({"ok": False, "error": error_json(busy)}) + "\n").encode())
        except OSError:
            pass
        finally:
            sock.close()

    def _release(self) -> None:
        with self._active_lock:
            self._active -= 1
            self._last_active = time.monotonic()

    def _close_listener(self) -> None:
        with contextlib.suppress(OSError):
            if self.sock_path.is_socket():
                self.sock_path.unlink()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()

    # ---- one connection ----

    def _serve(self, sock: socket.socket) -> None:
        """One connection (counted by the accept loop): every failure is answered."""
        conn = _Conn(sock)
        try:
            why = refusal(sock)  # same uid *and* not in a sandbox (peer.py)
            if why is not None:
                sock.settimeout(2.0)
                with contextlib.suppress(OSError, ValueError, AgentKernelError, ClientGone):
                    conn.recv()  # its request first: hanging up before it sent hides our answer
                conn.send({"ok": False, "error": {"type": "PermissionDenied",
                                                  "message": why,
                                                  "exit_code": 125, "http_status": 403}})
                return
            sock.settimeout(REQUEST_TIMEOUT)  # a connection must not sit on a slot unused
            try:
                req = conn.recv()
            except TimeoutError:
                raise UsageError(f"no request within {REQUEST_TIMEOUT:g} s") from None
            sock.settimeout(None)
            if req is None:
                return
            self._dispatch(conn, req)
        except ClientGone:
            pass  # nobody is left to answer; whatever the request started was cancelled
        except BaseException as exc:
            if not isinstance(exc, AgentKernelError | KeyboardInterrupt | SystemExit):
                print(f"agentkernel daemon: request failed: {type(exc).__name__}: {exc}",
                      file=sys.stderr, flush=True)
            with contextlib.suppress(ClientGone, OSError):
                conn.send({"ok": False, "error": error_json(exc)})
            if not isinstance(exc, Exception):
                raise
        finally:
            conn.close()
            self._release()

    def _dispatch(self, conn: _Conn, req: dict[str, Any]) -> None:
        op = req.get("op")
        args = req.get("args") or {}
        if not isinstance(args, dict):
            raise UsageError("args must be an object")
        m = self.manager
        self._check_data_dir(op, req.get("data_dir"))
        try:
            if op == "ping":
                conn.send({"ok": True, "data": {"pid": os.getpid(), "uid": os.getuid()}})
            elif op == "status":
                conn.send({"ok": True, "data": self._status()})
            elif op == "shutdown":
                conn.send({"ok": True, "data": None})
                threading.Thread(target=self.shutdown, daemon=True).start()
            elif op == "create":
                info, warnings = m.create_warned(CreateRequest(**_fields(CreateRequest, args)))
                self._reply_or_undo(conn, info, {"warnings": warnings})
            elif op == "exec_detached":
                name = args.pop("name", "")
                det = m.exec_detached(str(name), ExecRequest(**_fields(ExecRequest, args)))
                conn.send({"ok": True, "data": to_json(det)})
            elif op == "write_file":
                data = str(args.get("data", "")).encode("latin-1")
                size = m.write_file(str(args.get("name")), str(args.get("path")), data,
                                    int(args.get("mode", 0o644)))
                conn.send({"ok": True, "data": size})
            elif op == "restore_snapshot":
                self._reply_or_undo(conn, m.restore_snapshot(**args))
            elif op in _SIMPLE:
                result = getattr(m, str(op))(**args)
                conn.send({"ok": True, "data": to_json(result)})
            elif op == "exec":
                self._exec(conn, args)
            elif op == "run":
                self._run(conn, args)
            elif op == "cp_in":
                self._cp_in(conn, args)
            elif op == "cp_out":
                self._cp_out(conn, args)
            elif op == "http_attach":
                self._http_attach(conn, args)
            else:
                raise UsageError(f"unknown operation {str(op)[:40]!r}")
        except TypeError as exc:
            raise UsageError(f"bad arguments for {op}: {exc}") from None

    def _check_data_dir(self, op: object, theirs: object) -> None:
        """Refuse a client of another data dir (`SandboxManager.serves`). `run` has its own
        answer (the CLI runs in-process); who we are, and stopping us, stay open to it."""
        if not isinstance(theirs, str) or not theirs or op in ("ping", "status", "shutdown",
                                                                 "run"):
            return
        if not self.manager.serves(theirs):
            raise WrongDaemon(
                f"the daemon on {self.sock_path} serves the data dir {self.manager.root}, "
                f"not yours ({theirs}): give yours its own AGENTKERNEL_RUNTIME_DIR, or stop "
                "that daemon (agentkernel daemon stop)")

    def _reply_or_undo(self, conn: _Conn, info: Any,
                       extra: dict[str, Any] | None = None) -> None:
        """Answer a request that made a sandbox (`extra`: more fields beside its info); if
        its client left meanwhile, nobody knows of the sandbox: it is removed rather than
        left running."""
        try:
            if conn.gone():
                raise ClientGone("the client left before the answer")
            conn.send({"ok": True, "data": {**to_json(info), **(extra or {})}})
        except ClientGone:
            with contextlib.suppress(Exception):
                self.manager.remove(info.name)
            raise

    def _status(self) -> dict[str, Any]:
        rows = self.manager.list_sandboxes()
        with self._active_lock:
            active = self._active
        with self._active_lock:
            http = [api.url for api in self.http]
        return {"pid": os.getpid(), "socket": str(self.sock_path), "http": http,
                "config": self.config_path,
                "uptime_s": round(time.time() - self.started, 1),
                "connections": active, "max_connections": self.max_connections,
                "sandboxes": len(rows),
                "running": sum(1 for r in rows if r.status == "running"),
                "pools": to_json(self.manager.pool_status()),
                "recovered": list(self.manager.recovered)}

    # ---- `serve` attached to this daemon ----

    def _http_attach(self, conn: _Conn, args: dict[str, Any]) -> None:
        """`agentkernel serve` while this daemon runs: the HTTP API on a TCP address, served
        by this daemon's manager (CLI and SDK users share sandboxes and pools), for as long
        as that `serve` keeps this connection open. The options come resolved: the key was
        settled, and a public bind without one refused, by `serve` itself."""
        from ..http.serve import start_in_thread

        options = serve_options(args)
        api = start_in_thread(self.manager, options=options)
        with self._active_lock:
            self.http.append(api)
        print(f"agentkernel daemon: HTTP API on {api.url} for a `serve` (until it ends)",
              file=sys.stderr, flush=True)
        try:
            conn.send({"ok": True, "data": {"url": api.url, "pid": os.getpid()}})
            while conn.recv() is not None:  # nothing is expected; EOF when `serve` ends
                pass
        except (ClientGone, AgentKernelError):
            pass
        finally:
            with self._active_lock:
                self.http.remove(api)
            api.stop()
            print(f"agentkernel daemon: HTTP API on {api.url} closed", file=sys.stderr,
                  flush=True)

    # ---- streaming commands ----

    def _exec(self, conn: _Conn, args: dict[str, Any]) -> None:
        name = str(args.pop("name", ""))
        stdin = bool(args.pop("stdin_open", False))
        tty = args.pop("tty", None)
        pty = (int(tty[0]), int(tty[1])) if isinstance(tty, list) and len(tty) == 2 else None
        req = ExecRequest(**_fields(ExecRequest, args))
        try:
            handle = self.manager.open_exec(name, req, stdin=stdin, pty=pty)
        except AgentRequestError as exc:
            if exc.exit_code not in (126, 127):
                raise
            conn.send({"ev": "exit", "result": _result_json(failed_start(exc))})
            return
        self._stream(conn, handle, hold_start=not stdin)

    def _run(self, conn: _Conn, args: dict[str, Any]) -> None:
        stdin = bool(args.pop("stdin_open", False))
        tty = args.pop("tty", None)
        pty = (int(tty[0]), int(tty[1])) if isinstance(tty, list) and len(tty) == 2 else None
        req = RunRequest(**_fields(RunRequest, args))
        try:
            handle = self.manager.open_run(req, stdin=stdin, pty=pty)
        except AgentRequestError as exc:
            if exc.exit_code not in (126, 127):
                raise
            conn.send({"ev": "exit", "result": _result_json(failed_start(exc))})
            return
        if not stdin:
            handle.close_stdin()
        self._stream(conn, handle, hold_start=not stdin)

    def _stream(self, conn: _Conn, handle: ExecHandle, *, hold_start: bool = False) -> None:
        """Output to the client as it comes; stdin, signals and resizes from it meanwhile.

        Sending blocks while the client does not read, and so does the pump: the agent is
        told to pause the command (back-pressure), nothing piles up here. A client that
        goes away (or stops sending control lines: EOF) takes its command with it. With
        `hold_start` (a command without stdin) `started` may wait START_HOLD to leave
        with the first output or the end.
        """
        done = threading.Event()

        def control() -> None:
            while not done.is_set():
                try:
                    msg = conn.recv()
                    if msg is not None:
                        _control(handle, msg)
                except (ClientGone, AgentKernelError, ValueError, TypeError):
                    msg = None
                if msg is None:
                    if not done.is_set():
                        handle.abort()  # the client went away: so does its command
                    return

        held: list[dict[str, Any]] = []  # output lines not sent yet (see out)
        held_bytes = [0]

        def out(kind: str, data: bytes) -> None:
            # Output whose next event is here already waits for it (up to HELD_BYTES): a
            # short command's output and its exit then go in one write, one wake-up.
            held.append({"ev": "out", "s": 1 if kind == "stdout" else 2,
                         "d": data.decode("latin-1")})
            held_bytes[0] += len(data)
            if held_bytes[0] >= HELD_BYTES or not handle.execution.ready():
                flush()

        def flush() -> None:
            if held:
                conn.send_all(held)
                held.clear()
                held_bytes[0] = 0

        def start_control() -> None:
            if done.is_set():
                return
            try:
                threading.Thread(target=control, daemon=True, name="ak-conn-ctl").start()
            except RuntimeError:  # no thread to be had: nothing would see the client go
                handle.abort()  # away, so its command must not run on unattended
                raise

        fd = conn.sock.fileno()
        try:
            if conn.buffered():
                start_control()  # sent with its request: read already, epoll cannot tell
            else:
                self._watch.add(fd, start_control)  # the thread once the client speaks
            started = {"ev": "started", "pid": handle.execution.pid, "info": handle.info}
            # (Not with stdin: the client forwards it only once `started` came.)
            if hold_start and handle.execution.ready(START_HOLD):
                held.append(started)  # leaves with the command's first output, or its end
            else:
                conn.send(started)
            result = handle.pump(out, collect=False)
        except BaseException:
            handle.abort()  # whatever failed, the command must not run on unattended
            with contextlib.suppress(ClientGone):
                flush()  # what it wrote before, then the error
            raise
        finally:
            done.set()
            self._watch.remove(fd)
        conn.send_all([*held, {"ev": "exit", "result": _result_json(result)}])

    # ---- cp ----

    def _cp_in(self, conn: _Conn, args: dict[str, Any]) -> None:
        class Reader:
            """Feeds write_file from the client's chunk lines."""

            def read(self, _n: int = -1) -> bytes:
                msg = conn.recv()
                if msg is None:  # the agent then drops the temporary file
                    raise ClientGone("the client went away during the copy")
                if msg.get("end"):
                    return b""
                return str(msg.get("d", "")).encode("latin-1")

        size = self.manager.write_file(str(args.get("name")), str(args.get("path")), Reader(),
                                       int(args.get("mode", 0o644)))
        conn.send({"ok": True, "data": size})

    def _cp_out(self, conn: _Conn, args: dict[str, Any]) -> None:
        class Writer:
            def write(self, data: bytes) -> int:
                conn.send({"d": data.decode("latin-1")})
                return len(data)

        size = self.manager.read_file_to(str(args.get("name")), str(args.get("path")), Writer())
        conn.send({"ok": True, "data": size})


def _control(handle: ExecHandle, msg: dict[str, Any]) -> None:
    """One control line of a streaming client: stdin, eof, signal or resize."""
    op = msg.get("op")
    if op == "stdin":
        handle.write_stdin(str(msg.get("d", "")).encode("latin-1"))
    elif op == "eof":
        handle.close_stdin()
    elif op == "signal":
        handle.signal(int(msg.get("sig", signal.SIGTERM)))
    elif op == "resize":
        handle.resize(int(msg.get("rows", 24)), int(msg.get("cols", 80)))


def _result_json(result: ExecResult) -> dict[str, Any]:
    return {"exit_code": result.exit_code, "signal": result.signal,
            "timed_out": result.timed_out, "oom_killed": result.oom_killed,
            "message": result.message, **({"egress": result.egress} if result.egress else {})}


def serve_options(args: dict[str, Any]) -> ServeOptions:
    """`serve`'s resolved options as sent over the daemon socket (see `attach_args`)."""
    from ..http.limits import Limits
    from ..http.serve import ServeOptions

    try:
        limits = Limits(**{k: int(v) for k, v in dict(args.get("limits") or {}).items()})
        return ServeOptions(
            host=str(args["host"]), port=int(args["port"]),
            api_key=str(args["api_key"]) if args.get("api_key") else None,
            insecure_no_key=not args.get("api_key"),
            allowed_hosts=tuple(str(h) for h in args.get("allowed_hosts") or ()),
            limits=limits, resolved=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"bad arguments for http_attach: {exc}") from None


def attach_args(options: ServeOptions) -> dict[str, Any]:
    return {"host": options.host, "port": options.port, "api_key": options.api_key,
            "allowed_hosts": list(options.allowed_hosts),
            "limits": dataclasses.asdict(options.limits)}


def daemon_config_path(path: str | None) -> str | None:
    """The config file a daemon loads: --config, $AGENTKERNEL_DAEMON_CONFIG, or the user
    config file (config.toml, else the older agentkernel.toml beside it) if it exists;
    None for none."""
    from ..paths import LEGACY_DAEMON_CONFIG_NAME, user_config_dir_str, user_config_path_str

    if path:
        return os.path.abspath(path)
    env = os.environ.get("AGENTKERNEL_DAEMON_CONFIG")
    if env:
        return os.path.abspath(env)
    for user in (user_config_path_str(),
                 os.path.join(user_config_dir_str(), LEGACY_DAEMON_CONFIG_NAME)):
        if os.path.isfile(user):
            return user
    return None


def load_daemon_config(path: str | None) -> Any:
    """The daemon's config: --config, $AGENTKERNEL_DAEMON_CONFIG, or the user config file."""
    from ..config import load_config

    chosen = daemon_config_path(path)
    if chosen is None:
        return None
    config, warnings = load_config(Path(chosen))
    for warning in warnings:
        print(f"agentkernel daemon: warning: {warning}", file=sys.stderr, flush=True)
    return config


class DaemonRunning(AgentKernelError):
    """Another daemon holds this runtime or data dir (`serve` attaches to it instead)."""

    exit_code = 1


GC_YOUNG = 20_000  # container objects allocated (net) between young collections (700)


def settle_gc() -> None:
    """Once everything long-lived is loaded (the web stack, the manager): those objects
    leave the collector's generations for good (`gc.freeze`), and young collections run
    less often. A run allocates a few thousand objects and frees nearly all by refcount;
    the collector's passes over the daemon's whole heap cost several per cent of its CPU
    under a stream of runs (bench/bench_pool.py). AGENTKERNEL_GC_DEFAULT=1 keeps Python's
    own settings (to compare)."""
    import gc

    if os.environ.get("AGENTKERNEL_GC_DEFAULT") == "1":
        return
    gc.collect()
    gc.freeze()
    _young, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG, older, oldest)


def run_daemon(config_path: str | None = None, http: ServeOptions | None = None,
               idle_exit: float = 0.0) -> int:
    """The daemon's main: lock, recover, listen, serve until told to stop.

    With `http` (address, key, ...) it also serves the REST API of the official SDKs, on a thread
    of this process, so that one manager owns every sandbox (`agentkernel serve`).
    With `idle_exit` (a daemon `run` started by itself) it keeps no configured pools unless
    a daemon config exists, and stops once nothing has used it for that many seconds while
    it holds nothing a user owns (kept sandboxes, detached commands).
    """
    from ..paths import data_dir

    config = load_daemon_config(config_path)
    if http is not None:
        # The key is settled (or a public bind without one refused) before anything starts.
        http = http.with_config(config.api if config is not None else None)

    rt = runtime_dir()
    data = data_dir()
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    # One daemon per socket and one per state database: either lock taken means another
    # daemon owns them (a second one would tear down the first one's pool as "leftovers").
    locks: list[IO[str]] = []
    for where in (rt, data):
        lock_file = open(where / LOCK_NAME, "a+")  # noqa: SIM115 - held while we run
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock_file.close()
            for held in locks:
                held.close()
            raise DaemonRunning(f"another daemon holds {where / LOCK_NAME}") from None
        locks.append(lock_file)
    if config is not None:
        from ..vm.settings import configure

        configure(config.microvm)  # e.g. allow_emulation, for microVMs the daemon starts
    # A daemon `run` started keeps configured pools only if a [daemon] section asks for
    # them: a user config that only names a registry mirror should not warm sandboxes.
    asked = config is not None and "daemon" in config.model_fields_set
    manager = SandboxManager(config, configured_pools=asked or idle_exit <= 0)
    for line in manager.recovered:
        print(f"agentkernel daemon: {line}", file=sys.stderr, flush=True)
    # Stop signals are ours before the pid is out: one that comes before the socket is
    # served (the default action would leave daemon.sock and daemon.pid behind) stops it
    # as soon as it exists, the same clean way as later.
    serving: list[DaemonServer] = []
    stop_asked = threading.Event()

    def on_signal(_signo: int, _frame: object) -> None:
        stop_asked.set()
        for srv in serving:
            threading.Thread(target=srv.shutdown, daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    # The pid is there before the socket: whoever sees the socket may read it at once.
    pid_tmp = rt / f".daemon.pid.{os.getpid()}"
    pid_tmp.write_text(f"{os.getpid()}\n")
    pid_tmp.replace(rt / "daemon.pid")
    try:
        server = DaemonServer(manager, rt / DAEMON_SOCKET)
    except BaseException:
        with contextlib.suppress(OSError):
            (rt / "daemon.pid").unlink()
        raise
    server.config_path = daemon_config_path(config_path)
    serving.append(server)
    if stop_asked.is_set():
        server.shutdown()
    if http is not None:
        from ..http.serve import describe, start_in_thread

        api = start_in_thread(manager, options=http)
        server.http.append(api)
        print(f"agentkernel: {describe(api.url, http)}", file=sys.stderr, flush=True)
    uds_api: list[Any] = []

    def start_uds_api() -> None:
        # Our client's default way in (the official SDKs' API on a unix socket). Loading
        # the web stack takes most of a second: a thread, so the CLI socket is not delayed.
        from ..http.serve import start_uds_in_thread

        try:
            uds_api.append(start_uds_in_thread(manager, str(rt / API_SOCKET)))
        except Exception as exc:
            print(f"agentkernel daemon: no API socket: {exc}", file=sys.stderr, flush=True)
        settle_gc()

    threading.Thread(target=start_uds_api, name="ak-api-start", daemon=True).start()

    if idle_exit > 0:
        threading.Thread(target=_stop_when_idle, args=(server, manager, idle_exit),
                         name="ak-idle", daemon=True).start()
    print(f"agentkernel daemon: listening on {server.sock_path} (pid {os.getpid()})",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        for running_api in list(server.http):  # ours and those attached by a `serve`
            running_api.stop()
        for running in uds_api:
            running.stop()
        with contextlib.suppress(OSError):
            (rt / API_SOCKET).unlink()
        manager.close()
        with contextlib.suppress(OSError):
            (rt / "daemon.pid").unlink()
        for held in locks:
            held.close()
    print("agentkernel daemon: stopped", file=sys.stderr, flush=True)
    return 0


def _stop_when_idle(server: DaemonServer, manager: SandboxManager, idle_exit: float) -> None:
    while True:
        time.sleep(min(5.0, max(0.2, idle_exit / 4)))
        if server.idle_seconds() >= idle_exit and not manager.holds_user_state():
            print(f"agentkernel daemon: unused for {idle_exit:g} s: stopping",
                  file=sys.stderr, flush=True)
            server.shutdown()
            return
