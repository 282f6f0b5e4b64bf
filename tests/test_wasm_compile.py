"""The wasm backend's compiler child, attacked: a module that needs too much memory or CPU
to compile is refused with a clear message (in-process, through a daemon whose resident
memory stays put, and as an ordinary user), and the child has no root, capability, file
or network. The costly modules are built here (tests/wasm_modules.py big_function)."""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_helpers import Result, ak, ak_as_user
from wasm_modules import big_function, write_modules

pytest.importorskip("wasmtime")

NOBODY = 65534
MEMORY_MB = 160  # hello compiles within it (~35 MB); a 1 MiB function needs ~130 MB more
MEMORY_REFUSED = f"compiling it needed more than {MEMORY_MB} MiB of memory"
CPU_REFUSED = "compiling it needed more than 1 s of CPU time"


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="ak-wasmc-", dir="/tmp"))
    top.chmod(0o755)
    (top / "run").mkdir(mode=0o700)
    proj = top / "proj"
    proj.mkdir(mode=0o755)
    write_modules(proj)
    (proj / "big.wasm").write_bytes(big_function(1 << 20))
    (proj / "slow.wasm").write_bytes(big_function(3 << 20))
    try:
        yield top
    finally:
        subprocess.run(["rm", "-rf", str(top)], check=False)


def _env(root: Path, **extra: str) -> dict[str, str]:
    return {"AGENTKERNEL_HOME": str(root / "home"), "AGENTKERNEL_RUNTIME_DIR": str(root / "run"),
            "AGENTKERNEL_DAEMON_AUTOSTART": "0", **extra}


def _run(root: Path, *args: str, **extra: str) -> Result:
    return ak("run", *args, cwd=root / "proj", env=_env(root, **extra), timeout=90)


def test_memory_and_cpu_bounds_refuse_in_process(root: Path) -> None:
    bounded = {"AGENTKERNEL_NO_DAEMON": "1", "AGENTKERNEL_WASM_COMPILE_MEMORY_MB": str(MEMORY_MB)}
    r = _run(root, "big.wasm", **bounded)
    assert r.returncode == 126 and MEMORY_REFUSED in r.stderr, r.stderr
    r = _run(root, "hello.wat", "x", **bounded)  # the bound leaves room for a module
    assert (r.returncode, r.stdout) == (0, "hello\nx\0"), r.stderr
    r = _run(root, "slow.wasm", AGENTKERNEL_NO_DAEMON="1",
             AGENTKERNEL_WASM_COMPILE_CPU_SECONDS="1")
    assert r.returncode == 126 and CPU_REFUSED in r.stderr, r.stderr
    cache = root / "home" / "wasm-cache"
    assert len(list(cache.glob("*.cwasm"))) == 1  # hello's alone: nothing refused is kept


def _status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _compilers(daemon: int) -> list[int]:
    """The daemon's compiler processes: its fork server and the children that server
    forked (its spare, or one at work), or children it started itself."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if b"wasm_compile.py" in argv:
            parents[int(entry)] = int(stat[1])
    return [pid for pid, ppid in parents.items()
            if ppid == daemon or parents.get(ppid) == daemon]


def _waiting(pid: int) -> bool:
    """Blocked reading its stdin: a compiler child waiting for its module."""
    try:
        return Path(f"/proc/{pid}/syscall").read_text().startswith("0 0x0 ")  # read(0, ...)
    except OSError:
        return False


def _spare(daemon: int) -> int:
    """The daemon's compiler child started ahead, once it waits for its module (blocked
    reading its stdin: every bound and confinement in place by then)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for pid in _compilers(daemon):
            if _waiting(pid):
                return pid
        time.sleep(0.1)
    raise AssertionError("no compiler child waits for a module")


def test_daemon_stays_bounded_and_its_compiler_is_confined(root: Path) -> None:
    env = _env(root, AGENTKERNEL_WASM_COMPILE_MEMORY_MB=str(MEMORY_MB))
    r = ak("daemon", "start", env=env)
    assert r.returncode == 0, r.stderr
    try:
        daemon = int((root / "run" / "daemon.pid").read_text().split()[0])
        r = _run(root, "hello.wat", "y", AGENTKERNEL_WASM_COMPILE_MEMORY_MB=str(MEMORY_MB))
        assert (r.returncode, r.stdout) == (0, "hello\ny\0"), r.stderr
        before = int(_status(daemon)["VmHWM"].split()[0])
        for _ in range(2):  # the second time it is refused without compiling again
            r = _run(root, "big.wasm")
            assert r.returncode == 126 and MEMORY_REFUSED in r.stderr, r.stderr
        # Compiled in the daemon, this module took ~130 MB more; in a child, nothing.
        grown = int(_status(daemon)["VmHWM"].split()[0]) - before
        assert grown < 40 * 1024, f"the daemon's peak resident memory grew {grown} KiB"
        assert "wasmtime" not in Path(f"/proc/{daemon}/maps").read_text()
        r = _run(root, "hello.wat", "z")
        assert (r.returncode, r.stdout) == (0, "hello\nz\0"), r.stderr

        child = _spare(daemon)
        status = _status(child)
        if os.geteuid() == 0:
            _assert_ids_of_its_own(child, status)
        assert status["NoNewPrivs"] == "1"
        assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
        limits = Path(f"/proc/{child}/limits").read_text()
        assert f"{MEMORY_MB << 20}" in next(x for x in limits.splitlines()
                                            if x.startswith("Max address space"))
        assert next(x for x in limits.splitlines()
                    if x.startswith("Max file size")).split()[3:5] == ["0", "0"]
        # Its own network namespace (nothing in it) and an empty root: no file of the
        # host, the cache or the daemon's socket is reachable.
        assert os.readlink(f"/proc/{child}/ns/net") != os.readlink("/proc/self/ns/net")
        assert os.listdir(f"/proc/{child}/root") == []
        # Forked by the daemon's fork server, it holds its three pipes and nothing else of
        # the server's (its socket to the daemon, its other children's pidfds and pipes).
        server = _ppid(child)
        assert server != daemon and _ppid(server) == daemon
        # (Started by root, no id range's lock either: its ids are a range no sandbox
        # ever gets, so none needs holding.)
        assert sorted(os.listdir(f"/proc/{child}/fd")) == ["0", "1", "2"]
        for fd in range(3):
            assert os.readlink(f"/proc/{child}/fd/{fd}").startswith("pipe:")
        assert os.readlink(f"/proc/{child}/ns/user") != os.readlink(f"/proc/{server}/ns/user")
        assert [pid for pid in _compilers(daemon) if _waiting(pid)] == [child]  # no more
        # The daemon holds it by a pidfd that no process it starts inherits.
        held = [fd for fd in os.listdir(f"/proc/{daemon}/fdinfo")
                if f"Pid:\t{child}\n" in _read(f"/proc/{daemon}/fdinfo/{fd}")]
        assert held, "the daemon holds no pidfd of its compiler child"
        for fd in held:
            flags = next(line for line in _read(f"/proc/{daemon}/fdinfo/{fd}").splitlines()
                         if line.startswith("flags:"))
            assert int(flags.split()[1], 8) & os.O_CLOEXEC, flags
    finally:
        ak("daemon", "stop", env=env)


def _assert_ids_of_its_own(pid: int, status: dict[str, str]) -> None:
    """A root-started compiler child runs as the first id of the range of root's id block
    kept from sandboxes (idmap.helper_range), not as the host's shared nobody: another
    user (nobody here) cannot signal it."""
    from agentkernel.idmap import helper_range

    rng = helper_range()
    assert rng is not None
    uids, gids = status["Uid"].split(), status["Gid"].split()
    assert len(set(uids)) == 1 and len(set(gids)) == 1, (uids, gids)
    assert (int(uids[0]), int(gids[0])) == (rng.uid, rng.gid), (uids, gids, rng)
    assert status["Groups"] == "", status["Groups"]
    if shutil.which("setpriv"):
        probe = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                                "--clear-groups", "--", "kill", "-0", str(pid)],
                               capture_output=True, timeout=30, check=False)
        assert probe.returncode != 0, "nobody may signal root's compiler child"


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root (to become nobody) and setpriv")
def test_bounds_hold_as_nobody(root: Path) -> None:
    home = root / "nobody"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    bounded = {"AGENTKERNEL_NO_DAEMON": "1", "AGENTKERNEL_WASM_COMPILE_MEMORY_MB": str(MEMORY_MB)}

    def run(*args: str) -> tuple[int, str, str]:
        proc = ak_as_user(NOBODY, home, "run", *args, cwd=root / "proj", timeout=60,
                          env=bounded)
        out, err = proc.communicate(timeout=90)
        return proc.returncode, out, err

    code, _out, err = run("big.wasm")
    assert code == 126 and MEMORY_REFUSED in err, err
    code, out, err = run("hello.wat", "n")
    assert (code, out) == (0, "hello\nn\0"), err


def test_answer_framing_taken_whole_and_strict() -> None:
    """The parent takes a compiler's answer as soon as it is whole (not at its exit), and
    refuses what our compiler never sends: another kind, a length beyond any module,
    bytes after the answer."""
    from agentkernel.backends.wasm import COMPILE_ANSWER_BYTES, _whole_answer
    from agentkernel.errors import SandboxError

    framed = b"K" + (3).to_bytes(4, "big") + b"abc"
    for cut in range(len(framed)):
        assert _whole_answer(bytearray(framed[:cut])) is None
    assert _whole_answer(bytearray(framed)) == b"Kabc"
    assert _whole_answer(bytearray(b"E" + (2).to_bytes(4, "big") + b"no")) == b"Eno"
    for bad in (b"X" + (0).to_bytes(4, "big"), framed + b"d",
                b"K" + COMPILE_ANSWER_BYTES.to_bytes(4, "big")):
        with pytest.raises(SandboxError):
            _whole_answer(bytearray(bad))


# A stand-in for the fork server's child: it forks a grandchild that keeps the child's
# pipes open (what a compromised compiler could do), then exits 7 ("exit") or waits.
_FORKING_CHILD = """
import os, sys, time
sys.path.insert(0, os.path.dirname(sys.argv[1]))
import wasm_compile

def forked(fds, memory, cpu, uid, gid):
    os.setsid()
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
    os.closerange(3, 1 << 20)
    if os.fork() == 0:
        time.sleep(120)
        os._exit(0)
    if sys.argv[3] == "stay":
        time.sleep(120)
    os._exit(7)

wasm_compile._forked = forked
wasm_compile.serve(sys.argv[2], 1 << 30, 10, int(sys.argv[4]))
"""


def _fork_server(where: str, how: str) -> tuple[subprocess.Popen[bytes], socket.socket]:
    from agentkernel.backends.wasm import COMPILE_SCRIPT

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with theirs:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _FORKING_CHILD,
                                 str(COMPILE_SCRIPT), where, how, str(theirs.fileno())],
                                pass_fds=(theirs.fileno(),), start_new_session=True)
    ours.settimeout(30)
    return proc, ours


def _eof_within(fd: int, seconds: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(int(seconds * 1000))) and os.read(fd, 1) == b""


def test_fork_server_kills_a_childs_session_and_reports_its_end() -> None:
    """A compiler child that forked cannot keep our pipes: once it ended, its server
    kills its session, then reports how it ended (a child killed through its pidfd:
    SIGKILL); once our end of its socket is closed, the server kills its children and
    exits."""
    import wasmtime

    from agentkernel.backends.wasm import _ForkServer

    where = os.path.dirname(os.path.dirname(wasmtime.__file__))
    for how, code in (("exit", 7), ("stay", -signal.SIGKILL)):
        proc, ctl = _fork_server(where, how)
        try:
            child = _ForkServer._fork(ctl)
            if how == "stay":
                child.kill()
            assert child.wait(30) == code
            assert _eof_within(child.stdout.fileno(), 30)  # the grandchild is gone too
            assert _eof_within(child.stderr.fileno(), 30)
            last = _ForkServer._fork(ctl)
        finally:
            ctl.close()
        assert proc.wait(30) == 0
        # Killed by its server as it left; an "exit" child may have ended first on its own.
        ends = (-signal.SIGKILL,) if how == "stay" else (-signal.SIGKILL, code)
        assert last.wait(30) in ends
        assert _eof_within(last.stdout.fileno(), 30)


def test_a_fork_server_at_its_limit_is_busy_not_broken() -> None:
    """With its most children running, the server refuses a fork: that compile starts a
    child of its own, and the server and the children in flight go on (no restart)."""
    import wasmtime

    from agentkernel.backends.wasm import _ForkServer
    from agentkernel.backends.wasm_compile import SERVE_CHILDREN

    where = os.path.dirname(os.path.dirname(wasmtime.__file__))
    proc, ctl = _fork_server(where, "stay")
    server = _ForkServer()
    server._ctl, server._proc = ctl, proc
    try:
        children = [server.fork() for _ in range(SERVE_CHILDREN)]
        assert all(c is not None for c in children)
        assert server.fork() is None  # busy
        assert server._ctl is ctl and server._failures == 0 and proc.poll() is None
        assert all(c is not None and c.poll() is None for c in children)
        assert children[0] is not None
        children[0].kill()
        assert children[0].wait(30) == -signal.SIGKILL
        again = server.fork()  # a place is free again
        assert again is not None
        children.append(again)
    finally:
        server._stop()
    for c in children:
        assert c is not None and c.wait(30) == -signal.SIGKILL


_AS_USER = """
import os, sys, time
from agentkernel.backends import wasm
wasm._CHILDREN.keep_spare()
deadline = time.monotonic() + 60
while not isinstance(wasm._CHILDREN._spare, wasm._Forked) and time.monotonic() < deadline:
    time.sleep(0.1)
child = wasm._CHILDREN._spare
assert isinstance(child, wasm._Forked), child
while time.monotonic() < deadline and not open(f"/proc/{child.pid}/syscall").read().startswith(
        "0 0x0 "):
    time.sleep(0.1)
print(os.readlink(f"/proc/{child.pid}/ns/user") != os.readlink("/proc/self/ns/user"),
      sorted(os.listdir(f"/proc/{child.pid}/fd")), os.listdir(f"/proc/{child.pid}/root"))
print(len(wasm.compile_bounded(sys.stdin.buffer.read(), "hello", spare=True)) > 0)
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root (to become nobody) and setpriv")
def test_fork_server_as_nobody(root: Path) -> None:
    """An ordinary user's daemon forks its compiler children too: each in a user namespace
    of its own with an empty root and its three pipes alone, and it compiles."""
    from sandbox_helpers import SYSTEM_PYTHON, public_pythonpath
    from wasm_modules import HELLO

    home = root / "nobody-forks"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    r = subprocess.run(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY),
                        "--clear-groups", SYSTEM_PYTHON, "-c", _AS_USER],
                       input=HELLO.encode(), capture_output=True, timeout=120, cwd="/",
                       env={"PYTHONPATH": public_pythonpath(), "PATH": "/usr/bin:/bin",
                            "HOME": str(home), "AGENTKERNEL_HOME": str(home / "data")})
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert r.stdout.decode().split("\n")[:2] == ["True ['0', '1', '2'] []", "True"], r.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a root-started compiler child)")
def test_started_child_takes_ids_of_its_own() -> None:
    """A compiler child the CLI starts (no fork server) gives root up for ids of its own
    too, holding their lock: not the host's nobody, whom another user could signal."""
    from agentkernel.backends.wasm import _reap, _spawn

    child = _spawn(ahead=True)
    try:
        deadline = time.monotonic() + 60
        while not _waiting(child.pid):
            assert child.poll() is None and time.monotonic() < deadline, "it never waited"
            time.sleep(0.05)
        _assert_ids_of_its_own(child.pid, _status(child.pid))
    finally:
        _reap(child)
