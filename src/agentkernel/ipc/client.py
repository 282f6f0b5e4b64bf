"""The CLI's side of the daemon socket: JSON lines through `wire` (C parts only), nothing heavy."""

from __future__ import annotations

import os
import sys
import time

from ..errors import AgentKernelError
from ..paths import api_socket_path, daemon_socket, data_dir_str, runtime_dir_str
from ..peercred import PeerCredError, peer_cred
from . import wire

TYPE_CHECKING = False  # typing costs milliseconds on the hot path; mypy still sees it
if TYPE_CHECKING:
    import subprocess
    from typing import Any

START_TIMEOUT = 30.0


class DaemonError(AgentKernelError):
    """An error the daemon reported (or failure to reach it), with the CLI exit code.

    The daemon sends its error's kind and exit code; this one class carries them (mapping
    back to the exact subclass would cost the hot path importing more).
    """

    def __init__(self, message: str, exit_code: int = 125, kind: str = "DaemonError") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.kind = kind


def socket_path() -> str:
    return daemon_socket()


def api_socket(timeout: float = 30.0) -> str:
    """The daemon's API socket, starting the daemon if none runs (our client's default)."""
    path = api_socket_path()
    if not os.path.exists(path):
        sock = connect(auto_start=True)
        if sock is not None:
            sock.close()
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise DaemonError(f"the daemon's API socket {path} did not appear")
            time.sleep(0.02)
    sock = _try_connect(path)  # DaemonError if another user serves it (see there)
    if sock is not None:
        sock.close()
    return path


def connect(*, auto_start: bool = False) -> Any:
    """A connection to the daemon, or None if none runs (and auto_start is off)."""
    path = socket_path()
    sock = _try_connect(path)
    if sock is not None or not auto_start:
        return sock
    start_daemon()
    sock = _try_connect(path)
    if sock is None:
        raise DaemonError(f"the daemon did not come up (socket {path})")
    return sock


def _try_connect(path: str) -> Any:
    """A connection to the daemon at `path`, None if nothing listens there; DaemonError if
    what listens is another user's (a runtime dir from the environment, kept by `sudo -E`,
    can name anyone's: our request, its caller_env and an agent's key would be theirs)."""
    sock = wire.unix_socket()
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    why = not_yours(sock, path)
    if why is not None:
        sock.close()
        raise DaemonError(why)
    return sock


def not_yours(sock: Any, path: str) -> str | None:
    """Why the peer of the connected `sock` (at `path`) is not a server of this user's,
    or None: its uid as SO_PEERCRED reports it on this very connection."""
    try:
        uid = peer_cred(sock).uid
    except PeerCredError as exc:
        return f"cannot check who serves {path}: {exc}"
    if uid != os.geteuid():
        return (f"{path} is served by uid {uid}, not by you: refusing it "
                "(check AGENTKERNEL_RUNTIME_DIR / XDG_RUNTIME_DIR)")
    return None


def spawn_daemon(idle_exit: float) -> bool:
    """Start a daemon that stops after `idle_exit` s unused, without waiting for it.

    False if one already runs or its socket exists, or if the last attempt was under a
    minute ago (a daemon that cannot start here must not cost every run a failed start).
    Two racing CLIs are fine: the daemon's lock lets one win; the other exits at once.
    """
    if os.path.exists(socket_path()):
        return False
    rt = runtime_dir_str()
    os.makedirs(rt, mode=0o700, exist_ok=True)
    stamp = os.path.join(rt, "daemon.autostart")
    try:
        if time.time() - os.stat(stamp).st_mtime < 60:
            return False
    except OSError:
        pass
    with open(stamp, "w") as f:  # its mtime is the attempt's time
        proc = _launch_daemon(["--idle-exit", f"{idle_exit:g}"])
        f.write(f"{proc.pid}\n")  # (`daemon stop` waits for a daemon on its way up)
    return True


def _daemon_log() -> str:
    return os.path.join(data_dir_str(), "daemon.log")


def _launch_daemon(extra: list[str]) -> subprocess.Popen[bytes]:
    """`python -m agentkernel daemon start --foreground EXTRA` in a session of its own,
    its output appended to the data dir's daemon.log."""
    import subprocess

    os.makedirs(runtime_dir_str(), mode=0o700, exist_ok=True)
    os.makedirs(data_dir_str(), mode=0o700, exist_ok=True)
    argv = [sys.executable, "-P", "-m", "agentkernel", "daemon", "start", "--foreground",
            *extra]  # -P: nothing imported from the current directory (cwd is / anyway)
    # 0600: the daemon's messages (paths, commands that failed) are for this user only.
    fd = os.open(_daemon_log(), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    with open(fd, "ab") as log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, close_fds=True, cwd="/")


def start_daemon(config: str | None = None, timeout: float = START_TIMEOUT) -> int:
    """Spawn `python -m agentkernel daemon start --foreground` detached; wait for its socket.

    Returns the daemon's pid. A daemon that is already up (or wins a start race) is fine.
    """
    proc = _launch_daemon(["--config", os.path.abspath(config)] if config else [])
    path = socket_path()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock = _try_connect(path)
        if sock is not None:
            try:
                data = _request(sock, "ping", {})
                return int(data.get("pid", proc.pid)) if isinstance(data, dict) else proc.pid
            except DaemonError:
                pass
        if proc.poll() is not None and proc.returncode != 0:
            # Lost a start race (the lock is held): the winner's socket appears shortly.
            sock = _wait_socket(path, min(deadline, time.monotonic() + 3))
            if sock is not None:
                sock.close()
                return 0
            raise DaemonError(f"the daemon exited with status {proc.returncode}; "
                              f"see {_daemon_log()}")
        time.sleep(0.01)
    raise DaemonError(f"the daemon did not come up within {timeout:g}s; "
                      f"see {_daemon_log()}")


def _wait_socket(path: str, deadline: float) -> Any:
    while time.monotonic() < deadline:
        sock = _try_connect(path)
        if sock is not None:
            return sock
        time.sleep(0.02)
    return None


class Lines:
    """JSON lines over a connected socket."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self._buf = b""

    def send(self, obj: dict[str, Any]) -> None:
        self.sock.sendall((wire.dumps(obj) + "\n").encode())

    def recv(self) -> dict[str, Any] | None:
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line, self._buf = self._buf[:i], self._buf[i + 1 :]
                obj = wire.loads(line)
                return obj if isinstance(obj, dict) else None
            chunk = self.sock.recv(262144)
            if not chunk:
                return None
            self._buf += chunk

    def pending(self) -> bool:
        return b"\n" in self._buf


def _raise(reply: dict[str, Any] | None) -> None:
    if reply is None:
        raise DaemonError("the daemon closed the connection")
    err = reply.get("error") or {}
    raise DaemonError(str(err.get("message", "daemon error")), int(err.get("exit_code", 125)),
                      str(err.get("type", "DaemonError")))


def _send_request(lines: Lines, op: str, args: dict[str, Any]) -> None:
    """Send the request line; a daemon that refused us (busy) may have answered and hung
    up before it was sent: its answer is the error then."""
    try:
        # data_dir: a daemon of another data dir refuses everything but `run`'s own answer
        lines.send({"op": op, "args": args, "data_dir": data_dir_str()})
    except OSError as exc:
        try:
            reply = lines.recv()
        except (OSError, ValueError):
            reply = None
        if reply is not None and reply.get("ok") is False:
            _raise(reply)
        raise DaemonError(f"the daemon closed the connection ({exc.strerror})") from None


def _request(sock: Any, op: str, args: dict[str, Any]) -> Any:
    lines = Lines(sock)
    try:
        _send_request(lines, op, args)
        reply = lines.recv()
    finally:
        sock.close()
    if reply is None or not reply.get("ok"):
        _raise(reply)
    assert reply is not None
    return reply.get("data")


def call(op: str, args: dict[str, Any] | None = None, *, auto_start: bool = True) -> Any:
    """One request, one answer; raises DaemonError with the daemon's message."""
    sock = connect(auto_start=auto_start)
    if sock is None:
        raise DaemonError("the daemon is not running (agentkernel daemon start)")
    return _request(sock, op, args or {})


def open_stream(op: str, args: dict[str, Any], *, auto_start: bool) -> Lines | None:
    """Send a streaming request (exec, run, cp); None when no daemon runs."""
    sock = connect(auto_start=auto_start)
    if sock is None:
        return None
    lines = Lines(sock)
    try:
        _send_request(lines, op, args)
    except BaseException:
        sock.close()
        raise
    return lines


FORWARDED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def pump(
    lines: Lines,
    *,
    stdin_fd: int | None = None,
    tty: bool = False,
    sink: Any = None,
    on_started: Any = None,
) -> dict[str, Any]:
    """Drive a streaming exec/run to its end and return its result.

    Output goes to fds 1/2 as it arrives (or to `sink(stream, bytes)`); stdin_fd, if given,
    is forwarded; Ctrl-C and friends are forwarded as signals (with a tty, as keystrokes);
    with a tty, window size changes are forwarded too.
    """
    import select

    first = lines.recv()
    if first is None:
        raise DaemonError("the daemon closed the connection")
    if first.get("ok") is False:
        _raise(first)
    if first.get("ev") == "exit":
        return dict(first.get("result") or {})
    if on_started is not None:
        on_started(first.get("info") or {})
    previous: dict[int, Any] = {}

    # Handlers only note what came: one runs between any two bytecodes of this thread, also
    # inside a send of its own (stdin's), whose line its own would cut in two. The wakeup
    # byte (below) brings the loop round to send them.
    signals: list[int] = []

    def forward(signo: int, _frame: object) -> None:
        signals.append(int(signo))

    def winch(_signo: int, _frame: object) -> None:
        signals.append(0)  # (0: the window's size changed)

    # A signal that comes just before select() blocks would wait for the next event: its
    # wakeup byte on this pipe wakes select() instead (the handler runs right after).
    wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_wakeup: int | None = None
    try:
        if not tty:
            for name in FORWARDED_SIGNALS:
                sig = wire.signal_number(name)
                previous[sig] = wire.set_handler(sig, forward)
        else:
            sig = wire.signal_number("SIGWINCH")
            previous[sig] = wire.set_handler(sig, winch)
        old_wakeup = wire.set_wakeup_fd(wake[1])
    except ValueError:  # not the main thread
        pass
    sock = lines.sock
    watch: list[Any] = [sock, wake[0]] if stdin_fd is None else [sock, wake[0], stdin_fd]
    try:
        while True:
            if not lines.pending():
                ready, _, _ = select.select(watch, [], [])
            else:
                ready = [sock]
            if wake[0] in ready:
                _drain(wake[0])
            while signals:
                _pass_on(lines, signals.pop(0))
            if stdin_fd is not None and stdin_fd in ready:
                data = os.read(stdin_fd, 65536)
                try:
                    if data:
                        lines.send({"op": "stdin", "d": data.decode("latin-1")})
                    else:
                        lines.send({"op": "eof"})
                except OSError:
                    data = b""  # the command ended and the daemon hung up: read its end
                if not data:
                    watch = [sock, wake[0]]
                    stdin_fd = None
            if sock in ready:
                msg = lines.recv()
                if msg is None:
                    raise DaemonError("the daemon closed the connection mid-command")
                ev = msg.get("ev")
                if ev == "out":
                    data = str(msg.get("d", "")).encode("latin-1")
                    stream = 1 if msg.get("s") == 1 else 2
                    if sink is not None:
                        sink(stream, data)
                    else:
                        _write_all(stream, data)
                elif ev == "exit":
                    return dict(msg.get("result") or {})
                elif msg.get("ok") is False:
                    _raise(msg)
    finally:
        if old_wakeup is not None:
            wire.set_wakeup_fd(old_wakeup)
        for sig, handler in previous.items():
            wire.set_handler(sig, handler)
        sock.close()
        os.close(wake[0])
        os.close(wake[1])


def _pass_on(lines: Lines, signo: int) -> None:
    """Tell the daemon of a signal that came (0: the terminal's new size)."""
    if signo == 0:
        rows, cols = terminal_size()
        msg: dict[str, Any] = {"op": "resize", "rows": rows, "cols": cols}
    else:
        msg = {"op": "signal", "sig": signo}
    try:  # noqa: SIM105 - contextlib is one import more on the hot path
        lines.send(msg)
    except OSError:
        pass


def _drain(fd: int) -> None:
    """Read a non-blocking pipe empty."""
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def terminal_size() -> tuple[int, int]:
    try:
        size = os.get_terminal_size(0)
    except OSError:
        try:
            size = os.get_terminal_size(1)
        except OSError:
            return 24, 80
    return size.lines, size.columns
