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

This process compiles (untrusted input meets Cranelift here, as with any compiler; it
never runs the result), keeps compiled modules in the ours-only disk cache (wasm_cache)
and in memory, and hands the worker the compiled bytes with the job over its stdin. The
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
import os
import signal
import stat
import sys
import threading
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..agent.client import AgentClient, AgentInfo, Execution, ExitStatus
from ..errors import (
    AgentRequestError,
    BackendUnavailable,
    CommandNotExecutable,
    CommandNotFound,
    Conflict,
    ProtocolError,
    SandboxError,
    UsageError,
)
from ..sandbox import Sandbox, SandboxSpec
from .base import Backend, Probe

if TYPE_CHECKING:
    import wasmtime

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
            compiler().compile(b'(module (func (export "_start")))', "probe")
        except Exception as exc:  # any failure is the probe's answer
            return Probe(False, f"wasmtime {version} cannot compile a module: {exc}")
        return Probe(True, f"wasmtime {version} compiles WASI modules (cached in the data "
                           "dir); they run in confined worker sandboxes")

    def pooled(self) -> None:
        # A daemon serves wasm runs: import wasmtime and make the compiling engine now, in
        # the background, so that the first run of a new module pays only its compile.
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
    the first `exec` waits for that before it hands over a job."""
    from .namespaces import NamespacesBackend

    inner = NamespacesBackend().start(worker_spec(spec))
    try:
        python = os.path.realpath(sys.executable)
        worker = inner.client.exec(
            [python, "-I", "-S", WORKER_SCRIPT], env={"PATH": "/usr/bin:/bin"}, cwd="/",
            stdin=True, rlimits=inner.command_rlimits())
    except BaseException:
        inner.destroy()
        raise
    return WasmSandbox(spec, isolation, inner, _Worker(worker))


class _Worker:
    """This side of one worker: its execution in the agent, the frames it sent not yet
    read, the modules it holds (this side decides which: it evicts them), and whether it
    may serve another job. One job at a time."""

    def __init__(self, execution: Execution) -> None:
        self.execution = execution
        self.ready = False
        self.busy = False
        self.broken = False  # killed, timed out, signalled, or it broke the protocol
        self.runs = 0
        self.modules: OrderedDict[str, int] = OrderedDict()  # key -> compiled bytes
        self._buf = bytearray()

    def parse(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """The whole frames `data` completes. The worker is confined, not trusted: a frame
        it has no reason to send, or a longer one than it ever sends, is a ProtocolError."""
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
            out.append((kind, bytes(self._buf[HEAD:HEAD + size])))
            del self._buf[:HEAD + size]
        return out

    def await_ready(self) -> list[tuple[bytes, bytes]]:
        """The worker's ready frame, and the frames that came with it (of the job sent
        ahead of it); anything else before it is why it did not start."""
        from .wasm_worker import READY

        said = b""
        try:
            while True:
                kind, payload = self.execution._next(READY_TIMEOUT)
                if isinstance(payload, ExitStatus):
                    raise SandboxError(f"the wasm worker did not start: "
                                       f"{said.decode(errors='replace').strip() or payload}")
                if kind != "stdout":
                    said = (said + payload)[-4096:]
                    continue
                frames = self.parse(payload)
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
        self.execution.write_stdin(b"".join(out))

    def kill(self) -> None:
        self.broken = True
        with contextlib.suppress(Exception):  # it may be gone already
            self.execution.signal(signal.SIGKILL)

    @property
    def alive(self) -> bool:
        """Whether it may take a job. Between jobs a worker says nothing but, once, that it
        is ready: anything else it said (its exit above all: it died while waiting)
        retires it, rather than end the next run before it began."""
        if self.broken or self.execution.status is not None:
            return False
        if self.busy:
            return True  # what it says is the job's
        from .wasm_worker import READY

        while True:
            try:
                kind, payload = self.execution._next(0)
            except TimeoutError:
                return True  # silent, as it should be
            except Exception:  # its channel is gone
                break
            if self.ready or kind != "stdout" or not isinstance(payload, bytes):
                break
            try:
                frames = self.parse(payload)
            except ProtocolError:
                break
            if frames and frames != [(READY, b"")]:
                break
            self.ready = bool(frames)
        self.broken = True
        return False


# ---------------------------------------------------------------- compiling (this process)


class _Compiler:
    """The compiled modules kept in memory, and for a module met for the first time a
    wasmtime engine (made, and wasmtime imported, only then: a cache hit needs neither)
    with its WASI linker to check imports."""

    def __init__(self) -> None:
        # The worker's engine has the same (default) settings: compiled code is only
        # loaded by an engine configured as the one that compiled it.
        self.fingerprint = (f"wasmtime {wasmtime_version()}; default config; "
                            f"{os.uname().machine}; worker")
        self._engine: tuple[wasmtime.Engine, wasmtime.Linker] | None = None
        self._preparing = False
        self._engine_lock = threading.Lock()
        self._lock = threading.Lock()
        self._by_file: OrderedDict[tuple[int, ...], str] = OrderedDict()
        self._by_key: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0

    def engine(self) -> tuple[wasmtime.Engine, wasmtime.Linker]:
        # A lock of its own: importing wasmtime takes ~0.1 s, cache hits must not wait.
        with self._engine_lock:
            if self._engine is None:
                import wasmtime

                engine = wasmtime.Engine()
                linker = wasmtime.Linker(engine)
                linker.define_wasi()
                self._engine = engine, linker
            return self._engine

    def prepare(self) -> None:
        """Make the engine on a thread of its own, once (a failure shows at compile)."""
        with self._lock:
            if self._preparing:
                return
            self._preparing = True

        def make() -> None:
            with contextlib.suppress(Exception):
                self.engine()

        threading.Thread(target=make, name="ak-wasm-engine", daemon=True).start()

    def compile(self, source: bytes, shown: str) -> wasmtime.Module:
        import wasmtime

        engine, _linker = self.engine()
        try:
            binary = (source if source[:4] == b"\0asm"
                      else bytes(wasmtime.wat2wasm(source.decode())))
            return wasmtime.Module(engine, binary)
        except (wasmtime.WasmtimeError, UnicodeDecodeError) as exc:
            raise CommandNotExecutable(
                f"{shown}: not a valid WebAssembly module: {_first_line(exc)}",
                errno.ENOEXEC) from None

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
        """Compile and check (a WASI command whose imports WASI preview1 offers): only a
        module that passes is cached, so a cache hit needs no check."""
        import wasmtime

        from .wasm_cache import store

        module = self.compile(source, shown)
        if not any(e.name == "_start" for e in module.exports):
            raise CommandNotExecutable(
                f"{shown}: not a WASI command (it exports no _start function)", errno.ENOEXEC)
        try:
            self.engine()[1].instantiate_pre(module)
        except wasmtime.WasmtimeError as exc:
            raise CommandNotExecutable(
                f"{shown}: needs imports WASI preview1 does not offer: {_first_line(exc)}",
                errno.ENOEXEC) from None
        compiled = bytes(module.serialize())
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


def _open_module(path: Path, shown: str) -> tuple[int, os.stat_result]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
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
    read out of the worker's frames. A timeout is ours to enforce (the worker could ignore
    its own): SIGKILL through the agent, and that worker serves no other job; so does one
    signalled, cancelled, or that broke the protocol. Once the job ended, nothing done to
    this execution reaches the worker: it may be serving the next run already."""

    def __init__(self, worker: _Worker, timeout: float | None, stdin: bool) -> None:
        # Not Execution.__init__: this reads the agent's execution of the worker.
        self._worker = worker
        self._stdin = stdin
        self.id = worker.execution.id
        self.pid = worker.execution.pid
        self.status: ExitStatus | None = None
        self._pending: deque[tuple[bytes, bytes]] = deque()
        self._lock = threading.Lock()  # the job's end against a timeout, signal or cancel
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

        if self.status is None and self._stdin:  # late input of an ended job goes nowhere
            self._worker.execution.write_stdin(b"".join(
                frame(b"I", data[i:i + OUT_CHUNK]) for i in range(0, len(data), OUT_CHUNK)))

    def close_stdin(self) -> None:
        from .wasm_worker import frame

        if self.status is None and self._stdin:
            self._stdin = False
            self._worker.execution.write_stdin(frame(b"C"))

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
                self._worker.broken = True
                self._worker.execution.cancel()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _end(self, status: ExitStatus, clean: bool) -> ExitStatus:
        self._stop_timer()
        with self._lock:
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
                    return "exit", self._end(end, clean=not self._pending)
                self._worker.kill()  # a bad end or a second ready frame: not our worker
                continue
            what, payload = self._worker.execution._next(timeout)
            if isinstance(payload, ExitStatus):  # the worker itself ended mid-job
                return "exit", self._end(payload, clean=False)
            if what == "stderr":  # the worker's own complaints: the caller sees them
                return "stderr", payload
            try:
                self._pending.extend(self._worker.parse(payload))
            except ProtocolError:
                self._worker.kill()

    def ready(self, wait: float = 0.0) -> bool:
        return bool(self._pending) or self._worker.execution.ready(wait)

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
    ) -> Execution:
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
            if self.worker.busy or not self.alive:
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
        # An out-of-memory kill in its cgroup took the worker or its agent: not alive.
        return self.wasm.alive and not worker.busy and worker.runs < WORKER_RUNS


class HyperlightBackend(WasmBackend):
    """`--backend hyperlight`, the original's name: Hyperlight where the host can run it
    (no driver here yet), else the wasm backend, saying so in its isolation and a warning."""

    def __init__(self) -> None:
        super().__init__(requested="hyperlight")
