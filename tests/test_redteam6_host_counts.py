"""Red team, round 6: one sandbox cannot take a host-wide kernel count that no cgroup bounds.

Native AIO: `io_setup(n)` adds n to the host's `fs.aio-nr`, one count for every process of
every namespace, checked against `fs.aio-max-nr` (65536 by default) and charged to no
cgroup, user or namespace. One `io_setup(65536)` from any sandbox (namespaces, docker,
podman; any profile; as root or as an ordinary user) took them all: while it held the
context, every other `io_setup` on the host (a database's native AIO, `fio`, a VM's
`aio=native` disk) failed with EAGAIN. Now `io_setup` fails with ENOSYS in every profile
(`seccomp.ABSENT`: as on a kernel without AIO, which libaio's users fall back from);
glibc's POSIX aio uses threads, not it.

JIT memory for classic BPF: every socket filter and seccomp filter is JIT-compiled into
memory the kernel counts host-wide (`net.core.bpf_jit_limit`, 504 MiB here) and charges
to no cgroup; past the limit a process without CAP_BPF in the host's user namespace gets
no new filter (this kernel has `BPF_JIT_ALWAYS_ON`: no interpreter to fall back to) — not
bwrap's nor our agent's seccomp filter, so no new sandbox starts, nor any other
unprivileged program's seccomp sandbox. A restrictive sandbox (256 MiB) held 200 MiB of it
with 4000 `SO_ATTACH_FILTER`s of 4096 instructions, and gave it back when it ended. Now
the seccomp filter refuses `SO_ATTACH_FILTER` and `SO_ATTACH_REUSEPORT_CBPF`
(`ak-seccomp --block-socket-filters`). Open: a command's own seccomp filters (each thread
may stack 32768 instructions, ~400 KiB of JIT) — a moderate sandbox held 70 MiB with 200
threads, a permissive one (4096 pids) can hold the whole limit.

Open files: `fs.file-max` (2471007 here: a tenth of RAM in KiB, where no systemd raised
it) is one count for the host; past it every open, socket or pipe of every process
without CAP_SYS_ADMIN fails with ENFILE. A file costs its opener's memory cgroup ~260
bytes, so a sandbox whose memory cap is over ~2.5% of the host's RAM can take all of it:
a restrictive sandbox held 310000 (an eighth) in 16 processes; moderate's and
permissive's caps hold the rest. Open (strict xfail): nothing of ours bounds a sandbox's
files below `RLIMIT_NOFILE` times its pids cap (and each process's mapped files past
that); where systemd set `fs.file-max` to LONG_MAX there is no such count.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_helpers import backend_available, give_top, shared_top, top_run

NOBODY = 65534
AIO_MAX = Path("/proc/sys/fs/aio-max-nr")

# A quarter of the host's share is far more than any sandbox's fair part, and far enough
# from all of it that other users of the machine never meet EAGAIN while this runs.
TAKE_AIO = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
ctx = ctypes.c_ulong(0)
nr = {"x86_64": 206, "aarch64": 0}[__import__("os").uname().machine]
r = libc.syscall(nr, int(sys.argv[1]), ctypes.byref(ctx))
print("io_setup", r, ctypes.get_errno(), flush=True)
"""


BPF_JIT_LIMIT = Path("/proc/sys/net/core/bpf_jit_limit")
FILTER_JIT = 48 * 1024  # measured: ~50 KiB of JIT per filter of 4096 `add` instructions
PER_THREAD = 7  # 4096-instruction seccomp filters in one thread's chain (32768 at most)

CBPF = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
class SF(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint)]
class FP(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SF))]
N = 4096  # BPF_MAXINSNS: `A += 1` 4095 times, then accept
insns = (SF * N)(*([SF(0x04, 0, 0, 1)] * (N - 1) + [SF(0x06, 0, 0, 0x7fff0000)]))
prog = FP(N, insns)
"""

# Socket filters until `want` are held or one is refused; holds them while it reports.
SOCKET_FILTERS = CBPF + """
import resource, socket, sys
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held, err = [], 0
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if libc.setsockopt(s.fileno(), 1, 26, ctypes.byref(prog), ctypes.sizeof(prog)) != 0:
        err = ctypes.get_errno()
        break
    held.append(s)
print("filters", len(held), err, flush=True)
"""

# Seccomp filters stacked by `threads` threads, PER_THREAD each (prctl acts on the calling
# thread alone), all held until every thread has reported.
SECCOMP_FILTERS = CBPF + f"""
import sys, threading
done, hold, lock = [], threading.Event(), threading.Lock()
def stack():
    n = 0
    while n < {PER_THREAD} and libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0:
        n += 1
    with lock:
        done.append(n)
    hold.wait()
started = []
for _ in range(int(sys.argv[1])):
    t = threading.Thread(target=stack, daemon=True)
    try:
        t.start()
    except RuntimeError:
        break
    started.append(t)
while True:
    with lock:
        if len(done) == len(started):
            break
    threading.Event().wait(0.05)
print("filters", sum(done), 0, flush=True)
"""

FILE_MAX = Path("/proc/sys/fs/file-max")
HOST_FILES = """
import os, resource, sys
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
want, per = int(sys.argv[1]), hard - 16
r, w = os.pipe()
hold_r, hold_w = os.pipe()  # the children hold their files till this ends (our exit)
kids, asked = 0, 0
while asked < want:  # processes holding `per` open files each, until `want` are held
    n = min(per, want - asked)
    if os.fork() == 0:
        fds = []
        try:
            while len(fds) < n:
                fds.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        os.close(hold_w)
        os.write(w, len(fds).to_bytes(4, "big"))
        os.read(hold_r, 1)  # all held at once: we report while every child waits here
        os._exit(0)
    kids, asked = kids + 1, asked + n
print("files", sum(int.from_bytes(os.read(r, 4), "big") for _ in range(kids)), flush=True)
"""


@pytest.fixture
def top() -> Iterator[Path]:
    with shared_top("ak-rt6-counts-") as path:
        yield path


def _needs(backend: str, user: int, top: Path, request: pytest.FixtureRequest) -> None:
    if os.geteuid() != 0 or not backend_available(backend):
        pytest.skip(f"needs root and {backend}")
    if backend == "docker" and request.getfixturevalue("dockerd") == "root":
        pytest.skip("this machine's dockerd runs without userns-remap: refused")
    if not AIO_MAX.exists():
        pytest.skip("no native AIO in this kernel")
    give_top(top, user)


@pytest.mark.parametrize(("backend", "user", "profile"), [
    ("namespaces", 0, "restrictive"), ("namespaces", 0, "permissive"),
    ("namespaces", NOBODY, "moderate"), ("docker", 0, "restrictive"),
    ("podman", 0, "moderate"),
], ids=["ns-root-restrictive", "ns-root-permissive", "ns-nobody-moderate", "docker", "podman"])
def test_a_sandbox_cannot_take_the_hosts_native_aio(top: Path, backend: str, user: int,
                                                     profile: str,
                                                     request: pytest.FixtureRequest) -> None:
    _needs(backend, user, top, request)
    quarter = int(AIO_MAX.read_text()) // 4
    r = top_run(top, user, backend, profile, TAKE_AIO, str(quarter))
    line = next((x for x in r.stdout.splitlines() if x.startswith("io_setup")), "")
    assert line, (r.stdout, r.stderr)
    # 0: the context was made, a quarter of the whole host's native AIO for one sandbox.
    assert line.split()[1] != "0", line


def _eighth_of_jit() -> int:
    """Filters worth an eighth of the host's JIT limit: far more than a sandbox's part, far
    enough from all of it that nothing else on the machine is refused while this runs."""
    if not BPF_JIT_LIMIT.exists():
        pytest.skip("no BPF JIT in this kernel")
    return int(BPF_JIT_LIMIT.read_text()) // 8 // FILTER_JIT + 1


def _filters_held(r: subprocess.CompletedProcess[str]) -> int:
    line = next((x for x in r.stdout.splitlines() if x.startswith("filters")), "")
    assert line, (r.stdout, r.stderr)
    return int(line.split()[1])


@pytest.mark.parametrize(("backend", "user", "profile"), [
    ("namespaces", 0, "restrictive"), ("namespaces", NOBODY, "moderate"),
    ("docker", 0, "moderate"), ("podman", 0, "restrictive"),
], ids=["ns-root-restrictive", "ns-nobody-moderate", "docker", "podman"])
def test_a_sandbox_cannot_take_the_hosts_bpf_jit_by_socket_filters(
        top: Path, backend: str, user: int, profile: str,
        request: pytest.FixtureRequest) -> None:
    _needs(backend, user, top, request)
    want = _eighth_of_jit()
    r = top_run(top, user, backend, profile, SOCKET_FILTERS, str(want))
    assert _filters_held(r) < want, r.stdout


@pytest.mark.xfail(strict=True, reason="open: a command's own seccomp filters are JIT-compiled "
                   "against the host-wide bpf_jit_limit, bounded only by its pids cap")
def test_a_sandbox_cannot_take_the_hosts_bpf_jit_by_seccomp_filters(
        top: Path, request: pytest.FixtureRequest) -> None:
    _needs("namespaces", 0, top, request)
    want = _eighth_of_jit()
    threads = -(-want // PER_THREAD)
    r = top_run(top, 0, "namespaces", "moderate", SECCOMP_FILTERS, str(threads))
    assert _filters_held(r) < want, r.stdout


@pytest.mark.xfail(strict=True, reason="open: a sandbox's open files are bounded by its memory "
                   "cgroup only, and fs.file-max is one count for the whole host")
def test_a_sandbox_cannot_take_the_hosts_open_files(top: Path,
                                                    request: pytest.FixtureRequest) -> None:
    _needs("namespaces", 0, top, request)
    import resource

    file_max = int(FILE_MAX.read_text())
    if file_max >= 1 << 62:
        pytest.skip("fs.file-max is unbounded here (systemd's LONG_MAX): no host-wide count")
    want = file_max // 8
    per = resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 16
    if per <= 0 or -(-want // per) > 100:  # restrictive's pids cap is 128
        pytest.skip("RLIMIT_NOFILE too low here to hold an eighth of fs.file-max in 100 processes")
    r = top_run(top, 0, "namespaces", "restrictive", HOST_FILES, str(want))
    line = next((x for x in r.stdout.splitlines() if x.startswith("files")), "")
    assert line, (r.stdout, r.stderr)
    assert int(line.split()[1]) < want, line
