"""The unix-socket guard: a sandbox connects to no pathname socket of the host's.

A unix socket in a dir bound from the host ($HOME under permissive, the project) is a host
server's: an ssh master connection, an editor's IPC, ~/.docker/run/docker.sock. The agent
answers every connect() of its commands itself (agent.c, `--guard-unix`) and passes only
those whose socket lies on a mount the sandbox made. These attack it with real sandboxes,
as root and as an ordinary user: a socket in $HOME and in the project, one made after the
sandbox started, reached by a symlink, through /proc/self/root, /proc/<pid>/cwd, a relative
path and an O_PATH fd of it; io_uring (whose connect is no syscall); an abstract socket of
the host's where permissive shares its network (the agent's Landlock scope); the agent
itself (pid 1, the commands' uid: its memory, ptrace); datagrams
sent with sendto()/sendmsg() to a host /dev/log-like socket in the project. And they
check that the sandbox's own sockets (in /tmp, /dev/shm, a copy-on-write project, kept
dirs, abstract ones, from a thread, datagrams passing an fd) and TCP still connect, and
that a connect() to a server of its own that never accepts stalls no other connect().
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox_helpers import (
    SYSTEM_PYTHON,
    backend_available,
    build_probe,
    container_project,
    container_run,
    probe_verdicts,
    public_pythonpath,
    run_quiet,
)
from test_containers import podman_user, rootless_run

__all__ = ["podman_user"]  # (a fixture: pytest finds it here)

pytestmark = pytest.mark.skipif(not backend_available("namespaces"), reason="needs bwrap")

# Inside: tries every target named on the command line, one line each. A late socket is
# waited for (the host makes it only after READY), so it surely postdates the start.
PROBE = r"""
import os, socket, sys, time
def attempt(label, path):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    try:
        s.connect(path)
        print(label, "CONNECTED", flush=True)
    except OSError as exc:
        print(label, "refused", type(exc).__name__, flush=True)
own = socket.socket(socket.AF_UNIX); own.bind("/tmp/own.sock"); own.listen(4)
attempt("own-tmp", "/tmp/own.sock")
attempt("own-proc-root", "/proc/self/root/tmp/own.sock")
import threading  # a thread's connect() (a resolver's): the caller is not the group leader
t = threading.Thread(target=attempt, args=("own-thread", "/tmp/own.sock")); t.start(); t.join()
abstract = socket.socket(socket.AF_UNIX); abstract.bind("\0ak-guard-own"); abstract.listen(4)
attempt("own-abstract", "\0ak-guard-own")
shm = socket.socket(socket.AF_UNIX); shm.bind("/dev/shm/own.sock"); shm.listen(4)
attempt("own-shm", "/dev/shm/own.sock")
def dgram(label, send):
    try:
        send(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        print(label, "CONNECTED", flush=True)
    except OSError as exc:
        print(label, "refused", type(exc).__name__, flush=True)
mine = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); mine.bind("/tmp/own-dgram.sock")
r, w = os.pipe()  # an fd passed along (SCM_RIGHTS): the guard passes the caller's file on
dgram("own-dgram", lambda d: d.sendmsg([b"fd"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                   w.to_bytes(4, sys.byteorder))], 0,
                                        "/tmp/own-dgram.sock"))
msg, anc, _, _ = mine.recvmsg(16, 64)
os.write(int.from_bytes(anc[0][2][:4], sys.byteorder), b"passed")
print("own-dgram-fd", "CONNECTED" if msg == b"fd" and os.read(r, 16) == b"passed" else "lost",
      flush=True)
tcp = socket.socket(); tcp.bind(("127.0.0.1", 0)); tcp.listen(4)
c = socket.create_connection(tcp.getsockname(), 5); print("own-tcp CONNECTED", flush=True)
os.symlink(sys.argv[1], "/tmp/link")
attempt("host-abstract", "\0" + sys.argv[2])
attempt("home", sys.argv[1])
attempt("home-symlink", "/tmp/link")
attempt("home-proc-root", "/proc/self/root" + sys.argv[1])
if os.path.exists(sys.argv[1]):  # moderate binds no $HOME
    attempt("home-proc-fd", f"/proc/self/fd/{os.open(sys.argv[1], os.O_PATH)}")
import ctypes  # io_uring's connect is no connect(2): no io_uring at all
ring = ctypes.CDLL(None, use_errno=True).syscall(425, 4, ctypes.create_string_buffer(120))
print("io-uring", "CONNECTED" if ring >= 0 else "refused", flush=True)
try:  # the agent (pid 1, our uid) is the guard: not ours to write or trace
    open("/proc/1/mem", "r+b"); print("agent-mem CONNECTED", flush=True)
except OSError as exc:
    print("agent-mem refused", type(exc).__name__, flush=True)
seize = ctypes.CDLL(None, use_errno=True).ptrace(0x4206, 1, 0, 0)  # PTRACE_SEIZE
print("agent-ptrace", "CONNECTED" if seize == 0 else "refused", flush=True)
os.chdir("/workspace")
attempt("project", "/workspace/host.sock")
attempt("project-relative", "host.sock")
attempt("project-proc-cwd", f"/proc/{os.getpid()}/cwd/host.sock")
dgram("dgram-sendto", lambda d: d.sendto(b"leak", "/workspace/log.sock"))
dgram("dgram-sendmsg", lambda d: d.sendmsg([b"leak"], [], 0, "log.sock"))
def sendmmsg(d):  # (no Python API: its own syscall, the guard's too)
    name = b"/workspace/log.sock"
    addr = ctypes.create_string_buffer(socket.AF_UNIX.to_bytes(2, sys.byteorder) + name + b"\0")
    data = ctypes.create_string_buffer(b"leak")
    iov = (ctypes.c_uint64 * 2)(ctypes.addressof(data), 4)
    msg = (ctypes.c_uint64 * 8)(ctypes.addressof(addr), len(name) + 3, ctypes.addressof(iov), 1)
    if ctypes.CDLL(None, use_errno=True).sendmmsg(d.fileno(), msg, 1, 0) != 1:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
dgram("dgram-sendmmsg", sendmmsg)
print("READY", flush=True)
for _ in range(200):
    if os.path.exists("/workspace/late.sock"):
        break
    time.sleep(0.05)
attempt("late", "/workspace/late.sock")
# A server of the sandbox's own that never accepts: its backlog full, a blocking connect()
# to it waits for ever; others (and TCP) go on.
stuck = socket.socket(socket.AF_UNIX); stuck.bind("/tmp/stuck.sock"); stuck.listen(0)
for _ in range(4):
    fill = socket.socket(socket.AF_UNIX); fill.setblocking(False)
    try:
        fill.connect("/tmp/stuck.sock")
    except BlockingIOError:
        break
def hang():
    socket.socket(socket.AF_UNIX).connect("/tmp/stuck.sock")
for _ in range(3):
    threading.Thread(target=hang, daemon=True).start()
time.sleep(0.5)
done = threading.Event()
def others():
    socket.socket(socket.AF_UNIX).connect("/tmp/own.sock")
    socket.create_connection(tcp.getsockname(), 5)
    done.set()
threading.Thread(target=others, daemon=True).start()
print("not-stalled", "CONNECTED" if done.wait(20) else "stalled", flush=True)
os._exit(0)  # (the hung threads' connect()s end with us)
"""

ATTACKS = ("io-uring", "agent-mem", "agent-ptrace", "host-abstract", "home", "home-symlink",
           "home-proc-root", "home-proc-fd", "project", "project-relative", "project-proc-cwd",
           "dgram-sendto", "dgram-sendmsg", "dgram-sendmmsg", "late", "host-log")
OWN = ("own-tmp", "own-proc-root", "own-thread", "own-abstract", "own-shm", "own-dgram",
       "own-dgram-fd", "own-tcp", "not-stalled")


def _listen(path: Path, uid: int | None) -> socket.socket:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    path.chmod(0o600)
    if uid is not None:
        os.chown(path, uid, uid)
    srv.listen(8)
    return srv


def _attack(root: Path, argv_prefix: list[str], env: dict[str, str], uid: int | None,
            profile: str, backend: str = "namespaces") -> dict[str, str]:
    """Runs PROBE in a sandbox of `profile` over `root`'s project and home; its verdicts."""
    home, project = root / "home", root / "project"
    servers = [_listen(home / ".ssh" / "cm-root@server:22", uid),
               _listen(project / "host.sock", uid)]
    # permissive shares the host's network namespace, and with it its abstract sockets
    abstract = f"ak-guard-host-{os.getpid()}-{profile}"
    servers.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    servers[-1].bind("\0" + abstract)
    servers[-1].listen(8)
    log = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # a /dev/log of the host's
    log.bind(str(project / "log.sock"))
    if uid is not None:
        os.chown(project / "log.sock", uid, uid)
    log.setblocking(False)
    servers.append(log)
    proc = subprocess.Popen(
        [*argv_prefix, "run", "-q", "--backend", backend, "--profile", profile, "--",
         "python3", "-c", PROBE, "/home/user/.ssh/cm-root@server:22", abstract],
        cwd=project, env={**env, "HOME": str(home)}, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.strip())
            if line.strip() == "READY":
                servers.append(_listen(project / "late.sock", uid))
        _, err = proc.communicate(timeout=120)
        try:
            lines.append(f"host-log CONNECTED {log.recv(64)!r}")
        except BlockingIOError:
            lines.append("host-log refused")
    finally:
        proc.kill()
        for s in servers:
            s.close()
    verdicts = {ln.split()[0]: ln.split()[1] for ln in lines if len(ln.split()) >= 2}
    assert proc.returncode == 0 and "late" in verdicts, (lines, err)
    return verdicts


def _layout(root: Path, uid: int | None) -> None:
    (root / "home" / ".ssh").mkdir(parents=True)
    (root / "project").mkdir()
    if uid is not None:
        for p in (root, root / "home", root / "home" / ".ssh", root / "project"):
            os.chown(p, uid, uid)


@pytest.mark.skipif(os.geteuid() != 0, reason="a root-started sandbox")
@pytest.mark.parametrize("profile", ["permissive", "moderate"])
def test_no_host_socket_is_reached_and_own_sockets_are(tmp_path: Path, profile: str) -> None:
    _layout(tmp_path, None)
    env = {**os.environ, "AGENTKERNEL_NO_DAEMON": "1"}
    verdicts = _attack(tmp_path, [sys.executable, "-P", "-m", "agentkernel"], env, None,
                       profile)
    attacks = ATTACKS if profile == "permissive" else tuple(  # moderate binds no $HOME
        a for a in ATTACKS if not a.startswith("home"))
    assert {a: verdicts.get(a) for a in attacks} == dict.fromkeys(attacks, "refused"), verdicts
    assert {o: verdicts.get(o) for o in OWN} == dict.fromkeys(OWN, "CONNECTED"), verdicts


@pytest.mark.skipif(os.geteuid() != 0 or not backend_available("gvisor"),
                    reason="a root-started gVisor sandbox")
def test_gvisor_reaches_no_host_socket(tmp_path: Path) -> None:
    """gVisor has no guard: its gofer opens no host socket (runsc gets no --host-uds=open).
    io_uring is gVisor's own there, and an O_PATH fd of a socket it may not give."""
    _layout(tmp_path, None)
    env = {**os.environ, "AGENTKERNEL_NO_DAEMON": "1"}
    verdicts = _attack(tmp_path, [sys.executable, "-P", "-m", "agentkernel"], env, None,
                       "permissive", "gvisor")
    attacks = [a for a in ATTACKS if a not in ("io-uring", "home-proc-fd")]
    assert {a: verdicts.get(a) for a in attacks} == dict.fromkeys(attacks, "refused"), verdicts
    assert verdicts.get("home-proc-fd") in (None, "refused"), verdicts
    assert {o: verdicts.get(o) for o in OWN} == dict.fromkeys(OWN, "CONNECTED"), verdicts


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root (to become nobody) and setpriv")
def test_an_ordinary_users_sandbox_reaches_none_of_its_sockets() -> None:
    """Same uid as the socket's owner: a same-uid check passes, the guard must not."""
    nobody = pwd.getpwnam("nobody").pw_uid
    root = Path(tempfile.mkdtemp(prefix="ak-guard-"))
    try:
        root.chmod(0o755)
        _layout(root, nobody)
        for sub in ("run", "data"):
            (root / sub).mkdir(mode=0o700)
            os.chown(root / sub, nobody, nobody)
        env = {k: os.environ[k] for k in ("PATH", "LANG") if k in os.environ}
        env.update(AGENTKERNEL_HOME=str(root / "data"), AGENTKERNEL_RUNTIME_DIR=str(root / "run"),
                   AGENTKERNEL_NO_DAEMON="1", PYTHONPATH=public_pythonpath())
        setpriv = ["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups", "--"]
        verdicts = _attack(root, [*setpriv, SYSTEM_PYTHON, "-m", "agentkernel"], env, nobody,
                           "permissive")
        assert {a: verdicts.get(a) for a in ATTACKS} == dict.fromkeys(ATTACKS, "refused"), verdicts
        assert {o: verdicts.get(o) for o in OWN} == dict.fromkeys(OWN, "CONNECTED"), verdicts
    finally:
        shutil.rmtree(root, ignore_errors=True)


# The guard's workers: a caller killed while its connect() waited frees its worker (the
# agent interrupts it); past 16 waiting in workers and 64 queued, a call fails at once.
BOUNDED = r"""
import os, signal, socket, threading, time
stuck = socket.socket(socket.AF_UNIX); stuck.bind("/tmp/stuck.sock"); stuck.listen(0)
while True:  # its backlog full: every blocking connect() to it waits
    fill = socket.socket(socket.AF_UNIX); fill.setblocking(False)
    try:
        fill.connect("/tmp/stuck.sock")
    except BlockingIOError:
        break
tcp = socket.socket(); tcp.bind(("127.0.0.1", 0)); tcp.listen(128)
pid = os.fork()
if pid == 0:
    for _ in range(20):  # every worker, and some of the queue
        threading.Thread(target=socket.socket(socket.AF_UNIX).connect, args=("/tmp/stuck.sock",),
                         daemon=True).start()
    time.sleep(60)
    os._exit(0)
time.sleep(1)
os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0)
done = threading.Event()  # a blocking TCP connect() is always a worker's
threading.Thread(target=lambda: (socket.create_connection(tcp.getsockname()), done.set()),
                 daemon=True).start()
print("freed", "yes" if done.wait(20) else "no", flush=True)
# The TCP connect needs one freed worker; the killed caller's others are let go on the
# guard's next looks (every 250 ms; a signal that lands just before a worker's call is only
# seen on the next): give them those looks before counting places.
time.sleep(3)
results = []
def hang():
    try:
        socket.socket(socket.AF_UNIX).connect("/tmp/stuck.sock"); results.append("connected")
    except OSError as exc:
        results.append(type(exc).__name__)
for _ in range(100):
    threading.Thread(target=hang, daemon=True).start()
# At least 100 - 16 - 64 are refused at once, however slowly the threads get to their calls
# on a loaded machine; then until no more answers come (a place held a moment longer).
deadline = time.time() + 60
while len(results) < 100 - 16 - 64 and time.time() < deadline:
    time.sleep(0.05)
seen = -1
while len(results) != seen and time.time() < deadline:
    seen = len(results)
    time.sleep(1)
print("past-bound", results.count("BlockingIOError"), len(results), flush=True)
os._exit(0)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a root-started sandbox")
def test_waiting_calls_are_bounded_and_a_killed_callers_are_let_go(tmp_path: Path) -> None:
    r = run_quiet(tmp_path, "--backend", "namespaces", "--profile", "permissive", "--no-network",
                  "--", "python3", "-c", BOUNDED, timeout=120)
    lines = {ln.split()[0]: ln.split()[1:] for ln in r.stdout.splitlines() if ln.split()}
    assert lines.get("freed") == ["yes"], r
    refused, ended = (int(x) for x in lines["past-bound"])
    # 100 callers: 16 wait in workers, 64 in the queue, the rest are refused (EAGAIN) at
    # once. A place may still be held a moment by an earlier call on its way out (a CI run
    # saw 21; one that counted at once after the first freed worker saw 33); the killed
    # caller's 20 still held would make it 40.
    assert refused == ended and 100 - 16 - 64 <= refused <= 100 - 16 - 64 + 4, r


@pytest.fixture
def cow_project(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "p").mkdir()
    yield tmp_path / "p"


@pytest.mark.skipif(os.geteuid() != 0, reason="a root-started sandbox")
def test_a_socket_made_in_a_copy_on_write_project_connects(cow_project: Path) -> None:
    """The positive control on an overlay: the sandbox's own socket in /workspace."""
    script = ("import socket; s = socket.socket(socket.AF_UNIX); s.bind('/workspace/w.sock');"
              " s.listen(1); c = socket.socket(socket.AF_UNIX); c.connect('w.sock');"
              " print('CONNECTED')")
    r = run_quiet(cow_project, "--backend", "namespaces", "--profile", "moderate", "--", "python3",
                  "-c", script, timeout=120)
    assert r.returncode == 0 and "CONNECTED" in r.stdout, r


def test_doctor_tells_what_the_guard_covers_here() -> None:
    from agentkernel.doctor import landlock_abi, unix_guard_check

    check = unix_guard_check()
    assert check.ok and "namespaces" in check.detail, check
    assert ("NOT scoped" in check.detail) == (landlock_abi() < 6), check


@pytest.mark.skipif(os.geteuid() != 0, reason="a root-started sandbox")
def test_a_kept_sandbox_connects_to_its_own_sockets_in_its_kept_dirs(tmp_path: Path) -> None:
    """A kept sandbox's /tmp and /root are host dirs of its own (tmux, language servers)."""
    name = f"guard-{os.getpid()}"
    env = {**os.environ, "AGENTKERNEL_NO_DAEMON": "1"}
    cli = [sys.executable, "-P", "-m", "agentkernel"]
    script = ("import socket\nfor p in ('/tmp/k.sock', '/root/r.sock'):\n"
              "    s = socket.socket(socket.AF_UNIX); s.bind(p); s.listen(1)\n"
              "    c = socket.socket(socket.AF_UNIX); c.connect(p); print(p, 'CONNECTED')\n")
    subprocess.run([*cli, "create", name, "--backend", "namespaces", "--profile", "moderate"],
                   cwd=tmp_path, env=env, check=True, capture_output=True, timeout=120)
    try:
        r = subprocess.run([*cli, "exec", name, "--", "python3", "-c", script], env=env,
                           capture_output=True, text=True, timeout=120, check=False)
        assert r.stdout.count("CONNECTED") == 2, r
    finally:
        subprocess.run([*cli, "rm", name], env=env, capture_output=True, timeout=120, check=False)


# --- docker and podman: the same guard, under a seccomp profile of ours ------------------------
# The test image is busybox: a static probe of ours does the connect()s and sends.
PROBE_C = r"""
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
int main(int argc, char **argv)
{
	for (int i = 1; i < argc; i++) {
		char *how = argv[i], *path = strchr(how, ':');
		*path++ = 0;
		struct sockaddr_un su = { .sun_family = AF_UNIX };
		strncpy(su.sun_path, path, sizeof(su.sun_path) - 1);
		int ok, s = socket(AF_UNIX, strcmp(how, "sendto") ? SOCK_STREAM : SOCK_DGRAM, 0);
		if (!strcmp(how, "own")) {
			int l = socket(AF_UNIX, SOCK_STREAM, 0);
			unlink(path);
			bind(l, (struct sockaddr *)&su, sizeof(su));
			listen(l, 4);
		}
		if (!strcmp(how, "sendto"))
			ok = sendto(s, "leak", 4, 0, (struct sockaddr *)&su, sizeof(su)) == 4;
		else
			ok = connect(s, (struct sockaddr *)&su, sizeof(su)) == 0;
		printf("%s:%s %s %s\n", how, path, ok ? "CONNECTED" : "refused", ok ? "" : strerror(errno));
	}
	return 0;
}
"""
CONTAINER_CHECKS = {"connect:/workspace/host.sock": "refused",
                    "sendto:/workspace/log.sock": "refused",
                    "own:/tmp/own.sock": "CONNECTED", "own:/dev/shm/own.sock": "CONNECTED"}


def _container_attack(project: Path, uid: int | None, run: Any,
                      checks: dict[str, str] = CONTAINER_CHECKS) -> dict[str, str]:
    """Builds the probe into `project`, puts a host stream server and a /dev/log-like
    datagram socket there, runs the probe through `run(argv)`; the verdicts, with
    what the host's datagram socket got."""
    build_probe(project, PROBE_C, uid)
    srv = _listen(project / "host.sock", uid)
    log = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    log.bind(str(project / "log.sock"))
    log.setblocking(False)
    if uid is not None:
        os.chown(project / "log.sock", uid, uid)
    try:
        r = run(["/workspace/probe", *checks])
        verdicts = probe_verdicts(r.stdout)
        assert set(verdicts) == set(checks), r
        try:
            verdicts["host-log"] = f"CONNECTED {log.recv(64)!r}"
        except BlockingIOError:
            verdicts["host-log"] = "refused"
        return verdicts
    finally:
        srv.close()
        log.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="a root-started container")
@pytest.mark.parametrize("profile", ["permissive", "moderate"])
@pytest.mark.parametrize("engine", ["docker", "podman"])
def test_containers_reach_no_host_socket_in_the_project(
        engine: str, profile: str, tmp_path: Path, request: pytest.FixtureRequest,
        busybox_tar: tuple[Path, str]) -> None:
    """The project bound (permissive) and copy-on-write (moderate: the sandbox's own
    socket there connects, the host's in its lower layer does not)."""
    image, project = container_project(request, engine, busybox_tar, tmp_path)

    def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return container_run(engine, image, profile, project, argv)

    checks = {**CONTAINER_CHECKS, **({"own:/workspace/w.sock": "CONNECTED"}
                                     if profile == "moderate" else {})}
    verdicts = _container_attack(project, None, run, checks)
    assert verdicts == {**checks, "host-log": "refused"}, verdicts


def test_rootless_podman_reaches_no_host_socket_in_the_project(
        podman_user: tuple[int, dict[str, str], Path]) -> None:
    """As an ordinary user (rootless Podman): the sockets are theirs, the guard still says no."""
    uid, _, base = podman_user
    run = functools.partial(rootless_run, podman_user, "permissive")
    verdicts = _container_attack(base / "proj", uid, run)
    assert verdicts == {**CONTAINER_CHECKS, "host-log": "refused"}, verdicts


# Hostile lengths, through ctypes (Python's own API checks them first): an address of all
# 128 bytes of a sockaddr_storage with no NUL (the guard copied its path into a 109-byte
# buffer), and control messages whose cmsg_len is below a header or past the buffer (the
# guard counted fds from it). The kernel answers each EINVAL; so must the guard, and
# then still answer (it is pid 1: its death would end the sandbox).
HOSTILE = r"""
import ctypes, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
def report(label, rc):
    print(label, "ok" if rc >= 0 else os.strerror(ctypes.get_errno()).replace(" ", "-"),
          flush=True)
def unix_addr(name, size):
    return ctypes.create_string_buffer(socket.AF_UNIX.to_bytes(2, sys.byteorder) + name, size)
long_addr = unix_addr(b"a" * 126, 128)  # (create_string_buffer: exactly 128, no NUL)
s = socket.socket(socket.AF_UNIX)
report("connect-128", libc.connect(s.fileno(), long_addr, 128))
d = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
report("sendto-128", libc.sendto(d.fileno(), b"x", 1, 0, long_addr, 128))
data = ctypes.create_string_buffer(b"x")
iov = (ctypes.c_uint64 * 2)(ctypes.addressof(data), 1)
def sendmsg(label, addr, alen, ctl=None, ctllen=0):
    msg = (ctypes.c_uint64 * 7)(ctypes.addressof(addr), alen, ctypes.addressof(iov), 1,
                                ctypes.addressof(ctl) if ctl is not None else 0, ctllen, 0)
    report(label, libc.sendmsg(d.fileno(), msg, 0))
sendmsg("sendmsg-200", long_addr, 200)  # (the kernel cuts msg_namelen to 128)
mine = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); mine.bind("/tmp/hostile.sock")
own = unix_addr(b"/tmp/hostile.sock\0", 20)
r, w = os.pipe()
for label, clen in (("cmsg-0", 0), ("cmsg-8", 8), ("cmsg-huge", 1 << 40),
                    ("cmsg-max", (1 << 64) - 1), ("cmsg-25", 25)):
    ctl = (ctypes.c_uint64 * 3)(clen, socket.SOL_SOCKET | (socket.SCM_RIGHTS << 32),
                                w | (w << 32))
    sendmsg(label, own, 20, ctl, 24)
# afterwards: the guard still answers, and a well-formed fd still passes
ctl = (ctypes.c_uint64 * 3)(20, socket.SOL_SOCKET | (socket.SCM_RIGHTS << 32), w)
sendmsg("cmsg-good", own, 20, ctl, 24)
mine.setblocking(False)
got = []
while True:
    try:
        got.append(mine.recvmsg(16, 64))
    except BlockingIOError:
        break
passed = [a for _, anc, _, _ in got for a in anc]
if len(got) == 1 and len(passed) == 1:
    os.write(int.from_bytes(passed[0][2][:4], sys.byteorder), b"passed")
print("received", len(got), "ok" if len(got) == 1 and os.read(r, 16) == b"passed" else "lost",
      flush=True)
srv = socket.socket(socket.AF_UNIX); srv.bind("/tmp/after.sock"); srv.listen(1)
socket.socket(socket.AF_UNIX).connect("/tmp/after.sock")
print("after ok", flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a root-started sandbox")
def test_hostile_lengths_are_refused_and_the_guard_lives_on(tmp_path: Path) -> None:
    r = run_quiet(tmp_path, "--backend", "namespaces", "--profile", "moderate", "--", "python3",
                  "-c", HOSTILE, timeout=120)
    got = probe_verdicts(r.stdout)
    einval = ("connect-128", "sendto-128", "sendmsg-200", "cmsg-0", "cmsg-8", "cmsg-huge",
              "cmsg-max", "cmsg-25")
    assert {k: got.get(k) for k in einval} == dict.fromkeys(einval, "Invalid-argument"), r
    assert got.get("cmsg-good") == "ok" and got.get("after") == "ok", r
    assert r.stdout.split("received ")[1].split()[:2] == ["1", "ok"], r
    assert r.returncode == 0, r


# The guard's main thread never waits. A socket the guard saw non-blocking may be made
# blocking by another thread before the call is performed: here a process flips each
# socket's O_NONBLOCK while another connect()s it to a TCP server of the sandbox's that
# drops every SYN (its backlog full), where a blocking connect() waits for minutes. Had
# the main thread performed one such as blocking, every guarded call after it would
# wait too (measured: the agent before this stalled here). And a blocking stream send
# is tried at once, then finished by a worker where
# it went in part: every byte arrives once, in order, and each send says all its bytes.
NEVER_WAITS = r"""
import fcntl, os, socket, threading, time
# first the stream sends (the connect()s below hold every worker for minutes)
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
c = socket.create_connection(srv.getsockname(), 10); peer, _ = srv.accept()
got = bytearray()
def read():
    time.sleep(0.5)  # the sender's buffer fills first: its sends go in part
    while len(got) < 8 * 1024 * 1024:
        b = peer.recv(1 << 16)
        if not b:
            break
        got.extend(b)
t = threading.Thread(target=read); t.start()
blob = os.urandom(8 * 1024 * 1024)
sent, counts = 0, []
while sent < len(blob):  # sendto with an address: the guard's (TCP ignores the address)
    n = c.sendto(blob[sent:sent + 1024 * 1024], srv.getsockname())
    counts.append(n); sent += n
t.join(30)
print("stream", "whole" if bytes(got) == blob else "torn", flush=True)
print("counts", "full" if all(n == 256 * 1024 for n in counts) else counts, flush=True)
tcp = socket.socket(); tcp.bind(("127.0.0.1", 0)); tcp.listen(0)
addr = tcp.getsockname()
while True:  # its accept queue full: later SYNs are dropped
    fill = socket.socket(); fill.setblocking(False)
    try:
        fill.connect(addr)
    except BlockingIOError:
        time.sleep(0.2)
        probe = socket.socket(); probe.settimeout(0.5)
        try:
            probe.connect(addr)
        except (TimeoutError, socket.timeout):
            break
answers = []
def attempt():
    s = socket.socket(); s.setblocking(False)
    stop = time.monotonic() + 0.3
    # (a process of its own, sharing the open file: it flips while we wait, GIL or not)
    if os.fork() == 0:
        fl = fcntl.fcntl(s, fcntl.F_GETFL)
        while time.monotonic() < stop:
            fcntl.fcntl(s, fcntl.F_SETFL, fl & ~os.O_NONBLOCK)
            fcntl.fcntl(s, fcntl.F_SETFL, fl | os.O_NONBLOCK)
        os._exit(0)
    time.sleep(0.02)
    try:
        s.connect(addr); answers.append("connected")
    except OSError as exc:
        answers.append(type(exc).__name__)
for _ in range(60):  # (those that wait do so in workers: 16, and 64 queued)
    threading.Thread(target=attempt, daemon=True).start()
    time.sleep(0.05)
time.sleep(1)
# (a datagram send: the main thread's own, as the workers may all be held by now by
# connect()s that wait, of this caller's own making)
own = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); own.bind("/tmp/own.sock")
done = threading.Event()
def others():
    for _ in range(5):
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"x", "/tmp/own.sock")
    done.set()
threading.Thread(target=others, daemon=True).start()
print("not-stalled", "yes" if done.wait(30) else "no", flush=True)
print("answers", len(answers), flush=True)
os._exit(0)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a root-started sandbox")
def test_the_guards_main_thread_never_waits_and_stream_sends_are_whole(tmp_path: Path) -> None:
    r = run_quiet(tmp_path, "--backend", "namespaces", "--profile", "moderate", "--no-network",
                  "--", "python3", "-c", NEVER_WAITS)
    got = {ln.split()[0]: ln.split(None, 1)[1] for ln in r.stdout.splitlines()
           if len(ln.split()) > 1}
    assert got.get("not-stalled") == "yes", r
    assert got.get("stream") == "whole" and got.get("counts") == "full", r
    assert r.returncode == 0, r
