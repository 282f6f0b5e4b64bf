"""ak-enter (agent/ak-enter.c), which puts bwrap into a sandbox's cgroups and user
namespace: it fails closed (nothing runs when a step fails) and the program it runs is
in the groups and the namespace, as the sandbox's root, never host root."""

from __future__ import annotations

import os
import subprocess
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

