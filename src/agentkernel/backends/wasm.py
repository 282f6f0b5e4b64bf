"""The wasm backend: WASI (preview1) modules on wasmtime, in a confined worker process.

A module sees only what WASI grants it: its argv and environment, stdin/stdout/stderr,
and the project dir preopened at /workspace (read-write only where the profile says `rw`;
`cow` and `ro` are read-only, since WASI has no overlay). No other preopen, no socket.

Two barriers, not one. wasmtime runs in a worker process (wasm_worker.py) of its own,
started through the namespaces backend: its own user namespace (an unprivileged host id
range when root starts it, the caller's own uid otherwise), pid/ipc/uts/cgroup namespaces,
an empty network namespace, a mount namespace that shows only the interpreter, wasmtime,
this package and the project at /workspace (read-only unless `rw`), the agent's
no_new_privs + seccomp filter, a cgroup (memory, pids) or rlimits where there is none.
No data or runtime dir of ours is in it. A wasmtime escape is code in that sandbox, no
more: not the CLI, not the daemon, never host root.

Untrusted input meets Cranelift in neither this process nor the worker: a compiler child
(wasm_compile.py), one per new module, bounded in memory, CPU and wall time, without root,
files or network, compiles and checks it (a module that needs gigabytes or minutes to
compile exhausts that child, and is refused, CompileBoundExceeded). This process keeps the
compiled modules in the ours-only disk cache (wasm_cache) and in memory, and hands the
worker the compiled bytes with the job over its stdin; it never loads them itself. The
worker never writes anything this process later trusts: a compromised worker cannot plant
a `.cwasm`, whose loading would be code execution.

Timeouts are enforced from here (SIGKILL through the agent), not by the worker; memory is
capped exactly by the worker's store limiter (memory.grow answers -1 past the profile's
limit) and, around the whole worker, by its cgroup. Each job gets a new Store, WASI
context and instance in the worker; the worker keeps its engine and the modules it has
deserialized. Without a daemon a worker serves one run. A daemon's pool keeps workers
warm (sandbox up, wasmtime imported) and gives a worker back after a run that ended
cleanly, for the next run of the same pool key: the same user, profile and project dir.
So the residual risk of a wasmtime escape grows from "its own run" to "the later runs of
that key in that worker" (their argv, env and stdin), bounded by WORKER_RUNS; a worker
that timed out, was signalled, ran out of memory or broke the protocol is destroyed.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import signal
import stat
import subprocess
import sys
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..agent.client import AgentClient, AgentInfo, Execution, ExitStatus
from ..errors import (
    AgentRequestError,
    BackendUnavailable,
    CommandNotExecutable,
    CommandNotFound,
    CompileBoundExceeded,
    Conflict,
    ProtocolError,
    SandboxError,
    UsageError,
)
from ..sandbox import Sandbox, SandboxSpec
from .base import Backend, Probe

if TYPE_CHECKING:
    import queue
    import socket

    from ..profiles import Profile, WorkspaceMode
    from ..rootfs import HostRootfs

MAX_MODULE_BYTES = 64 * 1024 * 1024  # a module (or its text) larger than this is refused
MAX_JOB_HEADER = 512 * 1024  # argv + env of one run, as JSON (the worker takes up to 1 MiB)
COMPILED_KEPT = 64  # compiled modules kept in memory (least recently used go) ...
COMPILED_KEPT_BYTES = 256 * 1024 * 1024  # ... and at most this many bytes of them
WORKSPACE = "/workspace"
# Where wasmtime and this package appear in the worker (a dir of its own: nothing else
# of the host's paths comes with them).
WORKER_ROOT = "/ak-wasm"
WORKER_SCRIPT = f"{WORKER_ROOT}/agentkernel/backends/wasm_worker.py"
# The worker's memory cap is the module's plus this, for the interpreter, wasmtime and
# the agent: the module's own limit is the store limiter's, exact.
WORKER_OVERHEAD_MB = 256
WORKER_PIDS = 64  # the agent, the interpreter, wasmtime's threads
READY_TIMEOUT = 60.0  # seconds for a worker to import wasmtime on a loaded host
# A daemon's worker serves this many jobs at most, then it is replaced (a bound on what
# one worker's lifetime sees), and keeps at most this many bytes of compiled modules.
WORKER_RUNS = 1000
WORKER_MODULE_BYTES = 64 * 1024 * 1024
# A module is compiled in a child of its own (wasm_compile.py), bounded: its address space,
# its CPU time (all threads), and its wall time (2x its CPU time and 10 s more, as its
# threads may overlap and a loaded host slows it). The environment may change the first
# two (a user's own daemon or CLI; a module or a project file cannot).
COMPILE_MEMORY_MB = 2048
COMPILE_CPU_SECONDS = 60
COMPILES_AT_ONCE = 2  # more compiles wait for one of these to end
REFILL_AFTER = 0.05  # seconds after a compile before a daemon starts its next child ahead
COMPILE_ANSWER_BYTES = 256 * 1024 * 1024 + 1  # wasm_cache.MAX_ENTRY_BYTES, one more
COMPILE_ANSWER_HEAD = 5  # the compiler's answer: kind (K/E), payload length (4 bytes)
COMPILE_SCRIPT = Path(__file__).resolve().with_name("wasm_compile.py")
NOBODY = 65534  # a compiler child's ids where root's id block has no range to spare


_VERSION: list[str | None] = []


def wasmtime_version() -> str | None:
    """The installed wasmtime's version, without importing it (None: not installed).

    Read from its dist-info dir's name: importlib.metadata would scan every distribution
    on the path (tens of ms on a busy host), on every run's backend choice."""
    if not _VERSION:
        _VERSION.append(_find_version())
    return _VERSION[0]


def _find_version() -> str | None:
    spec = _wasmtime_spec()
    if spec is None or not spec.origin:
        return None
    site = Path(spec.origin).parent.parent
    with contextlib.suppress(OSError):
        for entry in os.scandir(site):
            if entry.name.startswith("wasmtime-") and entry.name.endswith(".dist-info"):
                return entry.name[len("wasmtime-"):-len(".dist-info")]
    return "unknown"


def _wasmtime_spec() -> Any:
    from importlib.util import find_spec

    return find_spec("wasmtime")


def hyperlight_unavailable() -> str:
    """Why Hyperlight cannot run here. It never can yet: we have no Hyperlight driver. The
    host's reason comes first, as it is the one a user can act on."""
    from ..vm.kvm import kvm_verdict

    ok, detail = kvm_verdict()
    host = "" if ok else detail.split(":")[0] + "; "
    return host + "no Hyperlight driver in agentkernel"


class WasmBackend(Backend):
    name = "wasm"
    # wasmtime inside a namespaces sandbox: never weaker than namespaces alone.
    strength = 10
    persistent = False
    image_free = True

    def __init__(self, requested: str = "wasm") -> None:
        version = wasmtime_version() or "missing"
        self.isolation = (f"WebAssembly (wasmtime {version}, WASI preview1) in a worker "
                          f"confined by Linux namespaces + seccomp; only {WORKSPACE} "
                          "preopened, no network")
        self.substitute: str | None = None
        if requested == "hyperlight":
            why = hyperlight_unavailable()
            self.isolation += f" (hyperlight unavailable: {why})"
            self.substitute = f"hyperlight unavailable ({why}): running on the wasm backend"

    def probe(self, deep: bool = False) -> Probe:
        from .namespaces import NamespacesBackend

        version = wasmtime_version()
        if version is None:
            return Probe(False, "the wasmtime Python package is not installed")
        ns = NamespacesBackend().probe(deep)
        if not ns.ok:
            return Probe(False, f"its worker runs in a namespaces sandbox: {ns.detail}")
        if not deep:
            return Probe(True, f"wasmtime {version}")
        try:
            compile_bounded(b'(module (func (export "_start")))', "probe")
        except Exception as exc:  # any failure is the probe's answer
            return Probe(False, f"wasmtime {version} cannot compile a module: {exc}")
        return Probe(True, f"wasmtime {version} compiles WASI modules (in a bounded child; "
                           "cached in the data dir); they run in confined worker sandboxes")

    def pooled(self) -> None:
        # A daemon serves wasm runs: a compiler child started ahead (wasmtime imported,
        # bounded, waiting for a module), so that a new module pays only its compile.
        compiler().prepare()

    def version_files(self) -> tuple[str, ...]:
        from .namespaces import NamespacesBackend

        spec = _wasmtime_spec()
        where = str(Path(spec.origin).parent) if spec is not None and spec.origin else ""
        return (where, *NamespacesBackend().version_files())

    def start(self, spec: SandboxSpec) -> Sandbox:
        if spec.persistent:
            raise Conflict("the wasm backend runs one module per run and keeps nothing: "
                           "it has no persistent sandboxes (drop --keep)")
        hidden = [m for m in spec.masks if m.startswith(WORKSPACE + "/")]
        if hidden:
            # A preopen shows the whole tree: WASI cannot hide a sub-dir the way a mount can.
            raise UsageError(
                f"the project dir {spec.workspace} contains agentkernel's own state "
                f"({', '.join(hidden)} inside), which a WASI preopen cannot hide: use a "
                "project dir that does not")
        return start_worker(spec, self.isolation)


# ---------------------------------------------------------------- the worker's sandbox


def worker_profile(profile: Profile, has_workspace: bool) -> Profile:
    """The namespaces profile a worker runs under: never a network, the project read-only
    unless `rw` (WASI has no overlay for `cow`), nothing of $HOME, room for the
    interpreter above the module's own memory limit, the strictest seccomp policy
    whatever the profile (an interpreter running wasmtime needs none of what it denies)."""
    workspace: WorkspaceMode = (("rw" if profile.workspace == "rw" else "ro") if has_workspace
                                else "none")
    memory = profile.memory_mb + WORKER_OVERHEAD_MB if profile.memory_mb else None
    return profile._replace(network="none", workspace=workspace, mount_home=False,
                            pass_env=False, root_writable=False, memory_mb=memory,
                            pids=WORKER_PIDS, seccomp="restrictive")


def worker_rootfs() -> HostRootfs:
    """What the worker's root shows, read-only: /usr (and the /lib, /bin links into it),
    the interpreter's own prefix if it lives elsewhere, wasmtime and this package under
    WORKER_ROOT. No /etc, no home, no data or runtime dir."""
    from ..rootfs import HostEntry, HostRootfs, host_rootfs

    entries = [e for e in host_rootfs().entries if e.path != "/etc"]
    prefix = os.path.realpath(sys.base_prefix)
    if not any(prefix == e.path or prefix.startswith(e.path + "/") for e in entries
               if e.kind == "ro-bind"):
        entries.append(HostEntry("ro-bind", prefix))
    spec = _wasmtime_spec()
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailable("the wasmtime Python package is not installed")
    package = Path(__file__).resolve().parent.parent
    entries.append(HostEntry("ro-bind", f"{WORKER_ROOT}/wasmtime",
                             source=os.path.realpath(spec.submodule_search_locations[0])))
    entries.append(HostEntry("ro-bind", f"{WORKER_ROOT}/agentkernel", source=str(package)))
    return HostRootfs(tuple(entries), (), name="wasm-worker")


def worker_spec(spec: SandboxSpec) -> SandboxSpec:
    workspace = spec.workspace if spec.profile.workspace != "none" else None
    return spec._replace(profile=worker_profile(spec.profile, workspace is not None),
                         rootfs=worker_rootfs(), workspace=workspace, home=None,
                         hostname="agentkernel-wasm", masks=())


def start_worker(spec: SandboxSpec, isolation: str) -> WasmSandbox:
    """A namespaces sandbox with a worker started in it: it imports wasmtime meanwhile (a
    cold run compiles or reads the cache at the same time) and says when it is ready;
    the first `exec` waits for that before it hands over a job.

    The worker's stdin and stdout are one end of a socket pair made here, which its
    sandbox's agent holds for it (`--give`) and hands to it alone (`given_stdio`): jobs and
    their output go straight between this process and the worker, never through the
    agent and our reader thread of its channel (two processes and a thread fewer to wake
    for each run). The pair has no name or path: nothing else can connect to either end.
    The agent still starts, signals, times out and reaps the worker, and carries its own
    stderr and exit."""
    import socket

    from .namespaces import NamespacesBackend

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # (bwrap's monitor closes what it passed on: the worker alone keeps its end.)
        inner = NamespacesBackend().start(worker_spec(spec), give=theirs.fileno())
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    try:
        python = os.path.realpath(sys.executable)
        worker = inner.client.exec(
            [python, "-I", "-S", WORKER_SCRIPT], env={"PATH": "/usr/bin:/bin"}, cwd="/",
            given_stdio=True, rlimits=inner.command_rlimits())
    except BaseException:
        ours.close()
        inner.destroy()
        raise
    return WasmSandbox(spec, isolation, inner, _Worker(worker, ours))


RECV_BYTES = 256 * 1024  # one read of the worker's channel, at most
LAST_WORDS = 4096  # bytes of a dead worker's stderr kept for the error it explains


class _Worker:
    """This side of one worker: its channel (the socket its stdin and stdout are), the
    agent's execution of it (its own stderr, its exit), the frames it sent not yet read,
    the modules it holds (this side decides which: it evicts them), and whether it may
    serve another job. One job at a time; one writer at a time."""

    def __init__(self, execution: Execution, channel: socket.socket) -> None:
        self.execution = execution
        self.channel = channel
        self.ready = False
        self.busy = False
        self.broken = False  # killed, timed out, signalled, or it broke the protocol
        self.ended = False  # its channel is at its end (or we stopped reading it)
        self.runs = 0
        self.modules: OrderedDict[str, int] = OrderedDict()  # key -> compiled bytes
        self._buf = bytearray()
        self._wlock = threading.Lock()

    def send(self, data: bytes) -> None:
        """Frames to the worker, whole. Blocks while it does not read (back-pressure);
        ProtocolError once it is gone."""
        try:
            with self._wlock:
                self.channel.sendall(data)
        except OSError as exc:
            raise ProtocolError(f"the wasm worker's channel failed: {exc}") from None

    def wait(self, timeout: float) -> bool:
        """Whether the channel has something to read (or its end), waiting up to
        `timeout` seconds."""
        import select

        poller = select.poll()
        poller.register(self.channel, select.POLLIN)
        return bool(poller.poll(max(0, math.ceil(timeout * 1000))))

    def receive(self, timeout: float | None) -> list[tuple[bytes, bytes]] | None:
        """The frames the worker's next bytes complete ([] if none yet), waiting up to
        `timeout` seconds for them (None: as long as it takes; TimeoutError beyond it);
        None at its channel's end. ProtocolError: a frame it never sends."""
        if timeout is not None and not self.wait(timeout):
            raise TimeoutError("the wasm worker said nothing in time")
        try:
            data = self.channel.recv(RECV_BYTES)
        except OSError:
            data = b""
        if not data:
            self.ended = True
            return None
        return self.parse(data)

    def parse(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """The whole frames `data` completes. The worker is confined, not trusted: a frame
        it has no reason to send, or a longer one than it ever sends, is a ProtocolError;
        empty output frames are dropped (bounded work per read)."""
        from .wasm_worker import HEAD, OUT_CHUNK

        self._buf += data
        out = []
        while len(self._buf) >= HEAD:
            kind = bytes(self._buf[:1])
            size = int.from_bytes(self._buf[1:HEAD], "big")
            if kind not in (b"O", b"E", b"X", b"R") or size > OUT_CHUNK:
                raise ProtocolError(f"the wasm worker sent a bad frame ({kind!r}, {size})")
            if len(self._buf) < HEAD + size:
                break
            if size or kind not in (b"O", b"E"):
                out.append((kind, bytes(self._buf[HEAD:HEAD + size])))
            del self._buf[:HEAD + size]
        return out

    def await_ready(self) -> list[tuple[bytes, bytes]]:
        """The worker's ready frame, and the frames that came with it (of the job sent
        ahead of it); its end before it is why it did not start."""
        import time

        from .wasm_worker import READY

        deadline = time.monotonic() + READY_TIMEOUT
        try:
            while True:
                frames = self.receive(max(0.0, deadline - time.monotonic()))
                if frames is None:
                    self.kill()
                    raise SandboxError(f"the wasm worker did not start: {self.last_words()}")
                if not frames:
                    continue  # the frame is not whole yet
                if frames[0] != (READY, b""):
                    raise ProtocolError("the wasm worker spoke before it was ready")
                self.ready = True
                return frames[1:]
        except TimeoutError:
            self.kill()
            raise SandboxError("the wasm worker did not start in time") from None
        except ProtocolError as exc:
            self.kill()
            raise SandboxError(f"the wasm worker's sandbox died: {exc}") from None

    def last_words(self) -> str:
        """What a worker whose channel ended said on its stderr, else how it ended."""
        said = b""
        with contextlib.suppress(Exception):  # its agent may be gone too
            while True:
                _kind, payload = self.execution._next(5.0)
                if isinstance(payload, ExitStatus):
                    return said.decode(errors="replace").strip() or str(payload)
                said = (said + payload)[-LAST_WORDS:]
        return said.decode(errors="replace").strip() or "its channel ended"

    def send_job(self, key: str, compiled: bytes, job: bytes) -> None:
        """The job (its JSON), after the module if the worker does not hold it (and the
        drops that make room for it), in one write."""
        from .wasm_worker import MAX_MODULES, frame

        out = []
        if key in self.modules:
            self.modules.move_to_end(key)
        else:
            while self.modules and (len(self.modules) >= MAX_MODULES or sum(
                    self.modules.values()) + len(compiled) > WORKER_MODULE_BYTES):
                old, _size = self.modules.popitem(last=False)
                out.append(frame(b"D", old.encode()))
            out.append(frame(b"M", key.encode() + compiled))
            self.modules[key] = len(compiled)
        out.append(frame(b"J", job))
        self.send(b"".join(out))

    def pending(self) -> bool:
        """Whether bytes of a frame not yet whole wait here."""
        return bool(self._buf)

    def kill(self) -> None:
        self.broken = True
        with contextlib.suppress(Exception):  # it may be gone already
            self.execution.signal(signal.SIGKILL)

    def hang_up(self) -> None:
        """Stop reading and writing its channel: a thread blocked on it returns (EOF)."""
        self.broken = True
        with contextlib.suppress(OSError):
            self.channel.shutdown(2)  # SHUT_RDWR

    @property
    def usable(self) -> bool:
        """Not broken, its channel not at its end, its process not known to have ended:
        what this side knows already, without asking (no system call)."""
        return not (self.broken or self.ended or self.execution.status is not None)

    @property
    def alive(self) -> bool:
        """Whether it may take a job (the pool asks before it hands it out). Between jobs
        a worker says nothing but, once, that it is ready: anything else it said, on its
        channel or its stderr (its exit above all: it died while waiting), retires it,
        rather than end the next run before it began."""
        if not self.usable:
            return False
        if self.busy:
            return True  # what it says is the job's
        from .wasm_worker import READY

        quiet = not self.execution.ready()  # its stderr or its exit, through its agent
        while quiet and self.wait(0):
            try:
                frames = self.receive(0)
            except (ProtocolError, TimeoutError):
                frames = None
            # (before its ready frame only that frame may come, or part of it; then nothing)
            quiet = frames is not None and not self.ready and frames in ([], [(READY, b"")])
            self.ready = self.ready or bool(frames)
        if not quiet:
            self.broken = True
        return quiet


# ---------------------------------------------------------------- compiling (this process)


class _Compiler:
    """The compiled modules kept in memory (and, in a daemon, a compiler child started
    ahead). A module met for the first time is compiled by a bounded child (see
    compile_bounded), never in this process."""

    def __init__(self) -> None:
        # The worker's engine has the same (default) settings: compiled code is only
        # loaded by an engine configured as the one that compiled it.
        self.fingerprint = (f"wasmtime {wasmtime_version()}; default config; "
                            f"{os.uname().machine}; worker")
        self._lock = threading.Lock()
        self._by_file: OrderedDict[tuple[int, ...], str] = OrderedDict()
        self._by_key: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._refused: OrderedDict[str, str] = OrderedDict()  # key -> why (bounds hit)
        self._ahead = False

    def prepare(self) -> None:
        """Keep a compiler child started ahead (a daemon: the first run of a new module
        then pays its compile, not the child's interpreter and wasmtime import)."""
        self._ahead = True
        _CHILDREN.keep_spare()

    def module(self, path: Path, shown: str) -> tuple[str, bytes]:
        """The compiled module at `path` and its cache key: from memory, the disk cache, or
        compiled now."""
        # The warm path: a file seen before, unchanged (same inode, size, mtime and
        # ctime), is one stat. Anything else opens it, with the checks that go with that.
        with contextlib.suppress(OSError):
            seen = os.stat(path)
            known = self._known(_ident(seen)) if stat.S_ISREG(seen.st_mode) else None
            if known is not None:
                return known
        fd, st = _open_module(path, shown)
        try:
            ident = _ident(st)
            known = self._known(ident)
            if known is not None:
                return known
            source = _read_all(fd, st.st_size)
        finally:
            os.close(fd)
        from .wasm_cache import cache_key

        key = cache_key(source, self.fingerprint)
        with self._lock:
            compiled = self._by_key.get(key)
            refused = self._refused.get(key)
        if refused is not None:  # it hit a compile bound: not compiled again for nothing
            raise CommandNotExecutable(f"{shown}: {refused}", errno.ENOEXEC)
        if compiled is None:
            from .wasm_cache import load

            # An entry is only ever written by _compile, after its checks, and carries its
            # own digest: one that loads is the checked module, byte for byte.
            compiled = load(key) or self._compile(key, source, shown)
        self._remember(ident, key, compiled)
        return key, compiled

    def _known(self, ident: tuple[int, ...]) -> tuple[str, bytes] | None:
        with self._lock:
            key = self._by_file.get(ident)
            compiled = self._by_key.get(key) if key is not None else None
            if compiled is None or key is None:
                return None
            self._by_file.move_to_end(ident)
            self._by_key.move_to_end(key)
            return key, compiled

    def _compile(self, key: str, source: bytes, shown: str) -> bytes:
        """Compile and check in a bounded child (a WASI command whose imports WASI
        preview1 offers): only a module that passes is cached, so a cache hit needs no
        check. A module that hit a bound is remembered as refused (a few dozen)."""
        from .wasm_cache import store

        try:
            compiled = compile_bounded(source, shown, spare=self._ahead)
        except CompileBoundExceeded as exc:
            with self._lock:
                self._refused[key] = exc.why
                while len(self._refused) > COMPILED_KEPT:
                    self._refused.popitem(last=False)
            raise
        # (A daemon writes the cache entry off the run's path: its runs find the module
        # in memory meanwhile; the write and the cache's trim cost a run ~0.3 ms or more.)
        if not (self._ahead and _CHILDREN.later(lambda: store(key, compiled))):
            store(key, compiled)
        return compiled

    def _remember(self, ident: tuple[int, ...], key: str, compiled: bytes) -> None:
        with self._lock:
            if key not in self._by_key:
                self._bytes += len(compiled)
            self._by_key[key] = compiled
            self._by_key.move_to_end(key)
            self._by_file[ident] = key
            while self._by_key and (len(self._by_key) > COMPILED_KEPT
                                    or self._bytes > COMPILED_KEPT_BYTES):
                _old, dropped = self._by_key.popitem(last=False)
                self._bytes -= len(dropped)
            while len(self._by_file) > COMPILED_KEPT:
                self._by_file.popitem(last=False)


_COMPILER: _Compiler | None = None
_COMPILER_LOCK = threading.Lock()


def compiler() -> _Compiler:
    global _COMPILER
    with _COMPILER_LOCK:
        if _COMPILER is None:
            _COMPILER = _Compiler()
        return _COMPILER


# ---------------------------------------------------------------- the compiler child


def compile_bounds() -> tuple[int, int]:
    """The compile bounds: address space in MiB, CPU seconds (AGENTKERNEL_WASM_COMPILE_
    MEMORY_MB / _CPU_SECONDS where set to a positive number)."""
    def given(name: str, default: int) -> int:
        raw = os.environ.get(name, "")
        return int(raw) if raw.isdigit() and 0 < int(raw) < 1 << 20 else default

    return (given("AGENTKERNEL_WASM_COMPILE_MEMORY_MB", COMPILE_MEMORY_MB),
            given("AGENTKERNEL_WASM_COMPILE_CPU_SECONDS", COMPILE_CPU_SECONDS))


class _Children:
    """Compiler children: at most COMPILES_AT_ONCE at work, and, in a daemon, one started
    ahead (forked by the fork server, or its own interpreter up and wasmtime imported; its
    bounds set, waiting for its module). Each child compiles one module and exits:
    nothing of one untrusted module is there for the next. A daemon's keeper thread reaps
    the children that answered and starts the next one ahead."""

    def __init__(self) -> None:
        self.slots = threading.BoundedSemaphore(COMPILES_AT_ONCE)
        self._lock = threading.Lock()
        self._spare: _Child | None = None
        self._keep = False
        self._work: queue.SimpleQueue[Callable[[], None]] | None = None  # (keep_spare)

    def keep_spare(self) -> None:
        import queue

        with self._lock:
            if self._keep:
                return
            self._keep = True
            self._work = queue.SimpleQueue()
        threading.Thread(target=self._keeper, name="ak-wasm-compiler", daemon=True).start()

    def take(self) -> _Child:
        """A child for one module: the one started ahead if it still waits, else a new
        one (the next one ahead is started once this one answered: `refill`)."""
        with self._lock:
            child, self._spare = self._spare, None
        if child is not None and child.poll() is None:
            return child
        if child is not None:
            _reap(child)
        return _FORKS.fork() or _spawn()

    def later(self, work: Callable[[], None]) -> bool:
        """Run `work` on the keeper's thread (a daemon's), off the caller's path: a put on
        its queue, no thread started. False where there is no keeper."""
        if self._work is None:
            return False
        self._work.put(work)
        return True

    def refill(self, done: _Child) -> None:
        """`done` (killed already) reaped, and the next child started ahead, by the
        keeper: REFILL_AFTER from now, once the run that waited for this compile has its
        answer (a fork or a process start takes the daemon's GIL for a while)."""
        def replace() -> None:
            import time

            time.sleep(REFILL_AFTER)
            _reap(done)
            self._refill()

        if not self.later(replace):
            _reap(done)

    def _keeper(self) -> None:
        """The first child ahead; then the work it is given, in turn."""
        self._refill()
        assert self._work is not None
        while True:
            work = self._work.get()
            try:
                work()
            except Exception as exc:  # the keeper must go on
                print(f"agentkernel: wasm compiler keeper: {exc}", file=sys.stderr,
                      flush=True)

    def _refill(self) -> None:
        try:
            child = _FORKS.fork() or _spawn(ahead=True)
        except Exception as exc:  # the keeper must go on: the next compile starts its own
            print(f"agentkernel: no wasm compiler child ahead: {exc}", file=sys.stderr,
                  flush=True)
            return
        with self._lock:
            old, self._spare = self._spare, child
        if old is not None:
            _reap(old)


_CHILDREN = _Children()


class _Forked:
    """A compiler child forked by this process's fork server (wasm_compile.serve): the
    server is its parent, which reaps it, kills the rest of its session once it ended
    and writes its wait status to our status pipe. We kill it through its pidfd (its
    pid alone could be another process's by then). What this module uses of a Popen."""

    def __init__(self, pid: int, pidfd: int, fds: list[int]) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd = pidfd
        self._status = fds[3]
        self.stdin = open(fds[0], "wb", buffering=0)  # noqa: SIM115 (closed by _end)
        self.stdout = open(fds[1], "rb", buffering=0)  # noqa: SIM115
        self.stderr = open(fds[2], "rb", buffering=0)  # noqa: SIM115

    def poll(self) -> int | None:
        return self._ended(0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._ended(timeout)
        if code is None:
            raise subprocess.TimeoutExpired("wasm compiler", timeout or 0.0)
        return code

    def _ended(self, timeout: float | None) -> int | None:
        """Its exit code (-N: signal N) once the server wrote its status, waiting up to
        `timeout` seconds for it. A server gone first leaves it killed (-SIGKILL)."""
        import select

        if self.returncode is not None:
            return self.returncode
        poller = select.poll()
        poller.register(self._status, select.POLLIN)
        if not poller.poll(None if timeout is None else math.ceil(timeout * 1000)):
            return None
        try:
            raw = os.read(self._status, 4)
        except OSError:
            raw = b""
        if len(raw) == 4:
            self.returncode = os.waitstatus_to_exitcode(int.from_bytes(raw, "big"))
        else:
            self.kill()
            self.returncode = -signal.SIGKILL
        self._close()
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def _close(self) -> None:
        for fd in (self._status, self._pidfd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._status = self._pidfd = -1

    def __del__(self) -> None:
        self._close()


_Child = subprocess.Popen[bytes] | _Forked
FORK_SERVER_TIMEOUT = 30.0  # seconds for its start (wasmtime's import) and each fork
FORK_SERVER_FAILURES = 3  # then children are started afresh, as without a server


class _Busy(Exception):
    """The fork server refused a fork: it has its most children."""


class _ForkServer:
    """This process's compiler fork server (wasm_compile.serve), started with the first
    child it is asked for: a child from it costs a fork, not an interpreter's start-up and
    wasmtime's import (~100 ms of CPU for each module a daemon compiles). Spoken to over
    a socket pair only this process holds. `fork` returns None where it cannot (the
    caller starts a child itself)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._ctl: socket.socket | None = None
        self._failures = 0

    def fork(self) -> _Forked | None:
        with self._lock:
            if self._failures >= FORK_SERVER_FAILURES:
                return None
            try:
                if self._ctl is None:
                    self._ctl = self._start()
                child = self._fork(self._ctl)
            except _Busy:
                # At its limit of children, other threads' compiles in them: this one
                # starts its own child, the server and theirs go on.
                return None
            except (OSError, ValueError) as exc:
                self._failures += 1
                self._stop()
                print(f"agentkernel: the wasm compiler fork server failed: {exc}",
                      file=sys.stderr, flush=True)
                return None
            self._failures = 0
            return child

    def _start(self) -> socket.socket:
        import socket

        spec = _wasmtime_spec()
        if spec is None or not spec.submodule_search_locations:
            raise BackendUnavailable("the wasmtime Python package is not installed")
        memory, cpu = compile_bounds()
        where = os.path.dirname(os.path.realpath(spec.submodule_search_locations[0]))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # As a started child is (-I -S, a clean environment, its own session, cwd /),
            # with its end of the pair alone; its stderr is ours (our log).
            self._proc = subprocess.Popen(
                [os.path.realpath(sys.executable), "-I", "-S", str(COMPILE_SCRIPT), where,
                 str(memory << 20), str(cpu), "serve", str(theirs.fileno())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),), env={"PATH": "/usr/bin:/bin"}, cwd="/",
                start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.settimeout(FORK_SERVER_TIMEOUT)
        return ours

    @staticmethod
    def _fork(ctl: socket.socket) -> _Forked:
        import socket

        from .wasm_compile import FORK, REFUSED

        pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(4)]  # stdin, stdout, stderr, status
        theirs = [pipes[0][0], pipes[1][1], pipes[2][1], pipes[3][1]]
        mine = [pipes[0][1], pipes[1][0], pipes[2][0], pipes[3][0]]
        fds: list[int] = []
        try:
            uid, gid, lock = _compile_ids()
            theirs += [lock] if lock >= 0 else []  # (the child holds it: its ids alone)
            socket.send_fds(ctl, [FORK + uid.to_bytes(4, "big") + gid.to_bytes(4, "big")],
                            theirs)
            msg, fds = _recv_pidfd(ctl)
            if msg == REFUSED and not fds:
                raise _Busy
            if len(msg) != 4 or len(fds) != 1:
                raise OSError(f"it answered {msg[:16]!r}")
        except BaseException:
            for fd in (*mine, *fds):
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        return _Forked(int.from_bytes(msg, "big"), fds[0], mine)

    def _stop(self) -> None:
        """Close our end (the server then kills its children and exits) and reap it."""
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        if self._proc is not None:
            with contextlib.suppress(OSError):
                self._proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)
            self._proc = None


_FORKS = _ForkServer()


def _recv_pidfd(ctl: socket.socket) -> tuple[bytes, list[int]]:
    """The fork server's answer and the fds it carries, close-on-exec from their arrival
    (socket.recv_fds leaves them inheritable: a process another thread starts meanwhile
    would keep one)."""
    import array
    import socket

    size = array.array("i").itemsize
    msg, ancdata, _flags, _addr = ctl.recvmsg(16, socket.CMSG_SPACE(size),
                                              socket.MSG_CMSG_CLOEXEC)
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % size])
    return msg, list(fds)


def _compile_ids() -> tuple[int, int, int]:
    """The host uid and gid a root-started compiler child gives root up for, and the fd of
    a lock it must hold while it lives (-1: none). The first id of the range of root's id
    block no sandbox ever gets (idmap.helper_range), shared by root's compiler children
    alone (one may signal another: a compile in flight a hostile module's child then fails):
    no other user can signal, ptrace or renice one, nor it them; and one a hostile module
    took over, that leaves a process behind (a setsid()'d grandchild outlives our kill),
    can never meet a later sandbox's processes under the same uid, as a range
    `allocate` gives out again could. Where the block is too small to keep one aside,
    nobody (65534), as before. Not root: the child keeps our ids (these go unused)."""
    if os.geteuid() != 0:
        return NOBODY, NOBODY, -1
    from ..idmap import helper_range

    rng = helper_range()
    if rng is None:
        return NOBODY, NOBODY, -1
    return rng.uid, rng.gid, -1


def _spawn(ahead: bool = False) -> subprocess.Popen[bytes]:
    """A compiler child; `ahead`: started before its module comes, its start-up (the
    interpreter, wasmtime's import: ~50 ms of CPU) at a lower priority, yielding to the
    runs in flight (started by root, it compiles at the normal one again)."""
    spec = _wasmtime_spec()
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailable("the wasmtime Python package is not installed")
    memory, cpu = compile_bounds()
    where = os.path.dirname(os.path.realpath(spec.submodule_search_locations[0]))
    uid, gid, lock = _compile_ids()
    # Its own interpreter, isolated (-I -S: no environment, no site), no fd of ours but
    # its three pipes and its ids' lock, its own session (a terminal's signals are not
    # its), cwd /.
    try:
        return subprocess.Popen(
            [os.path.realpath(sys.executable), "-I", "-S", str(COMPILE_SCRIPT), where,
             str(memory << 20), str(cpu), "ahead" if ahead else "now", str(uid), str(gid)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(lock,) if lock >= 0 else (), env={"PATH": "/usr/bin:/bin"}, cwd="/",
            start_new_session=True)
    finally:
        if lock >= 0:
            os.close(lock)


def _end(child: _Child) -> None:
    """Kill a compiler child and close our ends of its pipes (not waiting for it)."""
    # Its whole session: a compiler that forked would otherwise keep our pipes open.
    # (A forked one's server kills its session once it ended: its pid is ours to
    # signal only through its pidfd.)
    if not isinstance(child, _Forked):
        with contextlib.suppress(OSError):
            os.killpg(child.pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        child.kill()
    for pipe in (child.stdin, child.stdout, child.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


def _reap(child: _Child) -> None:
    _end(child)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(5)


def compile_bounded(source: bytes, shown: str, spare: bool = False) -> bytes:
    """`source` (a module, binary or text) compiled and checked by a bounded child: the
    serialized module. CommandNotExecutable: not a valid WASI command;
    CompileBoundExceeded: it needed more memory or time than the bounds; SandboxError:
    the compiler itself failed. `spare`: this process keeps a child started ahead."""
    memory, cpu = compile_bounds()
    answer: bytes | None = None
    with _CHILDREN.slots:
        child = _CHILDREN.take() if spare else _spawn()
        try:
            answer, said, timed_out = _ask(child, source, 2.0 * cpu + 10.0)
        finally:
            # A whole answer is taken at once: the child is killed now with its session
            # and waited for off this path (its teardown takes milliseconds). Without
            # one, its end names the bound it hit: waited for here.
            _end(child)
            if answer is None:
                _reap(child)
            if spare:
                _CHILDREN.refill(child)
            elif answer is not None:
                threading.Thread(target=_reap, args=(child,), name="ak-wasm-compiler",
                                 daemon=True).start()
    if answer is not None and answer[:1] == b"K":
        return answer[1:]
    if answer is not None:
        invalid = answer[1:LAST_WORDS].decode(errors="replace")
        raise CommandNotExecutable(f"{shown}: {invalid}", errno.ENOEXEC)
    why = _bound_hit(child.returncode, said, timed_out, memory, cpu)
    if why is None:
        raise SandboxError(f"{shown}: the wasm compiler failed ({_child_end(child.returncode)})"
                           f": {said.decode(errors='replace').strip()[-400:] or 'no word'}")
    raise CompileBoundExceeded(f"{shown}: {why}", why, errno.ENOEXEC)


def _bound_hit(code: int | None, said: bytes, timed_out: bool, memory: int,
               cpu: int) -> str | None:
    """Which bound a compiler child's end says it hit (None: none of them)."""
    if timed_out:
        return f"compiling it took longer than {2 * cpu + 10} s (the wasm compile bound): refused"
    if code == -signal.SIGXCPU:
        return (f"compiling it needed more than {cpu} s of CPU time (the wasm compile "
                "bound): refused")
    if code == -signal.SIGKILL:  # the hard CPU limit, or the host's OOM killer
        return (f"compiling it was killed (its bounds: {memory} MiB of memory, {cpu} s of "
                "CPU time): refused")
    if code == 3 or (code == -signal.SIGABRT and b"memory allocation" in said):
        return (f"compiling it needed more than {memory} MiB of memory (the wasm compile "
                "bound): refused")
    return None


def _child_end(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {-code}"
    return f"exit {code}"


def _ask(child: _Child, source: bytes, wall: float
         ) -> tuple[bytes | None, bytes, bool]:
    """Give the child its module and read its answer and its stderr (both bounded): the
    answer (kind and payload) as soon as it is whole; else, once the child ended or
    `wall` seconds passed (then it is killed), None, its stderr, and whether it timed
    out."""
    import select
    import time

    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    deadline = time.monotonic() + wall
    pending = memoryview(source)
    out, err = child.stdout.fileno(), child.stderr.fileno()
    fds = {out: bytearray(), err: bytearray()}
    os.set_blocking(child.stdin.fileno(), False)
    poller = select.poll()
    poller.register(child.stdin.fileno(), select.POLLOUT)
    for fd in fds:
        poller.register(fd, select.POLLIN)
    open_fds = set(fds)
    writing = True
    while open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            _reap(child)
            return None, bytes(fds[err]), True
        for fd, _ev in poller.poll(max(1, math.ceil(left * 1000))):
            if writing and fd == child.stdin.fileno():
                try:
                    pending = pending[os.write(fd, pending[:1 << 20]):]
                except BlockingIOError:
                    continue
                except OSError:  # it ended before it read it all: its end says why
                    pending = pending[:0]
                if not pending:
                    writing = False
                    poller.unregister(fd)
                    child.stdin.close()
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                poller.unregister(fd)
                open_fds.discard(fd)
                continue
            buf = fds[fd]
            buf += chunk
            if fd == err:
                del buf[:-LAST_WORDS]
                continue
            answer = _whole_answer(buf)
            if answer is not None:
                return answer, b"", False
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(max(0.1, deadline - time.monotonic()))
    return None, bytes(fds[err]), False


def _whole_answer(buf: bytearray) -> bytes | None:
    """The compiler's answer (its kind, then its payload) once `buf` holds all of it
    (wasm_compile's framing: kind, 4-byte length, payload); None before. SandboxError
    for what our compiler never sends (a confined child is not trusted to be ours)."""
    if len(buf) < COMPILE_ANSWER_HEAD:
        return None
    size = int.from_bytes(buf[1:COMPILE_ANSWER_HEAD], "big")
    if bytes(buf[:1]) not in (b"K", b"E") or size >= COMPILE_ANSWER_BYTES:
        raise SandboxError("the wasm compiler sent something other than an answer")
    if len(buf) < COMPILE_ANSWER_HEAD + size:
        return None
    if len(buf) > COMPILE_ANSWER_HEAD + size:
        raise SandboxError("the wasm compiler answered more than one answer")
    return bytes(buf[:1] + buf[COMPILE_ANSWER_HEAD:])


def _open_module(path: Path, shown: str) -> tuple[int, os.stat_result]:
    # The module is usually the project's file (a cloned repository's): a link there to a
    # device (/dev/watchdog arms on open, a tty becomes a session leader's terminal) or a
    # FIFO must not be opened by the host, nor the daemon, at all: checked before the open,
    # as detect._read_regular does, and again on the descriptor.
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise CommandNotExecutable(f"{shown}: not a regular file", errno.ENOEXEC)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise CommandNotFound(f"{shown}: no such WebAssembly module", errno.ENOENT) from None
    except OSError as exc:
        raise CommandNotExecutable(f"{shown}: cannot read: {exc.strerror}",
                                   exc.errno or 0) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_MODULE_BYTES:
        os.close(fd)
        why = ("not a regular file" if not stat.S_ISREG(st.st_mode)
               else f"larger than {MAX_MODULE_BYTES >> 20} MiB")
        raise CommandNotExecutable(f"{shown}: {why}", errno.ENOEXEC)
    return fd, st


def _ident(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _read_all(fd: int, size: int) -> bytes:
    from .wasm_cache import read_fd

    return read_fd(fd, min(size, MAX_MODULE_BYTES))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------- one run


class WasmExecution(Execution):
    """One job in a worker, as the caller sees it: the module's output and exit status,
    read out of the worker's frames on its channel by the caller's own thread. A timeout
    is ours to enforce (the worker could ignore its own): SIGKILL through the agent, and
    that worker serves no other job; so does one signalled, cancelled, or that broke the
    protocol. Once the job ended, nothing done to this execution reaches the worker: it
    may be serving the next run already."""

    def __init__(self, worker: _Worker, timeout: float | None, stdin: bool) -> None:
        # Not Execution.__init__: this reads the worker's channel, and the agent's
        # execution of the worker once that channel ended.
        self._worker = worker
        self._stdin = stdin
        self.id = worker.execution.id
        self.pid = worker.execution.pid
        self.status: ExitStatus | None = None
        self._pending: deque[tuple[bytes, bytes]] = deque()
        self._lock = threading.Lock()  # the job's end against a timeout, signal or cancel
        # Input goes to the worker under this lock, and the job ends under it: no input of
        # this run reaches the worker after its end (when it may serve the next run).
        self._input = threading.Lock()
        self._timed_out = False
        self._timer: threading.Timer | None = None
        if timeout is not None:
            self._timer = threading.Timer(timeout, self._expire)
            self._timer.daemon = True
            self._timer.start()

    def _expire(self) -> None:
        with self._lock:
            if self.status is None:
                self._timed_out = True
                self._worker.kill()

    def write_stdin(self, data: bytes) -> None:
        from .wasm_worker import OUT_CHUNK, frame

        with self._input:
            if self.status is None and self._stdin:  # late input of an ended job: nowhere
                self._worker.send(b"".join(frame(b"I", data[i:i + OUT_CHUNK])
                                           for i in range(0, len(data), OUT_CHUNK)))

    def close_stdin(self) -> None:
        from .wasm_worker import frame

        with self._input:
            if self.status is None and self._stdin:
                self._stdin = False
                self._worker.send(frame(b"C"))

    def signal(self, signo: int) -> None:
        # The worker is the module's process: a signal ends (or may end) the worker, so it
        # never serves again.
        with self._lock:
            if self.status is None:
                self._worker.broken = True
                self._worker.execution.signal(signo)

    def resize(self, rows: int, cols: int) -> None:
        return None  # no terminal

    def cancel(self) -> None:
        self._stop_timer()
        with self._lock:
            if self.status is None:
                self._worker.execution.cancel()  # the agent kills it; waiters: Cancelled
                self._worker.hang_up()  # a thread reading its channel returns now

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _end(self, status: ExitStatus, clean: bool) -> ExitStatus:
        self._stop_timer()
        with self._input, self._lock:
            if self._timed_out:
                status = ExitStatus(code=None, signal=signal.SIGKILL, timed_out=True)
            self._worker.broken = self._worker.broken or not clean or self._timed_out
            self._worker.runs += 1
            self._worker.busy = False
            self.status = status
        return status

    def _next(self, timeout: float | None) -> tuple[str, bytes | ExitStatus]:
        while True:
            if self._pending:
                kind, data = self._pending.popleft()
                if kind == b"O":
                    return "stdout", data
                if kind == b"E":
                    return "stderr", data
                end = _exit_status(data) if kind == b"X" else None
                if end is not None:  # the last frame of a job: anything after it is not
                    clean = not self._pending and not self._worker.pending()
                    return "exit", self._end(end, clean=clean)
                self._worker.kill()  # a bad end or a second ready frame: not our worker
                self._worker.hang_up()
                continue
            if self._worker.ended:
                # The worker's channel ended mid-job (it died, or was killed): what it
                # said on its stderr, then how it ended, from its agent.
                _what, payload = self._worker.execution._next(timeout)
                if isinstance(payload, ExitStatus):
                    return "exit", self._end(payload, clean=False)
                return "stderr", payload
            try:
                frames = self._worker.receive(timeout)
            except ProtocolError:
                self._worker.kill()
                self._worker.hang_up()
                continue
            if frames is None:
                self._worker.kill()  # (a worker that hung up is done, whatever it does)
            else:
                self._pending.extend(frames)

    def ready(self, wait: float = 0.0) -> bool:
        return bool(self._pending) or self._worker.ended or self._worker.wait(wait)

    def events(self) -> Iterator[tuple[str, bytes | ExitStatus]]:
        while self.status is None:
            yield self._next(None)


def _exit_status(data: bytes) -> ExitStatus | None:
    """The job's end from an `X` frame; None if the frame is not one the worker sends."""
    import json

    try:
        end = json.loads(data)
        code, signo = end.get("code"), end.get("signal")
        if isinstance(code, int) and 0 <= code <= 255:
            return ExitStatus(code=code, signal=None)
        if isinstance(signo, int) and 0 < signo < 65:
            return ExitStatus(code=None, signal=signo)
    except (ValueError, AttributeError):
        pass
    return None


# ---------------------------------------------------------------- the sandbox and its "client"


class WasmClient(AgentClient):
    """Stands where an agent's channel stands: `exec` hands the worker a job; there is no
    filesystem of the sandbox's own to read or write."""

    def __init__(self, spec: SandboxSpec, agent: AgentClient,
                 worker: _Worker) -> None:  # not AgentClient's: the agent has one
        self._spec = spec
        self._agent = agent
        self.worker = worker
        self._lock = threading.Lock()

    def hello(self, timeout: float = 10.0) -> AgentInfo:
        raise Conflict("the wasm backend's agent serves only its worker")

    def ping(self, timeout: float = 5.0) -> float:
        return self._agent.ping(timeout)

    def exec(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
        cwd: str | None = None, uid: int | None = None, gid: int | None = None,
        timeout: float | None = None, stdin: bool = False, pty: tuple[int, int] | None = None,
        rlimits: Sequence[tuple[int, int, int]] = (), umask: int | None = None,
        given_stdio: bool = False, sent: Callable[[], None] | None = None,
    ) -> Execution:
        if sent is not None:  # (work beside the start: done first here)
            sent()
        if not argv:
            raise UsageError("no module given")
        if pty is not None:
            raise AgentRequestError("the wasm backend has no terminal (drop -t)", errno.ENOTTY)
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive")
        shown = argv[0]
        path = self._module_path(shown)
        key, compiled = compiler().module(path, shown)
        job = self._job(key, [path.name, *argv[1:]], env or {}, stdin, shown)
        with self._lock:
            # (The pool looked at what it said while idle, `alive`, when it handed it out.)
            if self.worker.busy or not (self._agent.alive and self.worker.usable):
                raise Conflict("this wasm sandbox's worker is busy or gone")
            self.worker.busy = True
        try:
            # A worker still starting finds the job waiting once it is ready, and skips
            # its warm-up: this job is its first run anyway.
            self.worker.send_job(key, compiled, job)
            early = [] if self.worker.ready else self.worker.await_ready()
            execution = WasmExecution(self.worker, timeout, stdin)  # the module's time only
            execution._pending.extend(early)
        except BaseException:
            self.worker.kill()
            raise
        return execution

    def _job(self, key: str, argv: list[str], env: Mapping[str, str], stdin: bool,
             shown: str) -> bytes:
        """The job as the worker reads it (JSON), bounded."""
        import json

        profile = self._spec.profile
        has_workspace = self._spec.workspace is not None and profile.workspace != "none"
        job = json.dumps({
            "key": key, "argv": argv, "env": list(env.items()), "stdin": stdin,
            "shown": shown,
            "memory_bytes": profile.memory_mb * 1024 * 1024 if profile.memory_mb else None,
            "workspace": has_workspace, "writable": profile.workspace == "rw"}).encode()
        if len(job) > MAX_JOB_HEADER:
            raise UsageError(f"the module's arguments and environment exceed "
                             f"{MAX_JOB_HEADER >> 10} KiB")
        return job

    def _module_path(self, arg: str) -> Path:
        """A module named relative to the project dir (the run's cwd on the host)."""
        if "\0" in arg:
            raise UsageError("module path contains a NUL byte")
        path = Path(arg)
        if path.is_absolute():
            return path
        if self._spec.workspace is None:
            raise CommandNotFound(f"{arg}: no project dir to find it in (give an absolute "
                                  "path)", errno.ENOENT)
        return self._spec.workspace / path

    def _refuse(self, *_args: object, **_kwargs: object) -> Any:
        raise Conflict("the wasm backend has no filesystem of its own: its module sees only "
                       f"the project dir at {WORKSPACE}")

    read_file_to = read_file = write_file = stat = list_dir = mkdir = remove = _refuse

    @property
    def alive(self) -> bool:
        return self._agent.alive and self.worker.alive

    def shutdown(self, timeout: float = 5.0) -> None:
        self._agent.shutdown(timeout)

    def close(self) -> None:
        self.worker.hang_up()
        self.worker.channel.close()
        self._agent.close()


class WasmSandbox(Sandbox):
    """A wasm sandbox: the worker's namespaces sandbox (whose pieces it owns and tears
    down) with a worker in it. A daemon gives it back to its pool after a run that ended
    cleanly (`reusable`): the next run of the same pool key (the same user, profile and
    project) is a job in the same worker, in a new Store."""

    def __init__(self, spec: SandboxSpec, isolation: str, inner: Sandbox,
                 worker: _Worker) -> None:
        self.wasm = WasmClient(spec, inner.client, worker)
        super().__init__(spec=spec, backend="wasm", isolation=isolation, client=self.wasm,
                         process=inner.process, scratch=inner.scratch, cgroup=inner.cgroup,
                         helpers=inner.helpers, cleanups=inner.cleanups, notes=inner.notes)
        self.worker_spec = inner.spec

    def command_rlimits(self) -> list[tuple[int, int, int]]:
        return []  # the worker started with its own (its sandbox's profile)

    def reusable(self) -> bool:
        worker = self.wasm.worker
        # An out-of-memory kill in its cgroup took the worker or its agent: not usable.
        # (Anything it says after its job's end retires it when the pool next takes it.)
        return (self.wasm._agent.alive and worker.usable and not worker.busy
                and worker.runs < WORKER_RUNS)


class HyperlightBackend(WasmBackend):
    """`--backend hyperlight`, the original's name: Hyperlight where the host can run it
    (no driver here yet), else the wasm backend, saying so in its isolation and a warning."""

    def __init__(self) -> None:
        super().__init__(requested="hyperlight")
