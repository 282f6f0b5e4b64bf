"""The wasm backend: WASI (preview1) modules on wasmtime, run in this process.

A module sees only what WASI grants it: its argv and environment, stdin/stdout/stderr
(streamed through bounded queues, with back-pressure), and the project dir preopened at
/workspace (read-write only where the profile says `rw`; `cow` and `ro` are read-only
here, since WASI has no overlay). Nothing else is granted: no other preopen, no socket
(preview1 can only use sockets handed to it, and none are), no clock or random beyond what
WASI defines. Timeouts and kills are epoch deadlines (a ticker advances the engine's epoch
while a module runs; a callback traps the one whose time is up), memory is capped by the
store's limiter (memory.grow answers -1 past the profile's limit).

The barrier is wasmtime alone (its compiler and WASI implementation), inside the calling
process: there is no kernel boundary and no id mapping, so a wasmtime escape would be the
caller's own user. docs/backends.md says so; `strength` ranks it below namespaces.

Compiled modules are cached on disk (wasm_cache: ours-only, keyed by content and engine)
and kept pre-linked in memory (`InstancePre`), so a daemon that ran a module once runs it
again without compiling or linking.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import queue
import signal
import stat
import subprocess
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..agent.client import AgentClient, AgentInfo, Execution, ExitStatus
from ..errors import (
    AgentRequestError,
    Cancelled,
    CommandNotExecutable,
    CommandNotFound,
    Conflict,
    UsageError,
)
from ..sandbox import Sandbox, SandboxSpec
from .base import Backend, Probe

if TYPE_CHECKING:
    import wasmtime

MAX_MODULE_BYTES = 64 * 1024 * 1024  # a module (or its text) larger than this is refused
CHUNK = 64 * 1024  # output is queued in pieces of at most this size
QUEUE_DEPTH = 64  # pieces queued per run before the module waits (back-pressure): 4 MiB
TICK = 0.01  # epoch period: timeouts and kills take effect within about this long
MODULES_KEPT = 64  # pre-linked modules kept in memory (least recently used go)
# Per store: tables and instances a WASI command needs, with room, but bounded.
MAX_TABLE_ELEMENTS = 1 << 20
MAX_INSTANCES = 4
MAX_TABLES = 8
MAX_MEMORIES = 2
# Signals that do not end a process by default: not a reason to stop a module.
_HARMLESS = frozenset({signal.SIGWINCH, signal.SIGCHLD, signal.SIGURG, signal.SIGCONT})
WORKSPACE = "/workspace"


_VERSION: list[str | None] = []


def wasmtime_version() -> str | None:
    """The installed wasmtime's version, without importing it (None: not installed).

    Read from its dist-info dir's name: importlib.metadata would scan every distribution
    on the path (tens of ms on a busy host), on every run's backend choice."""
    if not _VERSION:
        _VERSION.append(_find_version())
    return _VERSION[0]


def _find_version() -> str | None:
    from importlib.util import find_spec

    spec = find_spec("wasmtime")
    if spec is None or not spec.origin:
        return None
    site = Path(spec.origin).parent.parent
    with contextlib.suppress(OSError):
        for entry in os.scandir(site):
            if entry.name.startswith("wasmtime-") and entry.name.endswith(".dist-info"):
                return entry.name[len("wasmtime-"):-len(".dist-info")]
    return "unknown"


def hyperlight_unavailable() -> str:
    """Why Hyperlight cannot run here. It never can yet: we have no Hyperlight driver. The
    host's reason comes first, as it is the one a user can act on."""
    from ..vm.kvm import kvm_verdict

    ok, detail = kvm_verdict()
    host = "" if ok else detail.split(":")[0] + "; "
    return host + "no Hyperlight driver in agentkernel"


class WasmBackend(Backend):
    name = "wasm"
    strength = 5  # one in-process software barrier: below namespaces (see the module doc)
    in_process = True
    persistent = False

    def __init__(self, requested: str = "wasm") -> None:
        version = wasmtime_version() or "missing"
        self.isolation = (f"WebAssembly (wasmtime {version}, WASI preview1, in this process; "
                          f"only {WORKSPACE} preopened, no network)")
        self.substitute: str | None = None
        if requested == "hyperlight":
            why = hyperlight_unavailable()
            self.isolation += f" (hyperlight unavailable: {why})"
            self.substitute = f"hyperlight unavailable ({why}): running on the wasm backend"

    def probe(self, deep: bool = False) -> Probe:
        version = wasmtime_version()
        if version is None:
            return Probe(False, "the wasmtime Python package is not installed")
        if not deep:
            return Probe(True, f"wasmtime {version}")
        try:
            rt = runtime()
            pre = rt.link(rt.compile(b'(module (func (export "_start")))'))
            store = rt.new_store(None)
            pre.instantiate(store).exports(store)["_start"](store)  # type: ignore[operator]
        except Exception as exc:  # any failure is the probe's answer
            return Probe(False, f"wasmtime {version} cannot run a module: {exc}")
        return Probe(True, f"wasmtime {version} runs WASI modules; compiled modules cached in "
                           f"the data dir")

    def version_files(self) -> tuple[str, ...]:
        import wasmtime

        return (str(Path(wasmtime.__file__).parent),)

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
        return WasmSandbox(spec, self.isolation)


# ---------------------------------------------------------------- the process-wide engine


class _Runtime:
    """One wasmtime engine per process, its WASI linker, pre-linked modules, the ticker."""

    def __init__(self) -> None:
        import platform

        import wasmtime

        config = wasmtime.Config()
        config.epoch_interruption = True
        self.engine = wasmtime.Engine(config)
        self.linker = wasmtime.Linker(self.engine)
        self.linker.define_wasi()
        # What a cached compiled module must have been compiled for (wasm_cache's key).
        self.fingerprint = (f"wasmtime {wasmtime_version()}; epoch_interruption; "
                            f"{platform.machine()}")
        self._lock = threading.Lock()
        self._by_file: OrderedDict[tuple[int, ...], str] = OrderedDict()
        self._by_hash: OrderedDict[str, wasmtime.InstancePre] = OrderedDict()
        self._ticking = threading.Condition(threading.Lock())
        self._active = 0
        self._ticker: threading.Thread | None = None
        # Kept here for the life of the process: wasmtime holds pointers to them.
        self._on_deadline, self._no_finalizer = _callbacks()

    # ---- modules

    def compile(self, source: bytes) -> wasmtime.Module:
        import wasmtime

        binary = source if source[:4] == b"\0asm" else bytes(wasmtime.wat2wasm(source.decode()))
        return wasmtime.Module(self.engine, binary)

    def link(self, module: wasmtime.Module) -> wasmtime.InstancePre:
        return self.linker.instantiate_pre(module)

    def module(self, path: Path, shown: str) -> wasmtime.InstancePre:
        """The pre-linked module at `path`: from memory, the disk cache, or compiled."""
        fd, st = _open_module(path, shown)
        try:
            ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            with self._lock:
                key = self._by_file.get(ident)
                pre = self._by_hash.get(key) if key is not None else None
                if pre is not None and key is not None:
                    self._by_file.move_to_end(ident)
                    self._by_hash.move_to_end(key)
                    return pre
            source = _read_all(fd, st.st_size)
        finally:
            os.close(fd)
        from .wasm_cache import cache_key

        key = cache_key(source, self.fingerprint)
        with self._lock:
            pre = self._by_hash.get(key)
        if pre is None:
            pre = self._load_or_compile(key, source, shown)
        with self._lock:
            self._by_hash[key] = pre
            self._by_file[ident] = key
            while len(self._by_hash) > MODULES_KEPT:
                self._by_hash.popitem(last=False)
            while len(self._by_file) > MODULES_KEPT:
                self._by_file.popitem(last=False)
        return pre

    def _load_or_compile(self, key: str, source: bytes, shown: str) -> wasmtime.InstancePre:
        import wasmtime

        from .wasm_cache import forget, load, store

        module = None
        compiled = load(key)
        if compiled is not None:
            try:
                module = wasmtime.Module.deserialize(self.engine, compiled)
            except wasmtime.WasmtimeError:
                forget(key)  # from another build, or damaged: compile afresh
        if module is None:
            try:
                module = self.compile(source)
            except (wasmtime.WasmtimeError, UnicodeDecodeError) as exc:
                raise CommandNotExecutable(
                    f"{shown}: not a valid WebAssembly module: {_first_line(exc)}",
                    errno.ENOEXEC) from None
            store(key, bytes(module.serialize()))
        if not any(e.name == "_start" for e in module.exports):
            raise CommandNotExecutable(
                f"{shown}: not a WASI command (it exports no _start function)", errno.ENOEXEC)
        try:
            return self.link(module)
        except wasmtime.WasmtimeError as exc:
            raise CommandNotExecutable(
                f"{shown}: needs imports WASI preview1 does not offer: {_first_line(exc)}",
                errno.ENOEXEC) from None

    # ---- stores and the epoch ticker

    def new_store(self, memory_bytes: int | None) -> wasmtime.Store:
        import wasmtime

        store = wasmtime.Store(self.engine)
        store.set_limits(memory_size=memory_bytes if memory_bytes else -1,
                         table_elements=MAX_TABLE_ELEMENTS, instances=MAX_INSTANCES,
                         tables=MAX_TABLES, memories=MAX_MEMORIES)
        store.set_epoch_deadline(1 << 62)  # a store that is not watched never traps
        return store

    def watch(self, store: wasmtime.Store, run_id: int) -> None:
        """Check `run_id`'s deadline and kill flag at every tick while `store` runs."""
        from wasmtime import _ffi as ffi

        store.set_epoch_deadline(1)
        ffi.wasmtime_store_epoch_deadline_callback(store.ptr(), self._on_deadline,
                                                   ctypes.c_void_p(run_id), self._no_finalizer)

    def active(self, delta: int) -> None:
        """Count running modules; the ticker advances the epoch only while there are any."""
        with self._ticking:
            self._active += delta
            if self._active > 0 and self._ticker is None:
                self._ticker = threading.Thread(target=self._tick, name="ak-wasm-epoch",
                                                daemon=True)
                self._ticker.start()
            self._ticking.notify_all()

    def _tick(self) -> None:
        while True:
            with self._ticking:
                while self._active <= 0:
                    self._ticking.wait()
            time.sleep(TICK)
            self.engine.increment_epoch()


_RUNTIME: _Runtime | None = None
_RUNTIME_LOCK = threading.Lock()


def runtime() -> _Runtime:
    global _RUNTIME
    with _RUNTIME_LOCK:
        if _RUNTIME is None:
            _RUNTIME = _Runtime()
        return _RUNTIME


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


# ---------------------------------------------------------------- deadlines (epoch callback)

_RUNS: dict[int, WasmExecution] = {}
_RUN_IDS = itertools.count(1)

def _deadline(_ctx: int | None, data: int | None, delta: Any, kind: Any) -> int:
    """Called on the module's thread at each tick: trap it, or let it run one tick more."""
    try:
        run = _RUNS.get(data or 0)
        if run is None or run.should_stop():
            from wasmtime import _ffi as ffi

            err = ffi.wasmtime_error_new(b"agentkernel: the module was stopped")
            return ctypes.cast(err, ctypes.c_void_p).value or 0
        delta[0] = 1
        kind[0] = 0  # WASMTIME_UPDATE_DEADLINE_CONTINUE
        return 0
    except Exception:  # an exception must not cross into wasmtime; stop the module
        from wasmtime import _ffi as ffi

        return ctypes.cast(ffi.wasmtime_error_new(b"agentkernel: deadline check failed"),
                           ctypes.c_void_p).value or 0


def _no_finalizer(_data: int | None) -> None:
    return None


def _callbacks() -> tuple[Any, Any]:
    """The deadline callback and its no-op finalizer, as the exact C types wasmtime's
    bindings declare (ctypes refuses an equal but separately made type)."""
    from wasmtime import _bindings

    argtypes = _bindings._wasmtime_store_epoch_deadline_callback.argtypes
    return argtypes[1](_deadline), argtypes[3](_no_finalizer)


# ---------------------------------------------------------------- one run


class WasmExecution(Execution):
    """One module running on a thread of its own; the same interface as an agent's command."""

    def __init__(self, pre: wasmtime.InstancePre, argv: Sequence[str], env: Mapping[str, str],
                 workspace: Path | None, writable: bool, memory_mb: int | None,
                 timeout: float | None, stdin: bool) -> None:
        # Not Execution.__init__: there is no agent channel behind this one.
        self.id = next(_RUN_IDS)
        self.pid = 0
        self.status: ExitStatus | None = None
        self._events: queue.Queue[tuple[str, bytes | ExitStatus]] = queue.Queue(QUEUE_DEPTH)
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._signal: int | None = None
        self._timed_out = False
        self._cancelled = False
        self._stdin_w: int | None = None
        self._stdin_lock = threading.Lock()
        stdin_r = None
        if stdin:
            stdin_r, self._stdin_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(
            target=self._main, name=f"ak-wasm-{self.id}", daemon=True,
            args=(pre, list(argv), dict(env), workspace, writable, memory_mb, stdin_r))
        _RUNS[self.id] = self
        self._thread.start()

    # ---- the caller's side

    def write_stdin(self, data: bytes) -> None:
        with self._stdin_lock:
            fd = self._stdin_w
        if fd is None:
            return
        view = memoryview(data)
        with contextlib.suppress(OSError):  # the module is gone, or closed its stdin
            while view:
                view = view[os.write(fd, view):]

    def close_stdin(self) -> None:
        with self._stdin_lock:
            fd, self._stdin_w = self._stdin_w, None
        if fd is not None:
            os.close(fd)

    def signal(self, signo: int) -> None:
        if signo in _HARMLESS or self.status is not None:
            return
        if self._signal is None:
            self._signal = signo
        self.close_stdin()  # a module blocked reading stdin sees EOF, then traps at a tick

    def resize(self, rows: int, cols: int) -> None:
        return None  # no terminal

    def cancel(self) -> None:
        self._cancelled = True
        self.signal(signal.SIGKILL)
        with contextlib.suppress(queue.Empty):
            while True:
                self._events.get_nowait()  # unblocks the module's pending output

    def _next(self, timeout: float | None) -> tuple[str, bytes | ExitStatus]:
        if self._cancelled:
            raise Cancelled("the command was cancelled")
        try:
            kind, payload = self._events.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("timed out waiting for command output") from None
        if isinstance(payload, ExitStatus):
            self.status = payload
        return kind, payload

    def events(self) -> Iterator[tuple[str, bytes | ExitStatus]]:
        while self.status is None:
            yield self._next(None)

    # ---- the module's side

    def should_stop(self) -> bool:
        if self._signal is not None:
            return True
        if self._deadline is not None and time.monotonic() >= self._deadline:
            self._timed_out = True
            return True
        return False

    def _put(self, item: tuple[str, bytes | ExitStatus], final: bool = False) -> bool:
        """Queue an event, waiting while the queue is full (back-pressure); False once the
        command is being stopped (its output is no longer wanted) or was cancelled."""
        while not self._cancelled:
            if not final and self.should_stop():
                return False
            try:
                self._events.put(item, timeout=TICK * 10)
                return True
            except queue.Full:
                continue
        return False

    def _output(self, kind: str) -> Any:
        def emit(data: bytes) -> int:
            for i in range(0, len(data), CHUNK):
                if not self._put((kind, data[i:i + CHUNK])):
                    return -errno.EPIPE
            return len(data)

        return emit

    def _main(self, pre: wasmtime.InstancePre, argv: list[str], env: dict[str, str],
              workspace: Path | None, writable: bool, memory_mb: int | None,
              stdin_r: int | None) -> None:
        rt = runtime()
        rt.active(+1)
        try:
            status = self._run(rt, pre, argv, env, workspace, writable, memory_mb, stdin_r)
        except Exception as exc:  # never leave the caller without an exit status
            self._put(("stderr", f"agentkernel: wasm: {_first_line(exc)}\n".encode()))
            status = ExitStatus(code=125, signal=None)
        finally:
            rt.active(-1)
            _RUNS.pop(self.id, None)
            if stdin_r is not None:
                with contextlib.suppress(OSError):
                    os.close(stdin_r)
            self.close_stdin()
        self._put(("exit", status), final=True)

    def _run(self, rt: _Runtime, pre: wasmtime.InstancePre, argv: list[str],
             env: dict[str, str], workspace: Path | None, writable: bool,
             memory_mb: int | None, stdin_r: int | None) -> ExitStatus:
        import wasmtime

        store = rt.new_store(memory_mb * 1024 * 1024 if memory_mb else None)
        wasi = wasmtime.WasiConfig()
        wasi.argv = argv
        wasi.env = list(env.items())
        wasi.stdout_custom = self._output("stdout")
        wasi.stderr_custom = self._output("stderr")
        if stdin_r is not None:
            wasi.stdin_file = f"/proc/self/fd/{stdin_r}"  # a second open of our pipe's end
            os.close(stdin_r)
            stdin_r = None
        if workspace is not None:
            wasi.preopen_dir(str(workspace), WORKSPACE, writable)
        store.set_wasi(wasi)
        rt.watch(store, self.id)
        try:
            instance = pre.instantiate(store)
            start = instance.exports(store)["_start"]
            start(store)  # type: ignore[operator]
            code = 0
        except wasmtime.ExitTrap as exc:
            code = exc.code if 0 <= exc.code <= 255 else (exc.code & 0xFF or 1)
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            if self._timed_out:
                return ExitStatus(code=None, signal=signal.SIGKILL, timed_out=True)
            if self._signal is not None:
                return ExitStatus(code=None, signal=self._signal)
            self._put(("stderr", f"agentkernel: wasm trap: {_first_line(exc)}\n".encode()))
            return ExitStatus(code=None, signal=signal.SIGABRT)  # 134, as wasmtime's own CLI
        finally:
            store.close()
        return ExitStatus(code=code, signal=None)


# ---------------------------------------------------------------- the sandbox and its "client"


class WasmClient(AgentClient):
    """Stands where an agent's channel stands: `exec` runs a module; there is no filesystem
    of the sandbox's own to read or write."""

    def __init__(self, spec: SandboxSpec) -> None:  # not AgentClient's: no channel
        self._spec = spec
        self._alive = True
        self._closed = False
        self._runs: set[WasmExecution] = set()
        self._runs_lock = threading.Lock()

    def hello(self, timeout: float = 10.0) -> AgentInfo:
        raise Conflict("the wasm backend has no agent")

    def ping(self, timeout: float = 5.0) -> float:
        return 0.0

    def exec(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
        cwd: str | None = None, uid: int | None = None, gid: int | None = None,
        timeout: float | None = None, stdin: bool = False, pty: tuple[int, int] | None = None,
        rlimits: Sequence[tuple[int, int, int]] = (), umask: int | None = None,
    ) -> Execution:
        if not self._alive:
            raise Conflict("this wasm sandbox is gone")
        if not argv:
            raise UsageError("no module given")
        if pty is not None:
            raise AgentRequestError("the wasm backend has no terminal (drop -t)", errno.ENOTTY)
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive")
        shown = argv[0]
        path = self._module_path(shown)
        pre = runtime().module(path, shown)
        profile = self._spec.profile
        workspace = self._spec.workspace if profile.workspace != "none" else None
        execution = WasmExecution(
            pre, [path.name, *argv[1:]], env or {}, workspace, profile.workspace == "rw",
            profile.memory_mb, timeout, stdin)
        with self._runs_lock:
            self._runs = {r for r in self._runs if r.status is None}
            self._runs.add(execution)
        return execution

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
        return self._alive

    def shutdown(self, timeout: float = 5.0) -> None:
        self.close()

    def close(self) -> None:
        self._alive = False
        with self._runs_lock:
            runs = list(self._runs)
        for run in runs:
            run.signal(signal.SIGKILL)


class _NoProcess(subprocess.Popen[bytes]):
    """The process a Sandbox expects: a wasm sandbox has none (it runs in ours)."""

    def __init__(self) -> None:  # not Popen's: nothing is started
        self.args = ()
        self.pid = 0
        self.returncode: int | None = None
        self.stdin = self.stdout = self.stderr = None
        self._child_created = False

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self.returncode = 0 if self.returncode is None else self.returncode
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.returncode = -sig

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def __del__(self) -> None:
        return None


class WasmSandbox(Sandbox):
    """A wasm run's sandbox: a profile and a project dir; each exec runs a module."""

    in_process = True

    def __init__(self, spec: SandboxSpec, isolation: str) -> None:
        from ..paths import runtime_dir

        client = WasmClient(spec)
        # Nothing is written there: Sandbox.destroy's removal of it finds nothing.
        scratch = runtime_dir() / "sandboxes" / spec.name
        super().__init__(spec=spec, backend="wasm", isolation=isolation, client=client,
                         process=_NoProcess(), scratch=scratch)

    def command_rlimits(self) -> list[tuple[int, int, int]]:
        return []  # the store's limits bound a module; no process of its own to limit

    def destroy(self) -> None:
        if self._destroyed:
            return
        self._destroyed = True
        self.client.close()
        self.process.kill()


class HyperlightBackend(WasmBackend):
    """`--backend hyperlight`, the original's name: Hyperlight where the host can run it
    (no driver here yet), else the wasm backend, saying so in its isolation and a warning."""

    def __init__(self) -> None:
        super().__init__(requested="hyperlight")
