"""A pre-imported parent of egress gates: forks one per sandbox instead of starting a new
interpreter for each (its start-up and imports cost ~85 ms of CPU, more than the rest of
a sandbox's start), and, for a daemon, only when the sandbox uses the network.

The fork server is started like a gate was (our interpreter without site, a clean
environment, a session of its own), imports what a gate needs, then waits on its end of
a socket pair that only the process that started it holds (no path anyone could connect
to). Requests: fork a gate for its whole life (GATE: the gate's five fds; the child puts
them at fixed numbers, GATE_FDS + CARRIER_FD, closes every other one and runs
egress_child.gate_main as a freshly started gate does); wire a namespace (WIRE: a child
joins it, runs the tools, makes the listeners); or register a sandbox whose gate runs on
demand (REGISTER, `register`): the server keeps that sandbox's fds (listeners, lifeline,
sealed config memfd, state memfd, log and audit files) and polls its listeners for
readability, never reading them; the first readiness forks its gate (egress_child.
activated_main, the fds at A_TARGETS, nothing else open), which serves until idle and
exits; the server then polls again. Its memory holds nothing of any sandbox's but fd
numbers (every gate it forks inherits it). It is single-threaded, so forking it is safe;
it exits once its socket's other end is closed and it holds no sandbox. A daemon's
server also listens in the daemon's runtime dir, where the daemon after a killed one takes
its sandboxes over (`take_over`): then it exits. Children share
its address-space layout (as any forked process does); docs/security.md says so, and what
gates on demand trade.

A long-lived process (the daemon: SandboxManager) turns it on with `enable`, which also
starts the server so that its imports are done before the first sandbox needs it. A
one-shot process (an in-process `agentkernel run`) starts its one gate directly: the
server's start-up would only be on its path. `AGENTKERNEL_GATE_FORKSERVER=0` turns it off,
`=1` on everywhere; `AGENTKERNEL_GATE_IDLE_SECONDS=0` keeps a forked gate per sandbox for
its whole life. If the server cannot be started or answers wrongly, `spawn` and `wire`
return None and the caller does it the old way.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import socket

# Where a forked gate finds its fds: stdin 0, stdout 1 (/dev/null), stderr 2, then these.
READY_FD, EXIT_FD, CARRIER_FD = 3, 4, 5
GATE_FDS = (READY_FD, EXIT_FD)  # what the gate's config names (cfg ready_fd, exit_fd)
# Their names in /proc/PID/comm (both keep the server's command line): the server runs as
# its starter does (root for a root daemon), a gate as the sandbox's own `nobody`.
SERVER_COMM, GATE_COMM = "ak-gate-forks", "ak-egress-gate"
GATE, WIRE = b"g", b"w"  # requests: fork a gate; wire a namespace (see `wire`)
REGISTER = b"r"  # a sandbox's gate on demand (see `register`)
ADOPT = b"+"  # after REGISTER: the last fd is a pidfd of its gate, still serving (_reregister)
# An activated gate's fds, in the order `register` sends them and at these numbers in the
# gate: its listeners (TCP, DNS, control), the sandbox's lifeline, its config (a sealed
# memfd), its state (a memfd only its own gates write), its log, the audit log's two
# files, and the secrets' leaf certificate and key (a sealed memfd; only with secrets).
A_TCP, A_UDP, A_CONTROL, A_EXIT, A_CFG, A_STATE, A_LOG, A_AUDIT, A_AUDIT_OLD, A_LEAF = \
    range(3, 13)
# Where each fd `register` sends (in this order) goes in the gate: its stderr is the 10th.
A_TARGETS = (A_TCP, A_UDP, A_CONTROL, A_EXIT, A_CFG, A_STATE, A_LOG, A_AUDIT, A_AUDIT_OLD,
             2, A_LEAF)
A_LISTENERS = 3  # the first three are polled for a sandbox's first bytes
MIN_FDS, MAX_FDS = 10, 11  # a registration without and with secrets
# (_reregister adds one: the pidfd of a gate a dead server forked, while it still serves)
RETRY_FIRST, RETRY_MAX = 0.1, 10.0  # seconds before re-forking a gate that died young
YOUNG = 0.5  # a gate that exits sooner than this (not idle: it failed) backs off
MIN_IDLE = 1.0  # seconds: an idle gate never exits young
MAX_MSG = 64 * 1024  # a request's bytes (the wiring's tool inputs are ~1 KiB)
TIMEOUT = 10.0
WIRE_TIMEOUT = 15.0  # seconds for the tools and listeners of one namespace
IDLE_SECONDS = 30.0  # an activated gate's default idle time before it exits

ADOPTED_SIGNAL = signal.SIGUSR1  # to a serving gate re-registered with a new server
# A daemon's server also listens on a unix socket in the daemon's private runtime dir
# (`enable(rendezvous)`), for the daemon that follows a killed one (`take_over`):
TAKE, TAKEN = b"T", b"K"  # hand me your sandboxes; done, let them go
BOX, BOX_GATE = b"b", b"B"  # one sandbox's fds (BOX_GATE: then a pidfd of its serving gate)
HANDOFF_TIMEOUT = 10.0  # seconds for one hand-off conversation (the server waits on it)
RENDEZVOUS_MAX = 64  # sockets looked at by one take-over

_lock = threading.Lock()
_server: _Server | None = None
_enabled = False
_rendezvous: str | None = None  # where a daemon's servers listen (enable)


class GateProcess(subprocess.Popen[bytes]):
    """A forked gate, watched and signalled through its pidfd: the fork server is its
    parent (and reaps it), so waitpid cannot see it. Its exit status is the server's to
    know: `returncode` is -SIGKILL once we killed it, else 0 once it is gone."""

    def __init__(self, pid: int, pidfd: int) -> None:  # no Popen.__init__: nothing to start
        self.args = ["egress-gate"]
        self.pid = pid
        self.returncode: Any = None
        self.stdin = self.stdout = self.stderr = None
        self._child_created = False  # Popen.__del__: nothing of ours to reap
        self._pidfd = pidfd  # open for the handle's life: no close racing a poll or kill
        self._killed = False

    def _gone(self, timeout: float | None) -> bool:
        import select

        poller = select.poll()  # not select(): a daemon's fds may pass FD_SETSIZE
        poller.register(self._pidfd, select.POLLIN)
        return bool(poller.poll(None if timeout is None else max(0, round(timeout * 1000))))

    def _internal_poll(self, _deadstate: Any = None, *_a: Any, **_k: Any) -> int | None:
        if self.returncode is None and self._gone(0):
            self.returncode = -signal.SIGKILL if self._killed else 0
        return self.returncode  # type: ignore[no-any-return]

    def _wait(self, timeout: float | None) -> int:
        if self.returncode is None:
            if not self._gone(timeout):
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            self.returncode = -signal.SIGKILL if self._killed else 0
        return int(self.returncode)

    def send_signal(self, sig: int) -> None:
        if self.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, sig)
            self._killed = self._killed or sig == signal.SIGKILL

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            os.close(self._pidfd)


class _Server:
    """The daemon's (or CLI's) handle on its fork server."""

    def __init__(self, rendezvous: str | None = None) -> None:
        import socket

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener, self.path = _bind_rendezvous(rendezvous)
        paths = [p for p in sys.path if p]
        extra = "" if listener is None else f", {listener.fileno()}, {self.path!r}"
        code = (f"import sys; sys.path[:0] = {paths!r}; "
                f"from agentkernel.egress_forkserver import serve; "
                f"serve({theirs.fileno()}{extra})")
        try:  # -P: no module from the current directory (egress_gate._proxy_argv)
            self.proc = subprocess.Popen(
                [sys.executable, "-P", "-S", "-c", code], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(), *([] if listener is None else [listener.fileno()])),
                close_fds=True, start_new_session=True,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"})
        except BaseException:
            ours.close()
            self.unlink()
            raise
        finally:
            theirs.close()
            if listener is not None:
                listener.close()
        ours.settimeout(TIMEOUT)
        self.sock = ours
        try:  # its death, for the watcher (poll, not waitpid: Popen reaps it)
            self.pidfd = os.pidfd_open(self.proc.pid)
        except OSError:
            self.pidfd = -1

    def unlink(self) -> None:
        """Its rendezvous socket's name gone (the server is dead, or never started)."""
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.path = None

    def fork(self, request: bytes, fds: list[int]) -> GateProcess:
        import socket

        socket.send_fds(self.sock, [request], fds)
        msg, got, flags, _addr = socket.recv_fds(self.sock, MAX_MSG, 1)
        if not msg.startswith(b"p") or len(got) != 1 or flags & socket.MSG_CTRUNC:
            for fd in got:
                os.close(fd)
            raise OSError(f"the gate fork server answered {msg[:MAX_MSG]!r}")
        return GateProcess(int(msg[1:]), got[0])

    def ask(self, request: bytes, fds: list[int]) -> bytes:
        """A request answered without fds (a registration)."""
        import socket

        socket.send_fds(self.sock, [request], fds)
        msg, got, _flags, _addr = socket.recv_fds(self.sock, MAX_MSG, 1)
        for fd in got:
            os.close(fd)
        return msg

    def close(self) -> None:
        """Hang up: the server exits once it has no sandbox left (it keeps the listeners
        of the sandboxes it holds, which outlive their starter as their gates used to)."""
        self.sock.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def _bind_rendezvous(where: str | None) -> tuple[socket.socket | None, str | None]:
    """A socket for a daemon's fork server to listen on, bound under a random name in
    `where` (a 0700 dir of ours in the daemon's private runtime dir, which every sandbox
    has masked): how the daemon after a killed one reaches it (`take_over`). (None, None)
    without `where` or where none can be had (a path too long for a unix socket): then no
    later daemon takes this server's sandboxes, as before."""
    import socket
    import stat

    if where is None:
        return None, None
    with contextlib.suppress(FileExistsError, OSError):
        os.mkdir(where, 0o700)
    try:
        st = os.lstat(where)
    except OSError:
        return None, None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        return None, None  # not a private dir of ours: no rendezvous
    path = os.path.join(where, os.urandom(8).hex())
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:  # bound here, listened on by the server: a client's SO_PEERCRED names the server
        sock.bind(path)
        os.chmod(path, 0o600)
    except OSError:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None, None
    return sock, path


def spawn(stdin: int, stderr: int, ready: int, exit_fd: int, carrier: int
          ) -> GateProcess | None:
    """A gate forked by this process's fork server (started on first use), with these fds
    at 0, 2 and GATE_FDS + CARRIER_FD; None if the server cannot give one (the caller then
    starts a gate itself). The fds stay the caller's to close."""
    return _fork(GATE, [stdin, stderr, ready, exit_fd, carrier])


def activating() -> bool:
    """Are gates started on demand (`register`) rather than one per sandbox for its
    whole life, started with it? With the fork server, unless
    AGENTKERNEL_GATE_IDLE_SECONDS is 0; in a process without one (a one-shot run), unless
    AGENTKERNEL_GATE_FORKSERVER is 0: its sandbox's gate is then started at the sandbox's
    first use of the network, as a fresh interpreter (`_start_here`)."""
    return (_wanted() and idle_seconds() > 0) or _here()


def _here() -> bool:
    """Does this process start its gates on demand itself (no fork server)?"""
    return not _wanted() and os.environ.get("AGENTKERNEL_GATE_FORKSERVER", "") != "0"


def activated_idle() -> float:
    """An activated gate's idle time (its config's "idle"): 0 for one this process starts
    itself (no server polls the listeners after it: it serves for the sandbox's life)."""
    return 0.0 if _here() else idle_seconds()


def idle_seconds() -> float:
    """How long an activated gate stays without connections, queries or updates before it
    exits (AGENTKERNEL_GATE_IDLE_SECONDS; 0: a gate per sandbox for its whole life)."""
    try:
        value = float(os.environ.get("AGENTKERNEL_GATE_IDLE_SECONDS", "") or IDLE_SECONDS)
    except ValueError:
        return IDLE_SECONDS
    if not value >= 0:  # (NaN too)
        return IDLE_SECONDS
    return max(value, MIN_IDLE) if value else 0.0


def register(fds: list[int]) -> int | None:
    """Hand a sandbox's gate fds (in A_TARGETS order) to the fork server, which forks its
    gate when the sandbox first connects, resolves or is updated, and again after that
    gate went idle and exited: the registration's number, or None if no server can take
    it. The fds stay the caller's to close; this process keeps dups of
    them (never their contents) while the sandbox lives, to hand them to a new server if
    this one dies (`_reregister`)."""
    global _server
    if _here():
        return _start_here(fds)
    if not _wanted():
        return None
    with _lock:
        for _ in range(2):  # a server that died (killed, OOM) is replaced once
            try:
                msg = _ensure().ask(REGISTER, fds)
            except OSError:
                _discard()
                continue
            if msg.startswith(b"r") and msg[1:].isdigit():
                _hold(fds)
                return int(msg[1:])
            return None
    return None


# --- a one-shot run's gate on demand, without a fork server ---------------------------------


def _start_here(fds: list[int]) -> int | None:
    """A process without a fork server (a one-shot run): a thread of ours polls the
    sandbox's listeners as a server would (never reading them) and, at the first byte,
    starts its gate as a fresh interpreter with these fds (`_first_use`). A run whose
    command never uses the network starts no gate at all: the gate's start-up (~100 ms of
    CPU: an interpreter, asyncio, ssl) is no longer on every sandbox's start. The fds stay
    the caller's to close (the thread holds dups); 0, or None if they cannot be had."""
    dups: list[int] = []
    try:
        for fd in fds:
            dups.append(os.dup(fd))
        threading.Thread(target=_first_use, args=(dups,), name="ak-gate-on-demand",
                         daemon=True).start()
    except (OSError, RuntimeError):
        for fd in dups:
            os.close(fd)
        return None
    return 0


def _first_use(fds: list[int]) -> None:
    """The thread of `_start_here`: until a listener is readable (then the gate starts,
    and the thread reaps it once the sandbox ended it) or the sandbox is gone first."""
    import select

    proc: subprocess.Popen[bytes] | None = None
    try:
        poller = select.poll()
        for fd in [*fds[:A_LISTENERS], fds[3]]:
            poller.register(fd, select.POLLIN)
        events = {fd for fd, _ev in poller.poll()}
        if fds[3] not in events:  # (the lifeline's end: the sandbox is gone)
            proc = _fresh_gate(fds)
    except OSError:
        pass  # no gate: the sandbox's connections wait in the listeners, then fail closed
    finally:
        for fd in fds:
            os.close(fd)
    if proc is not None:
        proc.wait()


def _fresh_gate(fds: list[int]) -> subprocess.Popen[bytes]:
    """An activated gate as a fresh interpreter (our own, without site): the child of a
    fork server's, with the same fds (passed at the same numbers, placed at A_TARGETS by
    `_activated_child`), its stderr the sandbox's egress-gate.err from the start."""
    paths = [p for p in sys.path if p]
    code = (f"import sys; sys.path[:0] = {paths!r}; "
            f"from agentkernel.egress_forkserver import _activated_child; "
            f"_activated_child({fds!r})")
    # -P: a one-shot run's cwd is its project; nothing is imported from it
    # (egress_gate._proxy_argv)
    return subprocess.Popen(
        [sys.executable, "-P", "-S", "-c", code], stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=fds[9], pass_fds=fds, close_fds=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"})


# --- the starter's side of a dead server: its sandboxes re-registered with a new one -------

_held: list[list[int]] = []  # dups of each live registration's fds (under _lock)
_watcher: threading.Thread | None = None
HELD_MAX = 4096  # registrations kept for recovery (~11 fds each, while fds can be had)


def _hold(fds: list[int]) -> None:
    """Keep dups of a registration's fds (under _lock) and have the watcher running: the
    listeners were made in the sandbox's namespace (this process could not make them
    again without joining it), and its state memfd holds its live updates and DNS pins,
    which a new server's gates must find as the old one's did."""
    global _watcher
    if len(_held) >= HELD_MAX or not _room(len(fds)):
        return  # this sandbox fails closed if the server dies, as before
    dups: list[int] = []
    try:
        for fd in fds:
            dups.append(os.dup(fd))
    except OSError:
        for fd in dups:
            os.close(fd)
        return
    _held.append(dups)
    if _watcher is None or not _watcher.is_alive():
        _watcher = threading.Thread(target=_watch, name="ak-gate-forks-watch", daemon=True)
        _watcher.start()


FD_RECOUNT = 1.0  # seconds a count of our open fds stands in for a new one (_room)
_fds_counted: list[float] = [-math.inf, 0.0]  # when our fds were last counted; how many then


def _room(more: int) -> bool:
    """(Under _lock.) May this process hold `more` fds, keeping half its fd limit for its
    own work? Far from that line (under a quarter of the limit) a count under FD_RECOUNT
    old, plus what was held since, decides: counting lists /proc/self/fd, a fraction of
    a millisecond per sandbox in a daemon holding many; nearer, each call counts."""
    import resource
    import time

    try:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return True
        now = time.monotonic()
        when, used = _fds_counted
        if now - when > FD_RECOUNT or used + more > soft // 4:
            when, used = now, len(os.listdir("/proc/self/fd"))
    except (OSError, ValueError):
        return False
    if used + more > soft // 2:
        return False
    _fds_counted[:] = [when, used + more]
    return True


def _watch() -> None:
    """The watcher thread: drops the dups of sandboxes that ended (their lifeline is
    readable) and, once the fork server died (killed, OOM), has a new one take every
    live sandbox (_ensure). Ends once nothing is held."""
    global _watcher
    import select

    while True:
        with _lock:
            if not _held:
                _watcher = None
                return
            lifelines = [box[3] for box in _held]
            pidfd = _server.pidfd if _server is not None else -1
        poller = select.poll()
        for fd in lifelines:
            poller.register(fd, select.POLLIN)
        if pidfd >= 0:
            poller.register(pidfd, select.POLLIN)
        events = {fd for fd, _ev in poller.poll(WATCH_MS)}
        with _lock:
            for box in [box for box in _held if box[3] in events]:
                _held.remove(box)
                for fd in box:
                    os.close(fd)
            if _held and _server is not None and _server.proc.poll() is not None:
                with contextlib.suppress(OSError):
                    _ensure()


WATCH_MS = 1000  # the watcher's poll: a dead server is seen at once (its pidfd); the
# dups of an ended sandbox are dropped within this


def _reregister(server: _Server) -> None:
    """(Under _lock.) Every held sandbox registered with `server`, which replaces a dead
    one; a gate the dead server had forked, still serving (it outlives its parent), is
    named by a pidfd so that the new server forks none beside it until it exits."""
    running = _running_gates([box[0] for box in _held])
    try:
        for box in _held:
            pidfd = running.pop(_inode(box[0]), -1)
            extra = [pidfd] if pidfd >= 0 else []
            try:
                server.ask(REGISTER + (ADOPT if extra else b""), [*box, *extra])
            finally:
                if pidfd >= 0:
                    os.close(pidfd)
    finally:
        for fd in running.values():
            os.close(fd)


def _inode(fd: int) -> int:
    try:
        return os.fstat(fd).st_ino
    except OSError:
        return -1


def _running_gates(listeners: list[int]) -> dict[int, int]:
    """Gates still serving these TCP listeners (forked by a dead server): listener inode
    -> a pidfd of its gate, opened before the gate's fds are looked at (so the pid is
    that gate's, not a reused one's)."""
    want = {f"socket:[{_inode(fd)}]": _inode(fd) for fd in listeners}
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() != GATE_COMM:
                    continue
            pidfd = os.pidfd_open(int(entry))
        except OSError:
            continue
        try:
            links = {os.readlink(f"/proc/{entry}/fd/{n}")
                     for n in (A_TCP, A_TCP + 1, A_TCP + 2)}  # (an always-on gate: no match)
        except OSError:
            links = set()
        hits = [want[link] for link in links if link in want]
        if hits and hits[0] not in found:
            found[hits[0]] = pidfd
        else:
            os.close(pidfd)
    return found


# --- a restarted daemon: the sandboxes a killed one registered, taken from its server ------


def take_over() -> list[str]:
    """After a restart (the daemon before this one was killed): every fork server a
    daemon of ours left in the rendezvous dir (`enable`) hands its sandboxes to this
    process's server, with a pidfd of each gate still serving, and exits; this process
    holds dups of their fds as of those it registered itself, so its watcher re-registers
    them if its own server dies. What happened, for the daemon's recovery notes.

    Both ends authenticate: the server serves only a peer of its own user in its own user
    and pid namespaces (`peer.refusal`: never a sandbox, never another user, who cannot
    reach the 0700 dir either), and only once its starter is gone; we take fds only from
    a process of ours named SERVER_COMM, in our namespaces."""
    if _rendezvous is None or not _wanted():
        return []
    try:
        names = sorted(n for n in os.listdir(_rendezvous) if _is_rendezvous_name(n))
    except OSError:
        return []
    notes = []
    with _lock:
        try:
            server = _ensure()
        except OSError as exc:
            return [f"egress gates: no fork server to take over with ({exc})"]
        for name in names[:RENDEZVOUS_MAX]:
            path = os.path.join(_rendezvous, name)
            if path != server.path:
                note = _take_from(path, server)
                if note:
                    notes.append(note)
    return notes


def _is_rendezvous_name(name: str) -> bool:
    return len(name) == 16 and all(c in "0123456789abcdef" for c in name)


def _take_from(path: str, server: _Server) -> str | None:
    """(Under _lock.) One old server's sandboxes moved to `server`; a note, if any."""
    import socket

    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.settimeout(HANDOFF_TIMEOUT)
    try:
        conn.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        conn.close()  # its server is gone (killed): only the name was left
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None
    except OSError as exc:
        conn.close()
        return f"egress gates: cannot reach a fork server left at {path}: {exc}"
    boxes: list[tuple[bool, list[int]]] = []
    try:
        why = _not_our_server(conn)
        if why is not None:
            return f"egress gates: refused {path}: {why}"
        conn.send(TAKE)
        boxes = _receive_boxes(conn)
        for adopt, fds in boxes:
            reply = server.ask(REGISTER + (ADOPT if adopt else b""), fds)
            if not (reply.startswith(b"r") and reply[1:].isdigit()):
                raise OSError(f"our fork server answered {reply[:64]!r}")
            _hold(fds[:-1] if adopt else fds)
        conn.send(TAKEN)
        return (f"egress gates: took {len(boxes)} sandbox(es) from a killed daemon's fork "
                "server") if boxes else None
    except OSError as exc:  # (no TAKEN: the old server keeps serving them all)
        return f"egress gates: a killed daemon's fork server kept its sandboxes ({exc})"
    finally:
        conn.close()
        for _adopt, fds in boxes:
            for fd in fds:
                os.close(fd)


def _not_our_server(conn: socket.socket) -> str | None:
    """Why the peer of `conn` is not a fork server of ours (None if it is)."""
    from .peer import refusal
    from .peercred import PeerCredError, peer_cred

    why = refusal(conn)
    if why is not None:
        return why
    try:
        pid = peer_cred(conn).pid
    except PeerCredError as exc:
        return str(exc)
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        return "its process is gone"
    return None if comm == SERVER_COMM else f"not a gate fork server ({comm[:32]!r})"


def _receive_boxes(conn: socket.socket) -> list[tuple[bool, list[int]]]:
    """An old server's sandboxes (BOX / BOX_GATE messages, then b"." and their count):
    (with a gate's pidfd last?, fds). OSError on anything else (the fds closed)."""
    import socket

    boxes: list[tuple[bool, list[int]]] = []
    try:
        while True:
            msg, fds, flags, _addr = socket.recv_fds(conn, MAX_MSG, MAX_FDS + 1)
            gate = msg == BOX_GATE
            if (msg in (BOX, BOX_GATE) and not flags & socket.MSG_CTRUNC
                    and MIN_FDS + gate <= len(fds) <= MAX_FDS + gate
                    and len(boxes) < HELD_MAX):
                boxes.append((gate, fds))
                continue
            for fd in fds:
                os.close(fd)
            if msg == b".%d" % len(boxes):
                return boxes
            raise OSError(f"the old fork server answered {msg[:64]!r}")
    except BaseException:
        for _gate, fds in boxes:
            for fd in fds:
                os.close(fd)
        raise


def server_pid() -> int | None:
    """This process's fork server's pid, if it has one (tests, benchmarks)."""
    with _lock:
        return _server.proc.pid if _server is not None else None


def enable(rendezvous: str | None = None) -> None:
    """Fork this process's gates from a fork server from now on, and start the server now
    (its imports run while this process does other things). A daemon names `rendezvous`
    (a dir in its private runtime dir): its servers listen there for the daemon that
    follows it if it is killed (`take_over`)."""
    global _enabled, _rendezvous
    _enabled = True
    _rendezvous = rendezvous
    if not _wanted():
        return
    with _lock, contextlib.suppress(OSError):
        _ensure()


def _wanted() -> bool:
    setting = os.environ.get("AGENTKERNEL_GATE_FORKSERVER", "")
    return setting == "1" or (_enabled and setting != "0")


def _ensure() -> _Server:
    """(Under _lock.) This process's live fork server: started if it has none; if it died
    (killed, OOM), a new one, with every sandbox registered with the dead one (_held)."""
    global _server
    if _server is not None and _server.proc.poll() is None:
        return _server
    dead = _server is not None
    if _server is not None:
        _server.close()
        _server.unlink()  # dead: no daemon will find it there
        _server = None
    _server = _Server(_rendezvous)
    if dead and _held:
        _reregister(_server)
    return _server


def _discard() -> None:
    """(Under _lock.) A request failed: a dead server stays for _ensure to replace (and
    re-register its sandboxes with the next); a live one that answered wrongly is hung up
    on (it keeps what it holds, as after its starter's exit)."""
    global _server
    if _server is not None and _server.proc.poll() is None:
        _server.close()
        _server = None


def _fork(request: bytes, fds: list[int]) -> GateProcess | None:
    if not _wanted():
        return None
    with _lock:
        for _ in range(2):  # a server that died (killed, OOM) is replaced once
            try:
                return _ensure().fork(request, fds)
            except OSError:
                _discard()
    return None


def wire(netns: int, userns: int, steps: list[tuple[list[str], str]], address: str,
         netlink: dict[str, Any] | None = None) -> tuple[int, int] | None:
    """Run `steps` (argv, stdin) inside the network namespace `netns` (joined through
    `userns` first, for an ordinary user; -1: none), all at once, then make the gate's
    TCP and UDP listeners on `address` there: the fds of those listeners. A child of the
    fork server joins the namespace once for every tool (no nsenter each) and makes the
    listeners (no fork of this, possibly large, process). None if the server cannot do
    it (the caller does it itself); SandboxError if a step failed (then nothing runs).
    With `netlink` (egress_netlink.wire_here's arguments), the child wires over netlink
    instead of running the steps, which it runs only where the kernel has no nf_tables."""
    import json
    import socket

    from .errors import SandboxError

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        payload = json.dumps({"steps": steps, "address": address,
                              "netlink": netlink}).encode()
        fds = [theirs.fileno(), netns, *([userns] if userns >= 0 else [])]
        child = _fork(WIRE + payload, fds)
        theirs.close()
        if child is None:
            return None
        ours.settimeout(WIRE_TIMEOUT)
        try:
            msg, got, _flags, _addr = socket.recv_fds(ours, MAX_MSG, 2)
        except (OSError, TimeoutError):
            child.kill()
            msg, got = b"", []
        if msg == b"k" and len(got) == 2:
            return got[0], got[1]
        for fd in got:
            os.close(fd)
        why = msg[1:].decode(errors="replace") if msg else "timed out or died"
        raise SandboxError("could not set up the sandbox's egress gate, so it does not "
                           f"start: {why} (or use --no-network)")
    finally:
        ours.close()
        theirs.close()


def shutdown() -> None:
    """Stop this process's fork server, if it has one (its gates live on, and it keeps
    its sandboxes: none is re-registered by this process from now on)."""
    global _server
    with _lock:
        if _server is not None:
            _server.close()
            _server = None
        for box in _held:
            for fd in box:
                os.close(fd)
        _held.clear()


# --- the fork server's side ----------------------------------------------------------------


def serve(fd: int, rendezvous: int = -1, path: str = "") -> None:
    """The fork server's loop: one child per request (a gate, or a namespace's wiring),
    and the registered sandboxes' gates on demand, until the socket's other end closes
    and no registered sandbox is left. A daemon's server also listens on `rendezvous`
    (bound at `path`) for the next daemon, should its own be killed (`take_over`)."""
    import ctypes  # noqa: F401 - the gate's privilege drop (egress_proxy._drop)
    import gc
    import resource
    import socket

    # A gate's imports, a wiring child's (egress_netlink), and the hand-off's peer check.
    from . import egress_audit, egress_child, egress_netlink, egress_proxy, peer  # noqa: F401
    from .egress import denied_networks, host_addresses

    _set_comm(SERVER_COMM)
    egress_proxy._preload()  # the gate's own list of late imports
    denied_networks(host_addresses())  # cached: a gate on an unchanged host reuses it
    with contextlib.suppress(OSError):  # (no temporary dir: gates just cost more)
        egress_proxy.warm_up()  # what each gate would otherwise write into shared pages
    # ~11 fds per registered sandbox: as many as the hard limit lets us hold.
    with contextlib.suppress(ValueError, OSError):
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # The warmed-up heap is the gates' shared one: no collection (in the server or in a
    # long-lived gate) walks those objects again, which would write to each one's page.
    gc.freeze()
    listener = socket.socket(fileno=rendezvous) if rendezvous >= 0 else None
    try:
        _Loop(socket.socket(fileno=fd), listener).run()
    finally:
        if listener is not None and path:
            with contextlib.suppress(OSError):
                os.unlink(path)


class _Box:
    """A registered sandbox, as the server knows it: fds and numbers only (a gate forked
    for another sandbox inherits this memory; it must find nothing of this one's there)."""

    __slots__ = ("backoff", "fds", "pid", "pidfd", "retry_at", "started")

    def __init__(self, fds: list[int]) -> None:
        self.fds = fds
        self.pid = 0  # its gate's, while one runs
        self.pidfd = -1
        self.started = 0.0
        self.backoff = 0.0
        self.retry_at = 0.0  # > now: a gate died young, wait before the next


class _Loop:
    """The server's single thread: requests on its socket, and for each registered sandbox
    its listeners polled for readiness (never read: the server takes no byte of a
    sandbox's), its lifeline, and its gate's pidfd while one runs."""

    def __init__(self, sock: socket.socket, rendezvous: socket.socket | None = None) -> None:
        import select

        self.sock = sock
        self.poller = select.poll()  # not select(): hundreds of sandboxes pass FD_SETSIZE
        self.poller.register(sock, select.POLLIN)
        self.rendezvous = rendezvous  # where the daemon after a killed starter asks
        if rendezvous is not None:
            rendezvous.listen(4)  # here: whoever connects sees our credentials, not our starter's
            rendezvous.setblocking(False)
            self.poller.register(rendezvous, select.POLLIN)
        self.boxes: dict[int, _Box] = {}  # registration number -> box
        self.watch: dict[int, tuple[int, str]] = {}  # polled fd -> (registration, role)
        self.serial = 0
        self.starter = True  # our starter still holds the other end

    def run(self) -> None:
        import time

        while self.starter or self.boxes:
            now = time.monotonic()
            waits = [b.retry_at - now for b in self.boxes.values() if b.retry_at > now]
            timeout = min([1.0, *waits])
            for fd, _events in self.poller.poll(max(0, round(timeout * 1000))):
                if fd == self.sock.fileno():
                    self._request()
                elif self.rendezvous is not None and fd == self.rendezvous.fileno():
                    self._hand_off()
                elif fd in self.watch:
                    reg, role = self.watch[fd]
                    self._event(reg, role)
            _reap()
            self._retry()

    def _listen(self, reg: int, box: _Box, on: bool) -> None:
        import select

        for fd in box.fds[:A_LISTENERS]:
            if on:
                self.poller.register(fd, select.POLLIN)
                self.watch[fd] = (reg, "listener")
            else:
                self.poller.unregister(fd)
                self.watch.pop(fd, None)

    def _request(self) -> None:
        import socket

        try:
            # (an adoption's registration carries a gate's pidfd after a sandbox's 11 fds)
            msg, fds, flags, _addr = socket.recv_fds(self.sock, MAX_MSG, MAX_FDS + 1)
        except OSError:
            msg, fds, flags = b"", [], 0
        if not msg:
            self._starter_gone()
            return
        gate = msg == GATE and len(fds) == 5
        wiring = msg.startswith(WIRE) and len(fds) in (2, 3)
        registering = msg == REGISTER and MIN_FDS <= len(fds) <= MAX_FDS
        adopting = msg == REGISTER + ADOPT and MIN_FDS < len(fds) <= MAX_FDS + 1
        if not (gate or wiring or registering or adopting) or flags & socket.MSG_CTRUNC:
            for f in fds:
                os.close(f)
            self._send(b"e bad request")
            return
        if registering or adopting:
            self._register(fds[:-1] if adopting else fds, fds[-1] if adopting else -1)
            return
        pid = os.fork()
        if pid == 0:
            if gate:
                _child(fds)
            _wire_child(self.sock, msg[len(WIRE):], fds)
        for f in fds:
            os.close(f)
        # Opened before any reaping of ours: the pid cannot have been reused yet.
        pidfd = os.pidfd_open(pid)
        try:
            socket.send_fds(self.sock, [b"p%d" % pid], [pidfd])
        except OSError:
            self._starter_gone()
        finally:
            os.close(pidfd)

    def _send(self, msg: bytes) -> None:
        try:
            self.sock.send(msg)
        except OSError:
            self._starter_gone()

    def _starter_gone(self) -> None:
        if self.starter:
            self.starter = False
            self.poller.unregister(self.sock)

    def _hand_off(self) -> None:
        """A daemon after our killed starter asks for our sandboxes (`take_over`): each
        one's fds (and its serving gate's pidfd), then, once it says it registered them
        all with its own server, we let them go (their gates run on) and exit. Only for a
        peer of our user in our own user and pid namespaces (never a sandbox), and only
        once our starter is gone; a peer that hangs up or stalls changes nothing."""
        import socket

        from .peer import refusal

        assert self.rendezvous is not None
        try:
            conn, _addr = self.rendezvous.accept()
        except OSError:
            return
        with conn:
            try:
                conn.settimeout(HANDOFF_TIMEOUT)
                why = refusal(conn)
                if why is None and self._starter_alive():
                    why = "its starter still holds it"
                if conn.recv(16) != TAKE or why is not None:
                    conn.send(b"e" + (why or "bad request").encode()[:200])
                    return
                for box in self.boxes.values():
                    gate = [box.pidfd] if box.pid else []
                    socket.send_fds(conn, [BOX_GATE if gate else BOX], [*box.fds, *gate])
                conn.send(b".%d" % len(self.boxes))
                if conn.recv(16) != TAKEN:
                    return
            except OSError:
                return
        for reg, box in list(self.boxes.items()):
            self._drop(reg, box, kill=False)

    def _starter_alive(self) -> bool:
        """Does our starter still hold its end? (Its hang-up may not be read yet.)"""
        import socket

        if not self.starter:
            return False
        try:
            if self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                self._starter_gone()
                return False
        except BlockingIOError:
            pass
        except OSError:
            self._starter_gone()
            return False
        return True

    def _register(self, fds: list[int], gate: int = -1) -> None:
        """A sandbox to hold; with `gate` (a pidfd: re-registered after our predecessor
        died), its gate still serves, and its listeners are polled once that exits."""
        import select

        self.serial += 1
        box = _Box(fds)
        self.boxes[self.serial] = box
        self.poller.register(fds[3], select.POLLIN)  # the lifeline: readable once it ends
        self.watch[fds[3]] = (self.serial, "exit")
        if gate >= 0:
            box.pid, box.pidfd = -1, gate  # not our child: never waited for, only polled
            self.poller.register(gate, select.POLLIN)
            self.watch[gate] = (self.serial, "gate")
            with contextlib.suppress(OSError):  # it may exit when idle again (`adopted`)
                signal.pidfd_send_signal(gate, ADOPTED_SIGNAL)
        else:
            self._listen(self.serial, box, True)
        self._send(b"r%d" % self.serial)

    def _event(self, reg: int, role: str) -> None:
        box = self.boxes[reg]
        if role != "listener" and not _ready(box.fds[3] if role == "exit" else box.pidfd):
            return  # an event of an fd closed and reused within this round: not this one's
        if role == "exit":
            self._drop(reg, box)
        elif role == "gate":
            self._gate_ended(reg, box)
        elif box.pid == 0:
            self._listen(reg, box, False)  # its gate's now, until it exits
            self._start_gate(reg, box)

    def _start_gate(self, reg: int, box: _Box) -> None:
        """Fork the sandbox's gate: the fork is all the server does (the child sets itself
        up), so a gate slow to start stalls no other sandbox."""
        import select
        import time

        pid = os.fork()
        if pid == 0:
            _activated_child(box.fds)
        box.pid, box.pidfd, box.started = pid, os.pidfd_open(pid), time.monotonic()
        self.poller.register(box.pidfd, select.POLLIN)
        self.watch[box.pidfd] = (reg, "gate")

    def _gate_ended(self, reg: int, box: _Box) -> None:
        """Its gate exited (idle, or failed): the server polls its listeners again; one
        that lived only briefly failed, and the next waits (doubling) so that a gate that
        cannot start does not make the server fork without end."""
        import time

        self.poller.unregister(box.pidfd)
        self.watch.pop(box.pidfd, None)
        os.close(box.pidfd)
        box.pid, box.pidfd = 0, -1
        now = time.monotonic()
        if now - box.started < YOUNG:
            box.backoff = min(RETRY_MAX, max(RETRY_FIRST, box.backoff * 2))
            box.retry_at = now + box.backoff
            return
        box.backoff = 0.0
        self._listen(reg, box, True)

    def _retry(self) -> None:
        import time

        now = time.monotonic()
        for reg, box in self.boxes.items():
            if box.retry_at and box.retry_at <= now and box.pid == 0:
                box.retry_at = 0.0
                self._listen(reg, box, True)

    def _drop(self, reg: int, box: _Box, kill: bool = True) -> None:
        """The sandbox is gone: its gate (which ends with the lifeline too) and fds go.
        Without `kill` (handed off to another server): its gate runs on."""
        import signal

        if box.pid:
            if kill:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(box.pidfd, signal.SIGKILL)
            self.poller.unregister(box.pidfd)
            self.watch.pop(box.pidfd, None)
            os.close(box.pidfd)
        elif not box.retry_at:
            self._listen(reg, box, False)
        self.poller.unregister(box.fds[3])
        self.watch.pop(box.fds[3], None)
        for f in box.fds:
            os.close(f)
        del self.boxes[reg]


def _ready(fd: int) -> bool:
    import select

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _activated_child(fds: list[int]) -> None:
    """In a registered sandbox's forked gate: its fds at A_TARGETS, nothing else open (no
    other sandbox's, not the server's socket), then the gate. Never returns."""
    # Before its listeners are where a new server's starter looks for them (_running_gates):
    # the adoption signal must never find its default action (termination) in place.
    from .egress_proxy import on_adopted  # pre-imported by the server (warm_up)

    signal.signal(ADOPTED_SIGNAL, on_adopted)
    _run_then_exit(lambda: _activated_gate(fds))


def _activated_gate(fds: list[int]) -> None:
    """_activated_child's work, inside its exit guard."""
    import fcntl

    os.setsid()
    _set_comm(GATE_COMM)
    # Out of the way of the targets first: a received fd may already sit at one.
    high = [fcntl.fcntl(f, fcntl.F_DUPFD_CLOEXEC, A_LEAF + 1) for f in fds]
    for src, target in zip(high, A_TARGETS, strict=False):
        os.dup2(src, target, inheritable=target <= 2)  # 0 and 1: the server's /dev/null
    if len(fds) < len(A_TARGETS):
        with contextlib.suppress(OSError):
            os.close(A_LEAF)
    os.closerange(A_LEAF + 1, os.sysconf("SC_OPEN_MAX"))
    from .egress_child import activated_main

    activated_main({"tcp": A_TCP, "udp": A_UDP, "control": A_CONTROL, "exit": A_EXIT,
                    "cfg": A_CFG, "state": A_STATE, "log": A_LOG, "audit": A_AUDIT,
                    "audit_old": A_AUDIT_OLD, "leaf": A_LEAF})


def _run_then_exit(body: Callable[[], None]) -> NoReturn:
    """A forked child's end: `body`, then _exit with its status (0, its SystemExit code,
    or 1 with the traceback on stderr); never back into the server's code."""
    code = 1
    try:
        body()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(code)


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def _child(fds: list[int]) -> None:
    """In the forked gate: its fds where a gate expects them, nothing else open, then the
    gate itself. Never returns."""
    _run_then_exit(lambda: _gate(fds))


def _gate(fds: list[int]) -> None:
    """_child's work, inside its exit guard."""
    import fcntl

    os.setsid()
    _set_comm(GATE_COMM)
    devnull = os.open(os.devnull, os.O_RDWR)
    # Out of the way of the targets first: a received fd may already sit at one.
    high = [fcntl.fcntl(f, fcntl.F_DUPFD_CLOEXEC, 16) for f in [*fds, devnull]]
    stdin, stderr, ready, exit_fd, carrier, null = high
    for src, target in ((stdin, 0), (null, 1), (stderr, 2), (ready, READY_FD),
                        (exit_fd, EXIT_FD), (carrier, CARRIER_FD)):
        os.dup2(src, target, inheritable=target <= 2)
    os.closerange(CARRIER_FD + 1, os.sysconf("SC_OPEN_MAX"))  # the server's socket too
    from .egress_child import gate_main

    gate_main(CARRIER_FD)


def _set_comm(name: str) -> None:
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as f:
        f.write(name)


def _wire_child(server: socket.socket, payload: bytes, fds: list[int]) -> None:
    """In the forked child of a WIRE request: join the namespace, run the steps, make the
    listeners, send them (or why not) on the reply socket. Never returns."""
    import ctypes
    import fcntl
    import json
    import socket

    from .egress_child import listeners_here
    from .egress_proxy import DNS_PORT, TCP_PORT

    code = 1
    # Nothing but its own fds before it joins a namespace (an ordinary user's sandbox's
    # user namespace, whose root could then look into it): no other sandbox's, not the
    # server's socket.
    high = [fcntl.fcntl(f, fcntl.F_DUPFD_CLOEXEC, 8) for f in fds]
    for i, f in enumerate(high):
        os.dup2(f, 3 + i, inheritable=False)
    fds = list(range(3, 3 + len(high)))
    os.closerange(3 + len(high), os.sysconf("SC_OPEN_MAX"))
    del server
    reply = socket.socket(fileno=fds[0])
    try:
        os.setsid()
        libc = ctypes.CDLL(None, use_errno=True)
        joins = [(fds[2], 0x10000000)] if len(fds) == 3 else []  # CLONE_NEWUSER first
        for fd, kind in [*joins, (fds[1], 0x40000000)]:  # then CLONE_NEWNET
            if libc.setns(fd, kind) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        req = json.loads(payload)
        failures = _netlink_or_steps(req)
        if failures:
            reply.send(("e" + "; ".join(failures)).encode()[:MAX_MSG])
        else:
            tcp, udp = listeners_here(str(req["address"]), TCP_PORT, DNS_PORT)
            socket.send_fds(reply, [b"k"], [tcp.fileno(), udp.fileno()])
            code = 0
    except BaseException as exc:
        with contextlib.suppress(Exception):
            reply.send(f"e{type(exc).__name__}: {exc}".encode()[:500])
    finally:
        os._exit(code)


def _netlink_or_steps(req: dict[str, Any]) -> list[str]:
    """A WIRE request's wiring: over netlink if it says how (no tool processes), the
    tools where this kernel has no nf_tables (then nothing was changed); what failed."""
    how = req.get("netlink")
    if isinstance(how, dict):
        from .egress_netlink import Unsupported, wire_here
        from .egress_proxy import DNS_PORT, TCP_PORT

        try:
            wire_here(str(how["dev"]), str(how["peer"]), str(how["address"]),
                      int(how["prefix"]), str(how["gateway"]), TCP_PORT, DNS_PORT,
                      loopback_dns=bool(how["loopback_dns"]))
            return []
        except Unsupported:
            pass
        except OSError as exc:
            return [f"netlink: {exc}"]
    return _run_steps([(list(a), str(d)) for a, d in req["steps"]])


def _run_steps(steps: list[tuple[list[str], str]]) -> list[str]:
    """Start every step, feed each its input, wait for all: what failed, if anything."""
    procs = []
    for argv, data in steps:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, close_fds=True)
        procs.append((argv, proc))
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(data.encode())  # read whole before it writes a byte
        with contextlib.suppress(OSError):
            proc.stdin.close()
        proc.stdin = None
    failures = []
    for argv, proc in procs:
        try:
            _out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            _out, err = proc.communicate()
        if proc.returncode != 0:
            name = os.path.basename(argv[0])
            failures.append(f"{name}: {err.decode(errors='replace').strip()[:300]}")
    return failures
