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
limit) and, around the whole worker, by its cgroup. A daemon keeps warm workers (sandbox
up, wasmtime imported, waiting for a job); each runs one module and is destroyed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import sys
import threading
from collections import OrderedDict
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
    `exec` waits for that before it hands over the job."""
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
    return WasmSandbox(spec, isolation, inner, worker)


def _await_ready(worker: Execution) -> None:
    """The worker's one ready byte; anything else is why it did not start."""
    from .wasm_worker import READY

    said = b""
    try:
        while True:
            kind, payload = worker._next(READY_TIMEOUT)
            if isinstance(payload, ExitStatus):
                raise SandboxError(f"the wasm worker did not start: "
                                   f"{said.decode(errors='replace').strip() or payload}")
            if kind == "stdout" and payload == READY:
                return
            said = (said + payload)[-4096:]
    except TimeoutError:
        raise SandboxError("the wasm worker did not start in time") from None
    except ProtocolError as exc:
        raise SandboxError(f"the wasm worker's sandbox died: {exc}") from None


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
        self._lock = threading.Lock()
        self._by_file: OrderedDict[tuple[int, ...], str] = OrderedDict()
        self._by_key: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0

    def engine(self) -> tuple[wasmtime.Engine, wasmtime.Linker]:
        with self._lock:
            if self._engine is None:
                import wasmtime

                engine = wasmtime.Engine()
                linker = wasmtime.Linker(engine)
                linker.define_wasi()
                self._engine = engine, linker
            return self._engine

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

    def module(self, path: Path, shown: str) -> bytes:
        """The compiled module at `path`: from memory, the disk cache, or compiled now."""
        fd, st = _open_module(path, shown)
        try:
            ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            with self._lock:
                key = self._by_file.get(ident)
                compiled = self._by_key.get(key) if key is not None else None
                if compiled is not None and key is not None:
                    self._by_file.move_to_end(ident)
                    self._by_key.move_to_end(key)
                    return compiled
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
        return compiled

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


def _read_all(fd: int, size: int) -> bytes:
    chunks = []
    left = min(size, MAX_MODULE_BYTES)
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------- one run


class WasmExecution(Execution):
    """The worker's command, as the caller sees it: the module's output and exit status.
    A timeout is ours to enforce (the worker could ignore its own): SIGKILL through the
    agent."""

    def __init__(self, worker: Execution, timeout: float | None) -> None:
        # Not Execution.__init__: this wraps the agent's execution of the worker.
        self._worker = worker
        self.id = worker.id
        self.pid = worker.pid
        self.status: ExitStatus | None = None
        self._timed_out = False
        self._timer: threading.Timer | None = None
        if timeout is not None:
            self._timer = threading.Timer(timeout, self._expire)
            self._timer.daemon = True
            self._timer.start()

    def _expire(self) -> None:
        self._timed_out = True
        with contextlib.suppress(Exception):  # the worker may be gone already
            self._worker.signal(signal.SIGKILL)

    def write_stdin(self, data: bytes) -> None:
        self._worker.write_stdin(data)

    def close_stdin(self) -> None:
        self._worker.close_stdin()

    def signal(self, signo: int) -> None:
        self._worker.signal(signo)

    def resize(self, rows: int, cols: int) -> None:
        return None  # no terminal

    def cancel(self) -> None:
        self._stop_timer()
        self._worker.cancel()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _next(self, timeout: float | None) -> tuple[str, bytes | ExitStatus]:
        kind, payload = self._worker._next(timeout)
        if isinstance(payload, ExitStatus):
            self._stop_timer()
            if self._timed_out:
                payload = ExitStatus(code=None, signal=signal.SIGKILL, timed_out=True)
            self.status = payload
        return kind, payload

    def events(self) -> Iterator[tuple[str, bytes | ExitStatus]]:
        while self.status is None:
            yield self._next(None)


# ---------------------------------------------------------------- the sandbox and its "client"


class WasmClient(AgentClient):
    """Stands where an agent's channel stands: `exec` hands the worker its one module;
    there is no filesystem of the sandbox's own to read or write."""

    def __init__(self, spec: SandboxSpec, agent: AgentClient,
                 worker: Execution) -> None:  # not AgentClient's: the agent has one
        self._spec = spec
        self._agent = agent
        self._worker = worker
        self._used = False
        self._used_lock = threading.Lock()

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
        with self._used_lock:
            if self._used or not self.alive:
                raise Conflict("this wasm sandbox ran its module already (one per worker)")
            self._used = True
        shown = argv[0]
        path = self._module_path(shown)
        compiled = compiler().module(path, shown)
        job = self._job([path.name, *argv[1:]], env or {}, stdin, shown)
        from .wasm_worker import encode_job

        _await_ready(self._worker)
        execution = WasmExecution(self._worker, timeout)
        self._worker.write_stdin(encode_job(job, compiled))
        if not stdin:
            self._worker.close_stdin()
        return execution

    def _job(self, argv: list[str], env: Mapping[str, str], stdin: bool,
             shown: str) -> dict[str, object]:
        profile = self._spec.profile
        has_workspace = self._spec.workspace is not None and profile.workspace != "none"
        job: dict[str, object] = {
            "argv": argv, "env": list(env.items()), "stdin": stdin, "shown": shown,
            "memory_bytes": profile.memory_mb * 1024 * 1024 if profile.memory_mb else None,
            "workspace": has_workspace, "writable": profile.workspace == "rw"}
        import json

        if len(json.dumps(job)) > MAX_JOB_HEADER:
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
        return self._agent.alive and self._worker.status is None

    def shutdown(self, timeout: float = 5.0) -> None:
        self._agent.shutdown(timeout)

    def close(self) -> None:
        self._agent.close()


class WasmSandbox(Sandbox):
    """A wasm run's sandbox: the worker's namespaces sandbox (whose pieces it owns and
    tears down) with a worker waiting in it for one module."""

    def __init__(self, spec: SandboxSpec, isolation: str, inner: Sandbox,
                 worker: Execution) -> None:
        super().__init__(spec=spec, backend="wasm", isolation=isolation,
                         client=WasmClient(spec, inner.client, worker), process=inner.process,
                         scratch=inner.scratch, cgroup=inner.cgroup, helpers=inner.helpers,
                         cleanups=inner.cleanups, notes=inner.notes)
        self.worker_spec = inner.spec

    def command_rlimits(self) -> list[tuple[int, int, int]]:
        return []  # the worker started with its own (its sandbox's profile)


class HyperlightBackend(WasmBackend):
    """`--backend hyperlight`, the original's name: Hyperlight where the host can run it
    (no driver here yet), else the wasm backend, saying so in its isolation and a warning."""

    def __init__(self) -> None:
        super().__init__(requested="hyperlight")
