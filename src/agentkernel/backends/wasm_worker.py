"""The wasm backend's worker: runs one compiled WASI module inside a sandbox of its own.

The wasm backend starts this file with `python -I -S` in a namespaces sandbox that shows
only the interpreter, wasmtime, this package and the project at /workspace (see wasm.py).
It imports wasmtime, makes its engine and WASI linker, says it is ready (one byte on
stdout), then reads one job from stdin: a header (argv, env, limits, workspace) and the
module as the parent compiled it. It runs the module with the process's own
stdin/stdout/stderr and exits with the module's exit status. One job per process: nothing
of one run is there for the next.

It needs nothing of agentkernel but the job format below (no import of the package: it
starts faster and shows less), and never writes anything the parent trusts: the compiled
module only ever flows from the parent to here.
"""

from __future__ import annotations

import json
import os
import signal
import sys

TYPE_CHECKING = False  # not typing's: the worker imports as little as it can
if TYPE_CHECKING:
    import wasmtime

MAGIC = b"AKW1"
MAX_HEADER = 1 << 20  # the JSON header: argv and env of one run
MAX_MODULE = 256 << 20  # a compiled module (wasm_cache.MAX_ENTRY_BYTES)
READY = b"R"
WORKSPACE = "/workspace"
# Per store: tables and instances a WASI command needs, with room, but bounded.
MAX_TABLE_ELEMENTS = 1 << 20
MAX_INSTANCES = 4
MAX_TABLES = 8
MAX_MEMORIES = 2
EXIT_FAILED = 125  # the job could not be run (bad job, a module that fails to link)


def encode_job(header: dict[str, object], compiled: bytes) -> bytes:
    """The job as the parent writes it to the worker's stdin (used by wasm.py)."""
    head = json.dumps({**header, "module_bytes": len(compiled)}).encode()
    return MAGIC + len(head).to_bytes(4, "big") + head + compiled


def _read_exact(n: int) -> bytes:
    chunks = []
    while n > 0:
        chunk = os.read(0, min(n, 1 << 20))
        if not chunk:
            raise EOFError("the job ended early")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_job() -> tuple[dict[str, object], bytes]:
    """The header and compiled module, read unbuffered: what follows on stdin is the
    module's own input."""
    prefix = _read_exact(8)
    if prefix[:4] != MAGIC:
        raise ValueError("not a job")
    size = int.from_bytes(prefix[4:], "big")
    if size > MAX_HEADER:
        raise ValueError("job header too large")
    header = json.loads(_read_exact(size))
    if not isinstance(header, dict):
        raise ValueError("job header is not an object")
    length = header.get("module_bytes")
    if not isinstance(length, int) or not 0 < length <= MAX_MODULE:
        raise ValueError("bad module size")
    return header, _read_exact(length)


def _list(value: object) -> list[object]:
    return value if isinstance(value, list) else []


def _fail(message: str) -> None:
    os.write(2, f"agentkernel: wasm: {message}\n".encode(errors="replace"))
    os._exit(EXIT_FAILED)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main() -> None:
    # A signal the parent forwards ends us as it would any command (Python would turn
    # SIGINT into an exception that native code never sees).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    # wasmtime and this package sit side by side (bound there by wasm.py).
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))
    import wasmtime

    engine = wasmtime.Engine()  # the parent compiles with the same (default) settings
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    _warm_up(engine, linker)
    os.write(1, READY)
    try:
        header, compiled = read_job()
    except (OSError, ValueError, EOFError) as exc:
        _fail(f"bad job: {exc}")
    try:
        module = wasmtime.Module.deserialize(engine, compiled)
    except wasmtime.WasmtimeError as exc:
        _fail(f"cannot load the compiled module: {_first_line(exc)}")
    del compiled
    os._exit(run(engine, linker, module, header))


# Writes one byte to its stdout (then /dev/null): compiled here, run once, thrown away.
WARM_UP = """(module
 (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
 (memory (export "memory") 1) (data (i32.const 16) "x")
 (func (export "_start")
   (i32.store (i32.const 0) (i32.const 16)) (i32.store (i32.const 4) (i32.const 1))
   (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"""


def _warm_up(engine: wasmtime.Engine, linker: wasmtime.Linker) -> None:
    """Run a module once before the job: the first load, store, instantiation and write
    (wasmtime's lazily made runtime pieces, page faults) then cost the pool's time, not
    the run's. Our own constant module, so nothing of it is trusted or kept."""
    import wasmtime

    module = wasmtime.Module.deserialize(
        engine, wasmtime.Module(engine, bytes(wasmtime.wat2wasm(WARM_UP))).serialize())
    store = wasmtime.Store(engine)
    wasi = wasmtime.WasiConfig()
    wasi.stdout_file = "/dev/null"
    store.set_wasi(wasi)
    linker.instantiate(store, module).exports(store)["_start"](store)  # type: ignore[operator]
    store.close()


def run(engine: wasmtime.Engine, linker: wasmtime.Linker, module: wasmtime.Module,
        job: dict[str, object]) -> int:
    """Run the module's _start; its exit code (a trap aborts the process, as wasmtime's
    own CLI reports one)."""
    import wasmtime

    memory = job.get("memory_bytes")
    store = wasmtime.Store(engine)
    store.set_limits(memory_size=memory if isinstance(memory, int) and memory > 0 else -1,
                     table_elements=MAX_TABLE_ELEMENTS, instances=MAX_INSTANCES,
                     tables=MAX_TABLES, memories=MAX_MEMORIES)
    wasi = wasmtime.WasiConfig()
    wasi.argv = [str(a) for a in _list(job.get("argv"))]
    wasi.env = [(str(p[0]), str(p[1])) for p in _list(job.get("env"))
                if isinstance(p, list) and len(p) == 2]
    wasi.inherit_stdout()
    wasi.inherit_stderr()
    if job.get("stdin"):
        wasi.inherit_stdin()
    if job.get("workspace"):
        wasi.preopen_dir(WORKSPACE, WORKSPACE, bool(job.get("writable")))
    store.set_wasi(wasi)
    try:
        instance = linker.instantiate(store, module)
    except wasmtime.WasmtimeError as exc:
        _fail(f"{job.get('shown')}: cannot link: {_first_line(exc)}")
    try:
        instance.exports(store)["_start"](store)  # type: ignore[operator]
    except wasmtime.ExitTrap as exc:
        return exc.code if 0 <= exc.code <= 255 else (exc.code & 0xFF or 1)
    except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
        os.write(2, f"agentkernel: wasm trap: {_first_line(exc)}\n".encode(errors="replace"))
        signal.signal(signal.SIGABRT, signal.SIG_DFL)
        os.abort()
    return 0


if __name__ == "__main__":
    main()
