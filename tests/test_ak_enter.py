"""ak-enter (agent/ak-enter.c), which puts bwrap into a sandbox's cgroups and user
namespace: it fails closed (nothing runs when a step fails) and the program it runs is
in the groups and the namespace, as the sandbox's root, never host root."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from agentkernel.paths import native_binary


def _enter() -> str:
    return str(native_binary("ak-enter"))


def test_a_failed_cgroup_join_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    r = subprocess.run([_enter(), "--cgroup", str(tmp_path / "no-such" / "cgroup.procs"),
                        "--", "/usr/bin/touch", str(marker)], capture_output=True, text=True,
                       timeout=10, check=False)
    assert r.returncode == 127 and "ak-enter" in r.stderr
    assert not marker.exists()


@pytest.mark.parametrize("argv", [
    ["--userns", "999", "--", "/usr/bin/touch"],  # not an open fd
    ["--userns", "0", "--", "/usr/bin/touch"],  # an fd, not a user namespace
    ["--userns", "x1", "--", "/usr/bin/touch"],
    ["--", "touch"],  # a program found by PATH: never
    ["--cgroup"],
    ["--bogus", "1", "--", "/usr/bin/touch"],
])
def test_bad_arguments_run_nothing(argv: list[str], tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    r = subprocess.run([_enter(), *argv, str(marker)], capture_output=True, text=True,
                       timeout=10, check=False, stdin=subprocess.DEVNULL)
    assert r.returncode == 127, r
    assert not marker.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="a sandbox's id range is root's to map")
def test_program_runs_in_the_groups_and_namespace_as_its_root() -> None:
    """Started by root: the program's host ids are the sandbox range's, it holds no
    supplementary group, and it is in every cgroup it was given."""
    from agentkernel.cgroups import Cgroup, Limits
    from agentkernel.idmap import sandbox_userns

    opened: list[int] = []
    cgroup = Cgroup.create(f"ak-enter-{os.getpid()}", Limits(memory_bytes=64 << 20, pids=16))
    try:
        userns, _lock = sandbox_userns(opened)
        argv = [_enter()]
        for procs in cgroup.procs_files() if cgroup else []:
            argv += ["--cgroup", procs]
        argv += ["--userns", str(userns), "--", "/bin/sleep", "30"]
        proc = subprocess.Popen(argv, pass_fds=opened, stdin=subprocess.DEVNULL)
        try:
            deadline = 200
            while Path(f"/proc/{proc.pid}/comm").read_text().strip() != "sleep":
                deadline -= 1
                assert deadline, "never exec'd"
                subprocess.run(["sleep", "0.01"], check=True)
            status = Path(f"/proc/{proc.pid}/status").read_text()
            uids = next(ln for ln in status.splitlines() if ln.startswith("Uid:")).split()[1:]
            groups = next(ln for ln in status.splitlines() if ln.startswith("Groups:"))
            assert min(int(u) for u in uids) >= 65536, uids
            assert groups.split()[1:] == [], groups
            assert os.readlink(f"/proc/{proc.pid}/ns/user") != os.readlink("/proc/self/ns/user")
            assert str(userns) not in os.listdir(f"/proc/{proc.pid}/fd")  # closed first
            if cgroup is not None:
                for procs in cgroup.procs_files():
                    assert str(proc.pid) in Path(procs).read_text().split(), procs
        finally:
            proc.kill()
            proc.wait()
    finally:
        for fd in opened:
            os.close(fd)
        if cgroup is not None:
            cgroup.destroy()


def test_new_userns_holds_a_namespace_until_stdin_closes() -> None:
    """--new-userns: in a new user namespace once it says so, gone once stdin closes."""
    proc = subprocess.Popen([_enter(), "--new-userns"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.read(1) == b"u"
        assert os.readlink(f"/proc/{proc.pid}/ns/user") != os.readlink("/proc/self/ns/user")
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()



def test_new_userns_holds_nothing_it_inherited(tmp_path: Path) -> None:
    """The daemon starts --new-userns with posix_spawn, which closes nothing: a descriptor
    left inheritable by mistake (here a file and a pipe made so on purpose) must not be
    held in the new namespace. Once it says "u", it has only stdin, stdout and stderr."""
    secret = os.open(tmp_path / "other-sandbox", os.O_RDWR | os.O_CREAT, 0o600)
    pipe_r, pipe_w = os.pipe()
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    for fd in (secret, pipe_r, pipe_w):
        os.set_inheritable(fd, True)
    pid = os.posix_spawn(_enter(), [_enter(), "--new-userns"], {}, file_actions=[
        (os.POSIX_SPAWN_DUP2, in_r, 0), (os.POSIX_SPAWN_DUP2, out_w, 1)])
    try:
        os.close(in_r)
        os.close(out_w)
        assert os.read(out_r, 1) == b"u"
        assert sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd")) == [0, 1, 2]
        os.close(in_w)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        pid = -1
    finally:
        if pid > 0:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        for fd in (secret, pipe_r, pipe_w, out_r):
            os.close(fd)


def test_daemon_userns_holder_is_mapped_and_gone() -> None:
    """idmap.new_userns (the holder spawned without subprocess): the namespace it keeps
    maps the range asked for, and no holder process is left behind."""
    from agentkernel import idmap

    if os.geteuid() != 0:
        pytest.skip("writing a new namespace's maps for another range needs root")
    rng = idmap.HostRange(uid=2_000_000_000, gid=2_000_000_000, size=65536)
    before = _children()
    fd = idmap.new_userns(rng)
    try:
        pid = os.fork()
        if pid == 0:  # a child that joins it reads the maps from inside
            try:
                import ctypes

                if ctypes.CDLL(None, use_errno=True).setns(fd, 0x10000000) != 0:
                    os._exit(3)  # CLONE_NEWUSER refused
                with open("/proc/self/uid_map") as f:
                    ok = f.read().split() == ["0", "2000000000", "65536"]
                os._exit(0 if ok else 1)
            finally:
                os._exit(2)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    finally:
        os.close(fd)
    server = idmap._SERVER.pid  # (kept for the next sandbox; its child is gone)
    assert _children() - {server} == before - {server}
    if server > 0:
        assert _children_of(server) == set()


def test_userns_server_holds_nothing_inherited_and_ends_its_children_at_eof(
        tmp_path: Path) -> None:
    """--userns-server: its children (each in a namespace of its own, as the owner asked
    for, never root) hold nothing it inherited, not even its stdin and stdout; "k PID"
    reaps one; at its stdin's EOF it kills what it still holds and exits."""
    secret = os.open(tmp_path / "other-sandbox", os.O_RDWR | os.O_CREAT, 0o600)
    os.set_inheritable(secret, True)
    proc = subprocess.Popen([_enter(), "--userns-server"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, close_fds=False)
    try:
        assert proc.stdin is not None and proc.stdout is not None

        def ask(line: str) -> str:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(line.encode())
            proc.stdin.flush()
            return proc.stdout.readline().decode().strip() if line[0] == "n" else ""

        assert ask("n 0 0\n") == "-"  # an owner is never root
        first, second = int(ask("n -\n")), int(ask("n -\n"))
        for child in (first, second):
            assert os.readlink(f"/proc/{child}/ns/user") != os.readlink("/proc/self/ns/user")
            assert sorted(int(fd) for fd in os.listdir(f"/proc/{child}/fd")) == [2]
        assert sorted(int(fd) for fd in os.listdir(f"/proc/{proc.pid}/fd")) == [0, 1, 2]
        ask(f"k {first}\n")
        ask(f"k {os.getpid()}\n")  # not its child: nothing done
        assert int(ask("n -\n")) > 0  # (answered after the k lines: they are done)
        assert first not in _children_of(proc.pid) and second in _children_of(proc.pid)
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0
        assert not Path(f"/proc/{second}").exists()
    finally:
        os.close(secret)
        proc.kill()
        proc.wait()


def test_userns_server_children_die_with_it() -> None:
    """A server killed outright (SIGKILL: no EOF handling) leaves no child holding a
    namespace: each has SIGKILL as its parent-death signal."""
    proc = subprocess.Popen([_enter(), "--userns-server"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"n -\n")
        proc.stdin.flush()
        child = int(proc.stdout.readline())
        status = Path(f"/proc/{child}/status").read_text()
        assert "ak-userns-forks" in status
        proc.kill()
        proc.wait()
        for _ in range(500):  # (killed by the kernel; a zombie until init reaps it)
            if not _alive(child):
                break
            time.sleep(0.01)
        assert not _alive(child)
    finally:
        proc.kill()
        proc.wait()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _children_of(pid: int) -> set[int]:
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def _children() -> set[int]:
    return {int(p) for p in Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
            .read_text().split()}


@pytest.mark.skipif(os.geteuid() != 0, reason="root's namespaces are made by the server")
def test_a_server_that_cannot_make_one_namespace_is_asked_again_the_old_way() -> None:
    """The server's "-" says nothing of why (a refused owner, a fork or fd shortage): the
    request goes the old way (which alone decides that owned namespaces are refused here),
    and the server stays for the next one, not retired, not taken for a refusal."""
    from agentkernel.idmap import _UsernsServer

    server = _UsernsServer()
    try:
        assert server.make(_enter(), {"uid": "0 0 1\n", "gid": "0 0 1\n"}, (0, 0)) == -1
        assert not server.retired and server.pid > 0
    finally:
        server._retire()


def test_keep_closes_everything_else_before_the_program_runs(tmp_path: Path) -> None:
    """--keep (the daemon's spawn then closes only what lies above the highest kept
    descriptor): inheritable descriptors below, between and above the kept ones, made so
    on purpose, are all gone in the program; the kept ones are there."""
    from agentkernel import spawn

    if not spawn.available():
        pytest.skip("no posix_spawn through ctypes here")
    stray = [os.open(tmp_path / f"other-{i}", os.O_RDWR | os.O_CREAT, 0o600)
             for i in range(6)]
    for fd in stray:
        os.set_inheritable(fd, True)
    keep = [stray[1], stray[3]]  # strays below, between and above them
    out_r, out_w = os.pipe()
    try:
        pid = spawn.spawn([_enter(), "--keep", ",".join(map(str, keep)), "--",
                           "/bin/ls", "/proc/self/fd"], {}, stdio=[0, out_w, 2], keep=keep,
                          child_closes=True)
        os.close(out_w)
        out_w = -1
        listed = b""
        while chunk := os.read(out_r, 4096):
            listed += chunk
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        fds = {int(x) for x in listed.split()}
        # (ls opens one of its own: /proc/self/fd itself, the lowest free number)
        assert fds - {0, 1, 2, *keep} <= {min(set(range(3, 64)) - set(keep))}
        assert set(keep) <= fds
    finally:
        for fd in (*stray, out_r, out_w):
            if fd >= 0:
                os.close(fd)


@pytest.mark.parametrize("keep", ["2", "x", "3,", "4,,5", "-1"])
def test_bad_keep_lists_run_nothing(keep: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    r = subprocess.run([_enter(), "--keep", keep, "--", "/usr/bin/touch", str(marker)],
                       capture_output=True, text=True, timeout=10, check=False)
    assert r.returncode == 127 and "--keep" in r.stderr, r
    assert not marker.exists()


def test_a_binary_without_keep_is_not_given_it(tmp_path: Path) -> None:
    """An ak-enter built before --keep refuses it (exit 127, "unknown option"): the
    namespaces backend asks once and then closes every descriptor itself, as before."""
    from agentkernel.backends.namespaces import _enter_keeps

    old = tmp_path / "ak-enter"
    old.write_text("#!/bin/sh\necho 'ak-enter: unknown option' >&2\nexit 127\n")
    old.chmod(0o755)
    assert not _enter_keeps(str(old))
    assert _enter_keeps(_enter())
