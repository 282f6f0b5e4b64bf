"""The wasm backend's worker: runs compiled WASI modules, one at a time, inside its sandbox.

The wasm backend starts this file with `python -I -S` in a namespaces sandbox that shows
only the interpreter, wasmtime, this package and the project at /workspace (see wasm.py).
It imports wasmtime, makes its engine and WASI linker, says it is ready, then serves
framed requests on stdin and answers with frames on stdout (the format is below; wasm.py
speaks the other side):

- host → worker: `M` a compiled module (its cache key, then the bytes, as the parent
  compiled them) to keep; `D` a key to drop; `J` a job (JSON: the module's key, argv,
  env, limits, workspace); `I` stdin data for the job running, `C` its end.
- worker → host: `R` ready; `O`/`E` the module's stdout/stderr; `X` how the job ended
  (JSON: `code`, or `signal` for a trap).

Every job gets a new Store, WASI context and instance: nothing a module did (its memory,
globals, tables, argv, env, open files) is there for the next job. Deserialized modules
are kept (the parent says which), so a job costs one instantiation. The module's stdin is
never the worker's own: a pipe fed from `I` frames, or empty.

It needs nothing of agentkernel but the frame format below (no import of the package: it
starts faster and shows less), and never writes anything the parent trusts: compiled
modules only ever flow from the parent to here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import sys
import threading
import time

TYPE_CHECKING = False  # not typing's: the worker imports as little as it can
if TYPE_CHECKING:
    from collections.abc import Iterator

    import wasmtime

    Loaded = dict[str, "wasmtime.InstancePre | str"]  # key -> linked module, or why not

HEAD = 5  # a frame: its kind (one byte), the payload's length (4 bytes, big-endian), payload
MAX_HEADER = 1 << 20  # a job's JSON: argv and env of one run
MAX_MODULE = 256 << 20  # a compiled module (wasm_cache.MAX_ENTRY_BYTES)
KEY_BYTES = 64  # a module's cache key: SHA-256, hex
MAX_MODULES = 16  # compiled modules kept (the parent evicts first: this is a backstop)
OUT_CHUNK = 64 * 1024  # output frames are at most this large
FLUSH_DELAY = 0.002  # seconds output may wait to leave with more (or with the job's end)
STREAM_IDLE_MS = 100  # a streaming drainer's look at whether its job still runs
PIPE_BYTES = 1 << 20  # the output pipes' size (the unprivileged maximum); a drain's bound
F_SETPIPE_SZ = 1031  # fcntl's constant (Python < 3.10 lacks it; spelled out for mypy)
READY = b"R"
WORKSPACE = "/workspace"
# Per store: tables and instances a WASI command needs, with room, but bounded.
MAX_TABLE_ELEMENTS = 1 << 20
MAX_INSTANCES = 4
MAX_TABLES = 8
MAX_MEMORIES = 2
EXIT_FAILED = 125  # the job could not be run (unknown module, a module that fails to link)


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    """One frame, either way."""
    return kind + len(payload).to_bytes(4, "big") + payload


def _read_exact(n: int) -> bytes:
    chunks = []
    while n > 0:
        chunk = os.read(0, min(n, 1 << 20))
        if not chunk:
            raise EOFError("stdin ended inside a frame")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


READ_AHEAD = 64 * 1024  # one read of stdin at a frame's start: a job's frames at once
_IN = bytearray()  # what that read gave beyond the frames taken so far (< READ_AHEAD)


def _take(n: int) -> bytes:
    """The next `n` bytes of stdin: those read ahead first, the rest read exactly."""
    if len(_IN) >= n:
        out = bytes(_IN[:n])
        del _IN[:n]
        return out
    head = bytes(_IN)
    _IN.clear()
    return head + _read_exact(n - len(head))


def read_frame() -> tuple[bytes, bytes] | None:
    """The next request; None at the end of stdin. One read at a frame's start takes
    what is there (a job's frames usually come whole: one system call, not three after
    each wake-up); a frame's payload beyond it is read exactly, so what is held here stays
    under READ_AHEAD."""
    if not _IN:
        chunk = os.read(0, READ_AHEAD)
        if not chunk:
            return None
        _IN.extend(chunk)
    head = _take(HEAD)
    kind, size = head[:1], int.from_bytes(head[1:], "big")
    limit = MAX_MODULE + KEY_BYTES if kind == b"M" else MAX_HEADER
    if size > limit:
        raise ValueError(f"frame {kind!r} of {size} bytes")
    return kind, _take(size)


def _write(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]


class _Out:
    """Frames to stdout, and the module's output: it writes into two pipes of ours
    (wasmtime writes a file directly: an output callback would cost a hop to one of its
    threads and back for every write), and frames of what they hold leave with the job's
    end, in one write (one wake-up of the agent and of the parent). A drain thread streams
    what a longer job writes. It sleeps until the job has run FLUSH_DELAY: a timer armed
    at the job's start (SIGALRM, which every thread blocks and the drainer alone waits
    for, sigwait) and disarmed at its end, so that a short job (a warm run's usual case)
    wakes no thread but the one running it. Then, till the job's end, woken by the pipes'
    first byte it waits FLUSH_DELAY for more (or for the job's end to take it), and sends
    what the pipes hold. One lock for both drainers and every write to stdout, so that no
    output of a job leaves after its end; a write blocks while the parent pauses us (and
    so, once the pipes fill, does the module)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buf = bytearray()
        self._running = False  # a job runs (under the lock)
        self.pipes: list[tuple[bytes, int, int]] = []  # (frame kind, read end, write end)
        for kind in (b"O", b"E"):
            read, write = os.pipe2(os.O_CLOEXEC)
            with contextlib.suppress(OSError):  # room for a burst while the drain sleeps
                fcntl.fcntl(write, F_SETPIPE_SZ, PIPE_BYTES)
            os.set_blocking(read, False)
            self.pipes.append((kind, read, write))
        threading.Thread(target=self._drainer, daemon=True).start()

    def start(self) -> None:
        """A job starts: the drainer wakes if it still runs FLUSH_DELAY from now."""
        with self._lock:
            self._running = True
        signal.setitimer(signal.ITIMER_REAL, FLUSH_DELAY)

    def paths(self) -> tuple[str, str]:
        """Where a job's WASI stdout and stderr go: the pipes' write ends, reopened."""
        return (f"/proc/self/fd/{self.pipes[0][2]}", f"/proc/self/fd/{self.pipes[1][2]}")

    def put(self, data: bytes) -> None:
        """A frame of ours that leaves with the next end (a message before a job's end),
        after what the module wrote before it."""
        with self._lock:
            self._drain()
            self._buf += data

    def end(self, data: bytes) -> None:
        """The last frame of a job (or the ready frame): out now, after everything the
        module wrote (all of it is in the pipes once its _start returned)."""
        with self._lock:
            if self._running:
                self._running = False
                signal.setitimer(signal.ITIMER_REAL, 0)
            self._drain()
            self._buf += data
            _write(bytes(self._buf))
            self._buf.clear()

    @contextlib.contextmanager
    def silenced(self) -> Iterator[None]:
        """What the pipes get meanwhile is dropped, never sent (the warm-up's output, a
        few bytes): the drain thread waits for the lock held here till then."""
        with self._lock:
            try:
                yield
            finally:
                for _kind, read, _write_end in self.pipes:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(read, PIPE_BYTES):
                            pass

    def _drain(self) -> None:
        for kind, read, _write_end in self.pipes:
            with contextlib.suppress(BlockingIOError):
                while chunk := os.read(read, OUT_CHUNK):
                    self._buf += frame(kind, chunk)
                    if len(self._buf) >= PIPE_BYTES:  # bounded: out before reading more
                        _write(bytes(self._buf))
                        self._buf.clear()
                    if len(chunk) < OUT_CHUNK:
                        break  # a pipe gives less only when it is empty (no EAGAIN read)

    def _drainer(self) -> None:
        poller = select.poll()
        for _kind, read, _write_end in self.pipes:
            poller.register(read, select.POLLIN)
        while True:
            signal.sigwait({signal.SIGALRM})  # a job has run FLUSH_DELAY (or just ended)
            while True:
                with self._lock:
                    if not self._running:
                        break  # its end took what was left
                    self._drain()
                    if self._buf:
                        _write(bytes(self._buf))
                        self._buf.clear()
                # The next output, or a look at whether the job still runs: a job that
                # writes nothing for long costs a wake-up every STREAM_IDLE, no more.
                if poller.poll(STREAM_IDLE_MS):
                    time.sleep(FLUSH_DELAY)  # more may come, or the job's end takes it


_OUTS: list[_Out] = []


def _out() -> _Out:
    """The worker's one _Out, made on first use (never by a process that imports this
    module for the frame format)."""
    if not _OUTS:
        _OUTS.append(_Out())
    return _OUTS[0]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _Stdin:
    """The running job's stdin pipe, fed from `I` frames while the job runs on a thread
    of its own. Made when the job's frame is read, so no `I` frame can come before it."""

    def __init__(self) -> None:
        self._fd: int | None = None

    def open(self) -> int:
        """A new pipe for the next job (the last one's end goes): its read end."""
        read, write = os.pipe()
        self.close()
        self._fd = write
        return read

    def feed(self, data: bytes) -> None:
        if self._fd is None:
            return  # input for a job that ended (or took none)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError:  # the module is done with its stdin
            self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def main() -> None:
    # A signal the parent forwards ends us as it would any command (Python would turn
    # SIGINT into an exception that native code never sees). SIGPIPE is ignored: a module
    # that closes its stdin must not end the worker feeding it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    # The drain timer's signal, blocked before any thread starts (the drainer, wasmtime's
    # compile and WASI threads inherit it): it waits for the drainer's sigwait, and never
    # ends us or interrupts a job on another thread.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    # wasmtime and this package sit side by side (bound there by wasm.py).
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))
    import wasmtime

    engine = wasmtime.Engine()  # the parent compiles with the same (default) settings
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    if not select.select([0], [], [], 0)[0]:  # no job waiting: time to warm up
        _warm_up(engine, linker)
    _out().end(frame(READY))
    try:
        _serve(engine, linker)
    except (OSError, ValueError, EOFError) as exc:
        os.write(2, f"agentkernel: wasm worker: bad request: {exc}\n".encode())
        os._exit(EXIT_FAILED)
    os._exit(0)


def _serve(engine: wasmtime.Engine, linker: wasmtime.Linker) -> None:
    """Requests until stdin ends. A job without stdin runs on this thread (no hand-over
    between threads on the hot path); one with stdin on a thread of its own, while this
    one feeds it. Jobs never overlap: the next request waits for the last job's end.

    After a job without stdin has ended (its end sent), a new Store with the same WASI
    context (argv, env, limits, preopen) is made for the next job, before that job
    comes: a run repeated as it was (a warm run's usual case) finds its Store ready, one
    that differs in any byte of its request gets one made then. Either way each job's
    Store is new and no code runs in it before its job (nothing is instantiated ahead)."""
    modules: Loaded = {}
    stdin = _Stdin()
    running: threading.Thread | None = None
    ahead: tuple[bytes, wasmtime.Store] | None = None  # a job's request, its Store
    while (got := read_frame()) is not None:
        kind, payload = got
        if kind == b"I":
            stdin.feed(payload)
            continue
        if kind == b"C":
            stdin.close()
            continue
        if running is not None:
            running.join()
            running = None
        if kind == b"M":
            _load(engine, linker, modules, payload)
        elif kind == b"D":
            modules.pop(payload.decode(errors="replace"), None)
        elif kind == b"J":
            job = json.loads(payload)
            if isinstance(job, dict) and job.get("stdin"):
                running = threading.Thread(
                    target=_answer, args=(engine, modules, job, stdin.open(), None),
                    daemon=True)
                running.start()
                continue
            store = None
            if ahead is not None:
                request, made = ahead
                ahead = None
                if request == payload:
                    store = made
                else:
                    made.close()
            _answer(engine, modules, job, None, store)
            ahead = _ahead(engine, job, payload)
    stdin.close()  # our stdin ended, so does the job's
    if running is not None:  # the job under way still ends, and says so
        running.join()


def _ahead(engine: wasmtime.Engine, job: object, request: bytes
           ) -> tuple[bytes, wasmtime.Store] | None:
    """A Store for a next job sent as `request` was (None if it cannot be made now: that
    job makes its own, and says why)."""
    if not isinstance(job, dict):
        return None
    try:
        return request, _store(engine, job, None)
    except Exception:
        return None


def _answer(engine: wasmtime.Engine, modules: Loaded, job: object, fd: int | None,
            store: wasmtime.Store | None) -> None:
    """Run a job (in `store`, made for it ahead, or a new one) and send its end, then
    close the store: its teardown is not the run's time. Anything unforeseen ends the
    worker (on whichever thread): its parent then sees the worker gone, never a job
    that does not end."""
    used: list[wasmtime.Store] = [store] if store is not None else []
    _out().start()
    try:
        end = _job(engine, modules, job, fd, used)
    except BaseException as exc:
        _out().end(b"")
        os.write(2, f"agentkernel: wasm worker: {exc!r}\n".encode(errors="replace"))
        os._exit(EXIT_FAILED)
    _out().end(frame(b"X", json.dumps(end).encode()))
    for done in used:
        done.close()  # the instance, its memory and WASI context go now, not at GC


def _load(engine: wasmtime.Engine, linker: wasmtime.Linker, modules: Loaded,
          payload: bytes) -> None:
    """Deserialize a module and link it to WASI now (an InstancePre: imports resolved and
    checked once), so that each job costs one instantiation from it."""
    import wasmtime

    key = payload[:KEY_BYTES].decode(errors="replace")
    try:
        module = wasmtime.Module.deserialize(engine, payload[KEY_BYTES:])
    except wasmtime.WasmtimeError as exc:
        # The job that needs it says so (this goes with its output); the parent never
        # sends bytes wasmtime refuses.
        _out().put(frame(b"E", f"agentkernel: wasm: cannot load a module: "
                               f"{_first_line(exc)}\n".encode(errors="replace")))
        return
    if len(modules) >= MAX_MODULES:
        modules.pop(next(iter(modules)))
    try:
        modules[key] = linker.instantiate_pre(module)
    except wasmtime.WasmtimeError as exc:  # its jobs say so
        modules[key] = f"cannot link: {_first_line(exc)}"


def _job(engine: wasmtime.Engine, modules: Loaded, job: object, fd: int | None,
         used: list[wasmtime.Store]) -> dict[str, int]:
    """One job's end: its exit code, or the signal its trap stands for. Its Store is
    `used[0]` if one was made ahead, else a new one is made and put there."""
    try:
        if not isinstance(job, dict):
            return _failed("bad job")
        module = modules.get(str(job.get("key")))
        if module is None:
            return _failed(f"{job.get('shown')}: the compiled module was not loaded")
        if isinstance(module, str):
            return _failed(f"{job.get('shown')}: {module}")
        if not used:
            used.append(_store(engine, job, fd))
        return run(module, job, used[0])
    finally:
        if fd is not None:
            os.close(fd)


def _failed(message: str) -> dict[str, int]:
    _out().put(frame(b"E", f"agentkernel: wasm: {message}\n".encode(errors="replace")))
    return {"code": EXIT_FAILED}


# Writes one byte to its stdout (discarded): compiled here, run once, thrown away.
WARM_UP = """(module
 (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
 (memory (export "memory") 1) (data (i32.const 16) "x")
 (func (export "_start")
   (i32.store (i32.const 0) (i32.const 16)) (i32.store (i32.const 4) (i32.const 1))
   (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"""


def _warm_up(engine: wasmtime.Engine, linker: wasmtime.Linker) -> None:
    """Run a module once before the first job: the first load, store, instantiation and
    write (wasmtime's lazily made runtime pieces, page faults) then cost the pool's time,
    not a run's. Our own constant module, so nothing of it is trusted or kept. Skipped
    when a job waits already (a run without a daemon): that job is the first run anyway."""
    import wasmtime

    module = wasmtime.Module.deserialize(
        engine, wasmtime.Module(engine, bytes(wasmtime.wat2wasm(WARM_UP))).serialize())
    store = wasmtime.Store(engine)
    wasi = wasmtime.WasiConfig()
    wasi.stdout_file, wasi.stderr_file = _out().paths()
    store.set_wasi(wasi)
    with _out().silenced():  # nothing may precede the ready frame
        linker.instantiate_pre(module).instantiate(store).exports(store)["_start"](
            store)  # type: ignore[operator]
        store.close()


def _store(engine: wasmtime.Engine, job: dict[str, object],
           stdin_fd: int | None) -> wasmtime.Store:
    """A new Store for `job`: its limits and its WASI context (argv, env, stdio, the
    project preopened as the job says)."""
    import wasmtime

    memory = job.get("memory_bytes")
    store = wasmtime.Store(engine)
    try:
        store.set_limits(memory_size=memory if isinstance(memory, int) and memory > 0 else -1,
                         table_elements=MAX_TABLE_ELEMENTS, instances=MAX_INSTANCES,
                         tables=MAX_TABLES, memories=MAX_MEMORIES)
        wasi = wasmtime.WasiConfig()
        wasi.argv = [str(a) for a in _list(job.get("argv"))]
        wasi.env = [(str(p[0]), str(p[1])) for p in _list(job.get("env"))
                    if isinstance(p, list) and len(p) == 2]
        wasi.stdout_file, wasi.stderr_file = _out().paths()
        if stdin_fd is not None:
            wasi.stdin_file = f"/proc/self/fd/{stdin_fd}"  # the pipe's read end, reopened
        if job.get("workspace"):
            wasi.preopen_dir(WORKSPACE, WORKSPACE, bool(job.get("writable")))
        store.set_wasi(wasi)
    except BaseException:
        store.close()
        raise
    return store


def run(module: wasmtime.InstancePre, job: dict[str, object],
        store: wasmtime.Store) -> dict[str, int]:
    """Run the module's _start in a new instance in `store` (the job's own): its exit
    code, or SIGABRT for a trap (as wasmtime's own CLI reports one)."""
    import wasmtime

    try:
        instance = module.instantiate(store)
    except wasmtime.WasmtimeError as exc:
        return _failed(f"{job.get('shown')}: cannot instantiate: {_first_line(exc)}")
    start = _start_of(instance, store)
    if start is None:  # (the compiler checked it has one: not our module)
        return _failed(f"{job.get('shown')}: it exports no _start function")
    try:
        start(store)
    except wasmtime.ExitTrap as exc:
        return {"code": exc.code if 0 <= exc.code <= 255 else (exc.code & 0xFF or 1)}
    except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
        _out().put(frame(b"E", f"agentkernel: wasm trap: {_first_line(exc)}\n".encode(
            errors="replace")))
        return {"signal": int(signal.SIGABRT)}
    return {"code": 0}


def _start_of(instance: wasmtime.Instance, store: wasmtime.Store) -> wasmtime.Func | None:
    """The instance's `_start` function, looked up by its name alone: `exports()` wraps
    every export of the instance first (~50 us for a module with two; a C program's
    module exports more), a third of a warm job's time in wasmtime. Through wasmtime-py's
    bindings of the C API (the version pinned); the public way where they differ."""
    import ctypes

    import wasmtime

    try:
        from wasmtime import _ffi as ffi

        item = ffi.wasmtime_extern_t()
        found = ffi.wasmtime_instance_export_get(
            store._context(), ctypes.byref(instance._instance), b"_start", 6,
            ctypes.byref(item))
        kind: int = item.kind  # type: ignore[assignment]  # (ctypes gives an int)
        is_func = bool(found) and kind == ffi.WASMTIME_EXTERN_FUNC.value
        return wasmtime.Func._from_raw(item.of.func) if is_func else None
    except (AttributeError, ImportError, TypeError, ctypes.ArgumentError):
        export = instance.exports(store).get("_start")
        return export if isinstance(export, wasmtime.Func) else None


def _list(value: object) -> list[object]:
    return value if isinstance(value, list) else []


if __name__ == "__main__":
    main()
