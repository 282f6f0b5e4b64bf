"""The backend interface: start the agent inside an isolated environment, hand back its channel."""

from __future__ import annotations

import contextlib
import os
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from ..errors import SandboxError
from ..paths import runtime_dir
from ..sandbox import Sandbox, SandboxSpec, close_fds, signals_deferred

if TYPE_CHECKING:
    from ..agent.client import AgentClient
    from ..cgroups import Cgroup
    from ..images import ImageConfig
    from ..rootfs import HostRootfs
    from ..vm.settings import MicrovmSettings

CONTROL_DIR = "ctl"  # host side: <scratch>/ctl/agent.sock for sandboxes that outlive us


class CallerOptions(NamedTuple):
    """Settings of the caller a run is planned for that a backend may use (see
    `Backend.for_caller`); new backends add fields here, with defaults."""

    microvm: MicrovmSettings | None = None


class Probe(NamedTuple):
    """Whether a backend can run here, and why (shown by `doctor` and in errors)."""

    ok: bool
    detail: str


class Backend(ABC):
    """Starts sandboxes of one isolation kind. Exec, files and streaming are the agent's job.

    A backend carries its own facts (below): the daemon, the HTTP API and the planner read
    them, and never ask for a backend by name. A new backend sets what differs from these
    defaults; every fact added later gets a default here, so the interface only grows.
    """

    name: str
    isolation: str  # e.g. "Linux namespaces (shared host kernel)"
    strength: int  # higher is stronger isolation; `auto` picks the strongest available
    # Needs no image (wasm): the host rootfs a run is planned with is a placeholder.
    image_free: bool = False
    persistent: bool = True  # can keep a sandbox between runs (create/exec/stop)
    # Set when this backend runs in place of the one asked for (hyperlight -> wasm): why.
    substitute: str | None = None

    # -- facts (class attributes; read through the class or an instance) --
    # A persistent sandbox's writable layers survive stop/start (they are on the host's
    # disk, or on disk images of the backend's own), so `stop` may keep them.
    stoppable: bool = False
    # Its writable layers are host directories (`state_dir`) a snapshot can archive.
    snapshots: bool = False
    # Why `snapshot` is refused when `snapshots` is False (one clause, for an error).
    snapshot_refusal: str = "it lives in the sandbox's memory"
    # The host's project dir and home are mounted (shared), not copied in.
    shares_host_dirs: bool = True
    # Writable layers live on disk images of a fixed size: no quota disk is needed.
    sized_disks: bool = False
    # Commands get a per-process memory rlimit floor (not for a VM: its size bounds it).
    memory_floor: bool = True
    # Network modes of a profile (profiles.NetworkMode) it can give a sandbox.
    network_modes: tuple[str, ...] = ("none", "egress", "host")
    # HELLO timeouts of the attempts to re-adopt a persistent sandbox after a restart.
    adopt_hello_timeouts: tuple[float, ...] = (5.0,)

    def capabilities(self) -> dict[str, bool]:
        """The SDKs' capability flags (GET /backends) from the facts above."""
        return {"mount_cwd": self.shares_host_dirs, "mount_home": self.shares_host_dirs,
                "attach": True, "host_volumes": False, "ssh": False,
                "proxy_secret_bindings": False, "secret_files": False,
                "snapshots": self.snapshots, "resume": self.stoppable,
                "full_state_pause_resume": False, "full_state_fork": False,
                "endpoints": False}

    @classmethod
    def cleanup_dead(cls, name: str, scratch: Path) -> None:
        """Remove what a dead sandbox of this backend left beyond its processes, cgroup
        and scratch dir (which the caller removes), e.g. a runtime's own state."""
        return None

    @classmethod
    def owns_scratch(cls, scratch: Path) -> bool:
        """Whether an unrecorded scratch dir was left by a sandbox of this backend."""
        return False

    def for_caller(self, options: CallerOptions) -> Backend:
        """This backend set up with a caller's settings (planner.py); most need none."""
        return self

    def pooled(self) -> None:
        """A daemon serves this backend's runs from its pool (called on each run and for
        each configured key): a backend may prepare, once, what later runs need. Must
        not block."""
        return None

    @abstractmethod
    def probe(self, deep: bool = False) -> Probe:
        """Check that this backend can run here.

        The quick probe (every run) only looks at files; `deep` (doctor) runs the tools.
        """

    @abstractmethod
    def start(self, spec: SandboxSpec) -> Sandbox:
        """Start the agent in a new sandbox built from `spec`; raise SandboxError on failure."""

    def version_files(self) -> tuple[str, ...]:
        """The binaries whose build decides whether this backend works: a cached functional
        probe verdict (backends/functional.py) holds until one of them changes."""
        return ()

    def probe_failure_hint(self, error: str) -> str | None:
        """The known cause of a functional probe's error line, if this backend knows one."""
        return None

    def engine_image(self, image: str) -> tuple[HostRootfs, ImageConfig | None, str] | None:
        """A container engine's own copy of `image` (rootfs, config, note), which then wins
        over our image store; None for backends without an image store of their own."""
        return None


def agent_file() -> str:
    """The agent binary every backend runs (part of each backend's version key)."""
    from ..errors import AgentKernelError
    from ..paths import native_binary

    try:
        return str(native_binary("ak-agent"))
    except AgentKernelError:
        return "ak-agent"


def pin_sources(binds: tuple[tuple[str, str], ...], fds: list[int]) -> list[int]:
    """A descriptor of each read-only bind's source (host path, target), opened now without
    following its last component and checked to be a directory or regular file (also
    appended to `fds`, the caller's to close): the backend binds that very file, whatever
    is renamed into the host path meanwhile. A project's `.git` (agents/gitpin) is another
    running sandbox's to rename: a link to a host secret put there must never be bound.
    Never pass one into a sandbox: an O_PATH descriptor of a host dir opens its files
    writable, past the read-only bind."""
    import stat

    out = []
    for src, _ in binds:
        try:
            fd = os.open(src, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise SandboxError(f"cannot open {src} for the sandbox: {exc.strerror}") from None
        fds.append(fd)
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            raise SandboxError(f"{src} is not a directory or regular file: not bound")
        out.append(fd)
    return out


def by_descriptor(binds: tuple[tuple[str, str], ...], fds: list[int]
                  ) -> tuple[tuple[str, str], ...]:
    """`binds` with each source named by its pinned descriptor (`pin_sources`), for code
    of this process that opens it by path (id-mapping it as root)."""
    return tuple((f"/proc/self/fd/{fd}", target)
                 for fd, (_, target) in zip(fds, binds, strict=True))


def make_scratch(name: str) -> Path:
    """A private per-sandbox directory for generated files (bundle, resolv.conf, logs)."""
    path = runtime_dir() / "sandboxes" / name
    path.parent.mkdir(mode=0o700, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        raise SandboxError(f"sandbox {name!r} is already running (scratch dir exists)") from None
    return path


class Spawned(NamedTuple):
    """A backend process running the agent, with the host ends of its channel."""

    process: subprocess.Popen[bytes]
    read_fd: int
    write_fd: int


def spawn_agent(
    argv: Sequence[str],
    *,
    log: Path | int,
    pass_fds: Sequence[int] = (),
    preexec_fn: Callable[[], None] | None = None,
    env: dict[str, str] | None = None,
    child_closes: bool = False,
) -> Spawned:
    """Run `argv` (which ends by exec'ing the agent) with the protocol on its stdin/stdout;
    its stderr to the file `log`, or to the descriptor `log` (the caller's, left open).
    `child_closes`: argv[0] closes all but `pass_fds` first (spawn.spawn)."""
    to_agent_r, to_agent_w = os.pipe()
    from_agent_r, from_agent_w = os.pipe()
    from .. import spawn

    env = env if env is not None else {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    try:
        with open(log, "wb", closefd=not isinstance(log, int)) as logf:
            process: subprocess.Popen[bytes]
            if preexec_fn is None and argv[0].startswith("/") and spawn.available():
                # Without the GIL held while it execs (spawn.py); in its own session too.
                process = spawn.SpawnedPopen(argv, env, stdin=to_agent_r, stdout=from_agent_w,
                                             stderr=logf.fileno(), pass_fds=pass_fds,
                                             child_closes=child_closes)
            else:
                process = subprocess.Popen(
                    list(argv), stdin=to_agent_r, stdout=from_agent_w, stderr=logf,
                    pass_fds=tuple(pass_fds), close_fds=True, preexec_fn=preexec_fn, env=env,
                    # Own session: a terminal's Ctrl-C reaches only the CLI, which forwards
                    # it to the command through the agent instead of killing the sandbox.
                    start_new_session=True,
                )
    except OSError as exc:
        close_fds(to_agent_r, to_agent_w, from_agent_r, from_agent_w)
        raise SandboxError(f"cannot start {argv[0]}: {exc.strerror}") from None
    close_fds(to_agent_r, from_agent_w)
    os.set_inheritable(from_agent_r, False)
    os.set_inheritable(to_agent_w, False)
    return Spawned(process, from_agent_r, to_agent_w)


STARTUP_TAIL = 64 * 1024  # what startup_failure reads of a backend's stderr by descriptor
LOG_MAX_BYTES = 1 << 20  # what a backend's stderr (or a guest's console) keeps on the host


def log_reader_argv(limit: int, reader: tuple[int, int] | None = None) -> list[str]:
    """ak-logcap's argv (agent/ak-logcap.c): keep the first `limit` bytes of its stdin on
    its stdout, as `reader` (uid, gid) if given, and read the rest to its end."""
    from ..paths import native_binary

    ids = [str(reader[0]), str(reader[1])] if reader is not None else []
    return [str(native_binary("ak-logcap")), str(limit), *ids]


def bounded_log(path: Path, uid: int | None = None, reader: tuple[int, int] | None = None
                ) -> tuple[int, subprocess.Popen[bytes]]:
    """The write end of a pipe for a process's log that the sandbox may write to (a guest's
    serial port; gVisor's stderr, which a command reopens through /proc/1/fd/2 there), and
    its reader (ak-logcap, a static binary in a session of its own: the sandbox may
    outlive us), which keeps the first LOG_MAX_BYTES in `path` (made 0600, never through a
    link) and drops the rest until the writers are gone. The pipe keeps a reader for as
    long as it has a writer: runsc (Go) dies of SIGPIPE on a write to its stderr that has
    none. `uid` gets the write end, for a process that drops to it and reopens the pipe
    through /proc/self/fd; `reader` (uid, gid) is who the reader becomes before it reads
    (it needs nothing of ours: `path` is opened here)."""
    from .. import spawn

    argv = log_reader_argv(LOG_MAX_BYTES, reader)
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                  0o600)
    try:
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            if uid is not None:
                os.fchown(w, uid, uid)
            # Its stderr is the log too: a reader that cannot become `reader` says why
            # there (one line, then it exits), where startup_failure reads the reason.
            reader_proc: subprocess.Popen[bytes]
            if spawn.available():  # without the GIL held while it execs (spawn.py)
                reader_proc = spawn.SpawnedPopen(argv, {}, stdin=r, stdout=out, stderr=out)
            else:
                reader_proc = subprocess.Popen(argv, stdin=r, stdout=out, stderr=out,
                                               close_fds=True, start_new_session=True,
                                               env={}, cwd="/")
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
    finally:
        os.close(out)
    return w, reader_proc


def startup_failure(what: str, log: Path | int, process: subprocess.Popen[bytes]
                    ) -> SandboxError:
    """Explain why a sandbox did not come up, from the backend's own stderr (a file, or a
    descriptor of one: its last STARTUP_TAIL bytes)."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=2)
    text = ""
    with contextlib.suppress(OSError):
        if isinstance(log, int):
            size = os.fstat(log).st_size
            text = os.pread(log, STARTUP_TAIL, max(0, size - STARTUP_TAIL)).decode(
                errors="replace").strip()
        else:
            text = log.read_text(errors="replace").strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    reason = lines[-1] if lines else f"exit status {process.returncode}"
    return SandboxError(f"{what} failed to start the sandbox: {reason}")


def control_dir(scratch: Path) -> Path:
    path = scratch / CONTROL_DIR
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def open_channel(spawned: Spawned, control: Path | None, timeout: float = 30.0) -> AgentClient:
    """The agent's channel: our pipes, or for a persistent sandbox its control socket.

    A persistent sandbox must not depend on this process, so its agent listens on a unix
    socket in the scratch dir instead of talking over pipes that die with us.
    """
    from ..agent.client import AgentClient

    if control is None:
        return AgentClient.from_fds(spawned.read_fd, spawned.write_fd)
    import socket
    import time

    from ..paths import connect_socket_file

    close_fds(spawned.read_fd, spawned.write_fd)
    path = control / "agent.sock"
    deadline = time.monotonic() + timeout
    while True:
        if spawned.process.poll() is not None:
            raise SandboxError("the sandbox exited before its agent was ready")
        if path.exists():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                connect_socket_file(sock, path)
                return AgentClient.from_socket(sock)
            except OSError:
                sock.close()
        if time.monotonic() > deadline:
            raise SandboxError("timed out waiting for the sandbox's agent socket")
        time.sleep(0.005)


def _descendants(pid: int, limit: int = 4096) -> list[int]:
    """Every process below `pid` (children first), read from /proc; bounded."""
    found: list[int] = []
    todo = [pid]
    while todo and len(found) < limit:
        parent = todo.pop()
        try:
            text = Path(f"/proc/{parent}/task/{parent}/children").read_text()
        except OSError:
            continue
        kids = [int(k) for k in text.split()]
        found.extend(kids)
        todo.extend(kids)
    return found


def abandon(
    scratch: Path,
    process: subprocess.Popen[bytes] | None,
    cgroup: Cgroup | None,
    helpers: Sequence[subprocess.Popen[bytes]] = (),
) -> None:
    """Undo a start that failed before a Sandbox object owned its pieces: nothing leaks
    (not even when a second signal comes while the first one's cleanup runs)."""
    with signals_deferred():
        _abandon(scratch, process, cgroup, helpers)


def _abandon(
    scratch: Path,
    process: subprocess.Popen[bytes] | None,
    cgroup: Cgroup | None,
    helpers: Sequence[subprocess.Popen[bytes]],
) -> None:
    import signal

    if process is not None and process.poll() is None:
        # The sandbox's own init is in a session (and pid namespace) of its own, and a
        # persistent one does not die with its parent: kill it by name, then the rest.
        for pid in _descendants(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # its own session: the whole tree
        process.wait()
    if cgroup is not None:
        cgroup.destroy()
    for helper in helpers:
        if helper.poll() is None:
            helper.kill()
            helper.wait()
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)
