"""The wasm backend's compiler child: compiles one untrusted module, bounded, then exits.

wasm.py starts this file (`python -I -S wasm_compile.py WASMTIME_DIR MEMORY CPU ahead|now
UID GID`), or a daemon's fork server of this file forks it (`serve`, below), for each
module it has not compiled yet (`ahead`: a daemon's, started before its module
comes, at a lower priority while it starts up), so that Cranelift never meets untrusted
input inside the daemon (or the CLI): a module that needs gigabytes or minutes to compile
exhausts this child, not them. Before it reads anything it bounds itself: its address
space (MEMORY bytes), its CPU time (CPU seconds, all threads), no files written, no core
dump. Once wasmtime is loaded it gives up root if it has it (for UID/GID, a range of root's
sandbox id block that no other process uses while we hold its lock; no groups), sets
no_new_privs and, where unprivileged user namespaces work, leaves the host's files and
network behind (_confine). The parent bounds its wall time and kills it past that.

stdin: the module (binary, or its text). stdout: one answer, its kind (`K`: the serialized
module, checked: a WASI command, its imports all in WASI preview1; `E`: why it is not one,
UTF-8), the payload's length (4 bytes, big-endian), the payload. The length lets the parent
take a whole answer without waiting for our exit (tearing down a process with wasmtime
mapped takes ~2-3 ms on a VM). Anything else (a signal, no answer, a short one) is a
resource bound the parent names.
It imports nothing of agentkernel (it starts faster and shows less).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import sys

TYPE_CHECKING = False  # not typing's: the child imports as little as it can
if TYPE_CHECKING:
    import select
    import socket
    from typing import NoReturn

    import wasmtime

NOBODY = 65534
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWNET = 0x20000, 0x8000000, 0x10000000, \
    0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 0x4000, 1 << 18
CAPS_V3 = 0x20080522
AHEAD_NICE = 10  # a child started ahead of its module, while it starts up
EMPTY_ROOT = b"/tmp"  # where an empty tmpfs is mounted (in our own mount namespace) as /
MAX_SOURCE = 64 * 1024 * 1024 + 1  # wasm.MAX_MODULE_BYTES, one more to see it exceeded
# No core dump at the bounds (SIGABRT past the memory one, SIGXCPU past the CPU one): 1,
# not 0, for a pipe core_pattern (apport, systemd-coredump; their hosts set
# fs.suid_dumpable 2, which dumps us even after we gave up root) runs as host root on the
# crashed process's memory, the untrusted module's bytes with it, for every value but 1.
NO_CORE = (1, 1)


def _bound(memory: int, cpu: int) -> None:
    """Limits on this process, set before any untrusted byte is read."""
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    # The soft limit's SIGXCPU ends us (default action); the hard one, a second on, kills.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, NO_CORE)


def _drop_root(libc: ctypes.CDLL, uid: int, gid: int) -> None:
    """Started by root: `uid`/`gid` from here on (ids of our own: see wasm._compile_ids),
    and no way back (no_new_privs)."""
    if os.geteuid() == 0:
        if uid <= 0 or gid <= 0:
            raise ValueError(f"no ids to run as ({uid}, {gid})")
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    _check(libc, libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def _confine(libc: ctypes.CDLL) -> None:
    """No file and no network from here on, where the host lets an unprivileged process
    have namespaces: a user namespace of our own, a mount namespace whose root is an empty
    tmpfs (nothing of the host's files; the cache, the user's files, the daemon's socket
    all out of reach), an empty network namespace, and then no capability (the root
    cannot be left again). A host without unprivileged user namespaces leaves us with the
    bounds and the dropped root alone."""
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC) != 0:
        return
    _check(libc, libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount private")
    _check(libc, libc.mount(b"none", EMPTY_ROOT, b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                            b"size=16k,mode=0555"), "mount tmpfs")
    os.chroot(EMPTY_ROOT)
    os.chdir("/")
    header = (ctypes.c_uint32 * 2)(CAPS_V3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable: none (x2)
    _check(libc, libc.capset(header, data), "capset")


def _check(libc: ctypes.CDLL, result: int, what: str) -> None:
    if result != 0:
        raise OSError(ctypes.get_errno(), what)


def _read_source() -> bytes:
    chunks = []
    left = MAX_SOURCE
    while left > 0:
        chunk = os.read(0, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _write(data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]


def _answer(answer: bytes) -> None:
    """The answer framed: kind, payload length, payload (in one write where it is small:
    the parent wakes once; a large one is not copied again)."""
    head = answer[:1] + (len(answer) - 1).to_bytes(4, "big")
    if len(answer) <= 1 << 20:
        _write(head + answer[1:])
    else:
        _write(head)
        _write(memoryview(answer)[1:])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def compile_checked(engine: wasmtime.Engine, linker: wasmtime.Linker, source: bytes) -> bytes:
    """`K` + the serialized module, or `E` + why the source is not a WASI command."""
    import wasmtime

    try:
        binary = (source if source[:4] == b"\0asm"
                  else bytes(wasmtime.wat2wasm(source.decode())))
        module = wasmtime.Module(engine, binary)
    except (wasmtime.WasmtimeError, UnicodeDecodeError) as exc:
        return b"E" + f"not a valid WebAssembly module: {_first_line(exc)}".encode()
    if not any(e.name == "_start" for e in module.exports):
        return b"E" + b"not a WASI command (it exports no _start function)"
    try:
        linker.instantiate_pre(module)
    except wasmtime.WasmtimeError as exc:
        return b"E" + (f"needs imports WASI preview1 does not offer: "
                       f"{_first_line(exc)}").encode()
    return b"K" + bytes(module.serialize())


# Compiled once by a child started ahead, before it waits for its module: the parser's,
# Cranelift's and the serializer's code and data are then in memory (a cold process's page
# faults cost its first compile several ms on a VM), not paid by the run that waits.
WARM_UP = b"""(module
 (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
 (memory (export "memory") 1) (data (i32.const 16) "x")
 (func (export "_start") (local $i i32)
   (loop $l (local.set $i (i32.add (local.get $i) (i32.const 1)))
     (br_if $l (i32.lt_u (local.get $i) (i32.const 8))))
   (i32.store (i32.const 0) (i32.const 16)) (i32.store (i32.const 4) (i32.const 1))
   (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"""


def main() -> None:
    where, memory, cpu = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    mode = sys.argv[4] if len(sys.argv) > 4 else "now"
    if mode == "serve":
        serve(where, memory, cpu, int(sys.argv[5]))
    uid, gid = (int(sys.argv[5]), int(sys.argv[6])) if len(sys.argv) > 6 else (NOBODY, NOBODY)
    ahead = mode == "ahead"
    _bound(memory, cpu)
    if ahead:  # started before our module comes: our start-up yields to the runs in flight
        os.setpriority(os.PRIO_PROCESS, 0, AHEAD_NICE)
    sys.path.insert(0, where)
    import wasmtime  # noqa: F401  (its library loaded while we may still read it)

    if ahead and os.geteuid() == 0:  # (only root may come back; others compile at +10)
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    _compile_one(ahead, uid, gid)


def _compile_one(ahead: bool, uid: int, gid: int) -> NoReturn:
    """Bounded already: confine ourselves, make the engine, read one module, answer, out."""
    import wasmtime

    libc = ctypes.CDLL(None, use_errno=True)
    _drop_root(libc, uid, gid)
    _confine(libc)
    engine = wasmtime.Engine()  # the worker's engine has the same (default) settings
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    if ahead:
        compile_checked(engine, linker, WARM_UP)
    source = _read_source()
    try:
        answer = (b"E" + b"larger than 64 MiB" if len(source) >= MAX_SOURCE
                  else compile_checked(engine, linker, source))
    except MemoryError:
        os._exit(3)  # the parent names the bound
    _answer(answer)
    # Out now: the interpreter's teardown with wasmtime loaded takes tens of ms, and the
    # parent takes our answer without waiting for our exit.
    os._exit(0)


# ---------------------------------------------------------------- the fork server
#
# A daemon keeps one (wasm._ForkServer): this file started with `serve`, wasmtime imported
# once, then a child forked per module instead of a new interpreter each (whose start-up
# and import cost ~100 ms of CPU per module, at every refill). The server never reads a
# module, nor anything but the daemon's requests on its end of a socket pair only the
# daemon holds (SEQPACKET: one request per message). It makes no engine: wasmtime starts
# threads once it compiles, and a process with threads must not fork. Each child is what a
# started child is: its own session, only its three pipes open, bounded, then confined
# before it reads anything (_forked). The server reaps its children: once one ended, it
# kills the rest of that child's session (what it forked would keep our pipes), reaps it
# and writes its wait status to the status pipe the daemon gave with the request.

# A request: FORK, the uid and gid the child runs as (4 bytes each); as fds the child's
# stdin, stdout, stderr, the status pipe, and the lock of its id range where it has one.
FORK = b"f"
REFUSED = b"!"  # the answer when it cannot fork (too many children, a bad request)
SERVE_CHILDREN = 8  # children at once (the daemon compiles 2 at once, keeps 1 ahead)


def serve(where: str, memory: int, cpu: int, ctl_fd: int) -> NoReturn:
    """The fork server's loop (never returns: exits once the daemon's end is closed)."""
    import select
    import socket

    resource.setrlimit(resource.RLIMIT_CORE, NO_CORE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    sys.path.insert(0, where)
    import wasmtime  # noqa: F401  (what every child would import: loaded once, here)

    ctl = socket.socket(fileno=ctl_fd)
    children: dict[int, tuple[int, int]] = {}  # pidfd -> (pid, status fd)
    poller = select.poll()
    poller.register(ctl_fd, select.POLLIN)
    while True:
        for fd, _ev in poller.poll():
            if fd != ctl_fd:
                _reaped(fd, children, poller)
            elif not _request(ctl, children, poller, memory, cpu):
                _end_all(children, poller)
                os._exit(0)


def _end_all(children: dict[int, tuple[int, int]], poller: select.poll) -> None:
    """The daemon is gone: so are our children, each with its session. Each is killed
    through its pidfd first (one just forked may not have its own session yet, so no
    group to signal; it cannot have forked either), then handled as any that ended."""
    for pidfd in children:
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    for pidfd in list(children):
        _reaped(pidfd, children, poller)


def _request(ctl: socket.socket, children: dict[int, tuple[int, int]], poller: select.poll,
             memory: int, cpu: int) -> bool:
    """Serve one request (False: the daemon closed its end)."""
    import select
    import socket

    try:
        msg, fds, _flags, _addr = socket.recv_fds(ctl, 16, 5)
    except OSError:
        return False
    if not msg:
        for fd in fds:
            os.close(fd)
        return False
    if (len(msg) != 9 or msg[:1] != FORK or len(fds) not in (4, 5)
            or len(children) >= SERVE_CHILDREN):
        for fd in fds:
            os.close(fd)
        ctl.send(REFUSED)
        return True
    pid = os.fork()
    if pid == 0:
        _forked(fds, memory, cpu, int.from_bytes(msg[1:5], "big"),
                int.from_bytes(msg[5:9], "big"))
    for fd in (*fds[:3], *fds[4:]):  # (the id range's lock is the child's alone now)
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    children[pidfd] = (pid, fds[3])
    poller.register(pidfd, select.POLLIN)
    socket.send_fds(ctl, [pid.to_bytes(4, "big")], [pidfd])
    return True


def _forked(fds: list[int], memory: int, cpu: int, uid: int, gid: int) -> NoReturn:
    """A child of the fork server: what a child started ahead does once it has imported
    wasmtime, from a clean slate first (its own session, its pipes at 0-2, the lock of
    its id range at 3 if it came, nothing else open: not the server's socket, nor its
    other children's status pipes and pidfds)."""
    try:
        os.setsid()
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        if len(fds) > 4:
            os.dup2(fds[4], 3)  # held till we end: the ids are ours alone till then
        os.closerange(3 + (len(fds) > 4), 1 << 20)
        _bound(memory, cpu)
        # (At the server's priority: what is left of a start-up, the engine and the
        # warm-up, is a few ms of CPU; a lower one could not be left for the compile
        # once root is given up.)
        _compile_one(True, uid, gid)
    finally:
        os._exit(70)


def _reaped(pidfd: int, children: dict[int, tuple[int, int]], poller: select.poll) -> None:
    """A child ended: the rest of its session killed (while it is not reaped yet, its
    group id is still its own), reaped, its wait status to the daemon's status pipe."""
    pid, status_fd = children.pop(pidfd)
    poller.unregister(pidfd)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # ended (not reaped: the group stays)
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    _pid, status = os.waitpid(pid, 0)
    with contextlib.suppress(OSError):  # (a daemon that stopped waiting closed its end)
        os.write(status_fd, status.to_bytes(4, "big"))
    os.close(status_fd)
    os.close(pidfd)


if __name__ == "__main__":
    main()
