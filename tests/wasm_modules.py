"""WASI test modules for the wasm backend's tests and benchmark, as WebAssembly text."""

from __future__ import annotations

from pathlib import Path

WASI = "wasi_snapshot_preview1"
FD_WRITE = f'(import "{WASI}" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))'
FD_READ = f'(import "{WASI}" "fd_read" (func $r (param i32 i32 i32 i32) (result i32)))'
EXIT = f'(import "{WASI}" "proc_exit" (func $exit (param i32)))'
# out(fd, ptr, len): one fd_write of one iovec (kept at 0..8, nwritten at 8).
OUT = """
 (func $out (param $fd i32) (param $p i32) (param $n i32)
   (i32.store (i32.const 0) (local.get $p)) (i32.store (i32.const 4) (local.get $n))
   (drop (call $w (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))"""

# "hello\n" on stdout, "oops\n" on stderr, then argv[1..] (NUL-separated) on stdout.
HELLO = f"""(module {FD_WRITE}
 (import "{WASI}" "args_sizes_get" (func $as (param i32 i32) (result i32)))
 (import "{WASI}" "args_get" (func $ag (param i32 i32) (result i32)))
 (memory (export "memory") 1)
 (data (i32.const 16) "hello\\n") (data (i32.const 32) "oops\\n") {OUT}
 (func (export "_start") (local $a1 i32)
   (call $out (i32.const 1) (i32.const 16) (i32.const 6))
   (call $out (i32.const 2) (i32.const 32) (i32.const 5))
   (drop (call $as (i32.const 200) (i32.const 204)))
   (drop (call $ag (i32.const 300) (i32.const 1024)))
   (if (i32.gt_u (i32.load (i32.const 200)) (i32.const 1))
     (then
       (local.set $a1 (i32.load (i32.const 304)))
       (call $out (i32.const 1) (local.get $a1)
             (i32.sub (i32.add (i32.const 1024) (i32.load (i32.const 204)))
                      (local.get $a1)))))))
"""

# The whole environment (NUL-separated KEY=VALUE) on stdout.
ENV = f"""(module {FD_WRITE}
 (import "{WASI}" "environ_sizes_get" (func $es (param i32 i32) (result i32)))
 (import "{WASI}" "environ_get" (func $eg (param i32 i32) (result i32)))
 (memory (export "memory") 1) {OUT}
 (func (export "_start")
   (drop (call $es (i32.const 200) (i32.const 204)))
   (drop (call $eg (i32.const 300) (i32.const 4096)))
   (call $out (i32.const 1) (i32.const 4096) (i32.load (i32.const 204)))))
"""

EXIT7 = (f'(module {EXIT} (memory (export "memory") 1) '
         '(func (export "_start") (call $exit (i32.const 7))))')

# stdin to stdout until EOF.
CAT = f"""(module {FD_READ} {FD_WRITE}
 (memory (export "memory") 1)
 (func (export "_start")
   (loop $l
     (i32.store (i32.const 0) (i32.const 1024)) (i32.store (i32.const 4) (i32.const 4096))
     (i32.store (i32.const 8) (i32.const 0))
     (drop (call $r (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
     (if (i32.eqz (i32.load (i32.const 8))) (then (return)))
     (i32.store (i32.const 4) (i32.load (i32.const 8)))
     (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 12)))
     (br $l))))
"""

# FLOOD_CHUNKS times 64 KiB of "o" on stdout and of "e" on stderr, in turns: more than
# the worker's pipes hold, so it only ends if its output is read while it runs.
FLOOD_CHUNKS = 64
FLOOD = f"""(module {FD_WRITE}
 (memory (export "memory") 3) {OUT}
 (func (export "_start") (local $i i32)
   (memory.fill (i32.const 65536) (i32.const 111) (i32.const 65536))
   (memory.fill (i32.const 131072) (i32.const 101) (i32.const 65536))
   (loop $l
     (call $out (i32.const 1) (i32.const 65536) (i32.const 65536))
     (call $out (i32.const 2) (i32.const 131072) (i32.const 65536))
     (local.set $i (i32.add (local.get $i) (i32.const 1)))
     (br_if $l (i32.lt_u (local.get $i) (i32.const {FLOOD_CHUNKS}))))))
"""

LOOP = '(module (func (export "_start") (loop $l (br $l))))'

# State a run leaves behind if an instance were reused: a mutable global, a memory word, a
# grown memory and a table slot, each counted up; prints the four counts ("1111\n" fresh).
COUNTER = f"""(module {FD_WRITE}
 (memory (export "memory") 1) (global $g (mut i32) (i32.const 0))
 (table 2 funcref) (func $f) (elem declare func $f) {OUT}
 (func (export "_start")
   (global.set $g (i32.add (global.get $g) (i32.const 1)))
   (i32.store (i32.const 64) (i32.add (i32.load (i32.const 64)) (i32.const 1)))
   (drop (memory.grow (i32.const 1)))
   (if (ref.is_null (table.get (i32.const 1)))
     (then (table.set (i32.const 1) (ref.func $f)) (i32.store (i32.const 68) (i32.const 1)))
     (else (i32.store (i32.const 68) (i32.const 2))))
   (i32.store8 (i32.const 32) (i32.add (i32.const 48) (global.get $g)))
   (i32.store8 (i32.const 33) (i32.add (i32.const 48) (i32.load (i32.const 64))))
   (i32.store8 (i32.const 34) (i32.add (i32.const 47) (memory.size)))
   (i32.store8 (i32.const 35) (i32.add (i32.const 48) (i32.load (i32.const 68))))
   (i32.store8 (i32.const 36) (i32.const 10))
   (call $out (i32.const 1) (i32.const 32) (i32.const 5))))
"""

# Grows memory a page at a time until refused; exits with the MiB it got.
GROW = f"""(module {EXIT} (memory (export "memory") 1)
 (func (export "_start") (local $n i32)
   (local.set $n (i32.const 1))
   (block $done (loop $l
     (br_if $done (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
     (local.set $n (i32.add (local.get $n) (i32.const 1)))
     (br $l)))
   (call $exit (i32.div_u (local.get $n) (i32.const 16)))))
"""

# Exits 0 if nothing beyond fd 3 (/workspace) is open and no socket can be had; else 1-2.
FDS = f"""(module {EXIT}
 (import "{WASI}" "fd_prestat_get" (func $pg (param i32 i32) (result i32)))
 (import "{WASI}" "sock_accept" (func $sa (param i32 i32 i32) (result i32)))
 (memory (export "memory") 1)
 (func (export "_start") (local $fd i32)
   (local.set $fd (i32.const 4))
   (loop $l
     (if (i32.eqz (call $pg (local.get $fd) (i32.const 64))) (then (call $exit (i32.const 1))))
     (local.set $fd (i32.add (local.get $fd) (i32.const 1)))
     (br_if $l (i32.lt_u (local.get $fd) (i32.const 64))))
   (local.set $fd (i32.const 0))
   (loop $s
     (if (i32.eqz (call $sa (local.get $fd) (i32.const 0) (i32.const 64)))
       (then (call $exit (i32.const 2))))
     (local.set $fd (i32.add (local.get $fd) (i32.const 1)))
     (br_if $s (i32.lt_u (local.get $fd) (i32.const 8))))
   (call $exit (i32.const 0))))
"""


def open_module(path: str, write: bool = False) -> str:
    """Opens `path` relative to the /workspace preopen (fd 3), following symlinks; writes
    "written\\n" into it (created) or copies it to stdout. Exits with the WASI errno."""
    data = path.encode()
    literal = "".join(f"\\{b:02x}" for b in data)
    oflags, rights = (9, 64) if write else (0, 2)
    body = ("(call $out (local.get $fd) (i32.const 2048) (i32.const 8))" if write else
            """(i32.store (i32.const 0) (i32.const 4096)) (i32.store (i32.const 4) (i32.const 4096))
     (drop (call $r (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8)))
     (call $out (i32.const 1) (i32.const 4096) (i32.load (i32.const 8)))""")
    return f"""(module {FD_READ} {FD_WRITE} {EXIT}
 (import "{WASI}" "path_open"
   (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
 (memory (export "memory") 1)
 (data (i32.const 1024) "{literal}") (data (i32.const 2048) "written\\n") {OUT}
 (func (export "_start") (local $e i32) (local $fd i32)
   (local.set $e (call $open (i32.const 3) (i32.const 1) (i32.const 1024) (i32.const {len(data)})
                   (i32.const {oflags}) (i64.const {rights}) (i64.const 0) (i32.const 0)
                   (i32.const 100)))
   (if (local.get $e) (then (call $exit (local.get $e))))
   (local.set $fd (i32.load (i32.const 100)))
   {body}
   (call $exit (i32.const 0))))
"""


def write_modules(directory: Path) -> dict[str, Path]:
    """Each test module as a .wat file in `directory`, and hello also as a .wasm binary."""
    import wasmtime

    modules = {"hello": HELLO, "env": ENV, "exit7": EXIT7, "cat": CAT, "loop": LOOP,
               "grow": GROW, "fds": FDS, "counter": COUNTER, "flood": FLOOD}
    paths = {}
    for name, text in modules.items():
        paths[name] = directory / f"{name}.wat"
        paths[name].write_text(text)
    paths["hello_bin"] = directory / "hello.wasm"
    paths["hello_bin"].write_bytes(bytes(wasmtime.wat2wasm(HELLO)))
    return paths


def _leb(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def big_function(size: int) -> bytes:
    """A WASI command (binary) whose one function is `size` bytes of straight-line code:
    valid, tiny to run, costly to compile (here ~130 MB and ~1 s of CPU per MiB)."""
    step = bytes([0x20, 0, 0x41, 1, 0x6A, 0x21, 0])  # local0 = local0 + 1
    body = bytes([1, 1, 0x7F]) + step * (size // len(step)) + bytes([0x0B])

    def section(ident: int, content: bytes) -> bytes:
        return bytes([ident]) + _leb(len(content)) + content

    return (b"\0asm\x01\0\0\0" + section(1, b"\x01\x60\x00\x00") + section(3, b"\x01\x00")
            + section(7, b"\x01\x06_start\x00\x00")
            + section(10, b"\x01" + _leb(len(body)) + body))
