"""cgroup limits with real processes: memory OOM kill, pids cap, CPU quota, cleanup, names."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from agentkernel import cgroups
from agentkernel.cgroups import Cgroup, Limits
from agentkernel.errors import UsageError

MiB = 1024 * 1024


def _support() -> cgroups.CgroupSupport:
    if os.geteuid() != 0:
        pytest.skip("cgroup tests need root here (no delegated cgroup assumed)")
    support = cgroups.detect()
    if not support.usable:
        pytest.skip(f"no writable cgroup: {support.explain()}")
    return support


@pytest.fixture
def make() -> Iterator[list[Cgroup]]:
    made: list[Cgroup] = []
    yield made
    for cg in made:
        cg.destroy()


def _create(made: list[Cgroup], limits: Limits, need: str) -> Cgroup:
    support = _support()
    if need not in support.usable:
        pytest.skip(f"{need} controller not usable: {support.explain()}")
    cg = Cgroup.create(f"test-{uuid.uuid4().hex[:12]}", limits, support)
    assert cg is not None
    made.append(cg)
    return cg


def test_detect_explains() -> None:
    support = cgroups.detect()
    assert support.mode in ("v2", "v1", "hybrid", "none")
    text = support.explain()
    assert text.startswith("cgroups:")
    if support.mode != "none":
        for ctrl in cgroups.CONTROLLERS:
            assert ctrl in text


def test_memory_limit_oom_kills(make: list[Cgroup]) -> None:
    cg = _create(make, Limits(memory_bytes=64 * MiB), "memory")
    assert not cg.oom_killed()
    code = "b = bytearray(200 * 1024 * 1024)\nfor i in range(0, len(b), 4096): b[i] = 1\n"
    proc = subprocess.Popen([sys.executable, "-S", "-c", code], preexec_fn=cg.join_fn())
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert cg.oom_killed()
    peak = cg.memory_peak()
    if peak is not None:
        assert peak <= 80 * MiB


FORK_BOMB = r"""
import os, time
n = 0
for _ in range(200):
    try:
        pid = os.fork()
    except BlockingIOError:  # EAGAIN from pids.max
        print("EAGAIN", n, flush=True)
        break
    if pid == 0:
        os.close(1)  # don't hold the captured stdout open
        os.close(2)
        time.sleep(30)
        os._exit(0)
    n += 1
else:
    print("NOLIMIT", n, flush=True)
"""


def test_pids_limit_stops_fork_bomb(make: list[Cgroup]) -> None:
    cg = _create(make, Limits(pids=20), "pids")
    res = subprocess.run([sys.executable, "-S", "-c", FORK_BOMB], preexec_fn=cg.join_fn(),
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    word, count = res.stdout.split()
    assert word == "EAGAIN" and int(count) < 20, res.stdout
    cg.kill_all()  # the sleeping children outlived their parent
    assert cg.oom_killed() is False


def test_cpu_quota(make: list[Cgroup]) -> None:
    cg = _create(make, Limits(cpus=0.5), "cpu")
    code = "import time\nend = time.monotonic() + 1.0\nwhile time.monotonic() < end: pass\n"
    proc = subprocess.Popen([sys.executable, "-S", "-c", code], preexec_fn=cg.join_fn())
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0
    cpu = usage.ru_utime + usage.ru_stime
    # Half a CPU for ~1 s of wall time, plus interpreter start-up; unthrottled would be ~1.0.
    assert cpu < 0.8, cpu


def test_destroy_removes_directories_and_kills(make: list[Cgroup]) -> None:
    support = _support()
    cg = Cgroup.create(f"test-{uuid.uuid4().hex[:12]}", Limits(64 * MiB, 50, 1.0), support)
    assert cg is not None
    dirs = list(cg.dirs)
    assert dirs and all(d.is_dir() for d in dirs)
    proc = subprocess.Popen(["sleep", "60"])
    cg.add_pid(proc.pid)
    cg.destroy()
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert not any(d.exists() for d in dirs)


def test_missing_limits_are_reported() -> None:
    support = cgroups.CgroupSupport("none")
    assert Cgroup.create("x", Limits(memory_bytes=MiB), support) is None


@pytest.mark.parametrize("name", ["", "..", "a/b", "../x", "a..b", "x" * 129, "a b", "é", "."])
def test_invalid_names_rejected(name: str) -> None:
    with pytest.raises(UsageError):
        Cgroup.create(name, Limits(), cgroups.CgroupSupport("none"))


def test_valid_names() -> None:
    for name in ("a", "sandbox-1", "A.b_c", "x" * 128):
        assert cgroups.validate_name(name) == name


def test_rlimit_floor() -> None:
    floor = {res: (soft, hard) for res, soft, hard in cgroups.rlimit_floor(Limits(pids=64))}
    assert resource.RLIMIT_CORE not in floor  # the agent's, 1, before its filter
    assert floor[resource.RLIMIT_NPROC][0] <= 64
    soft, hard = floor[resource.RLIMIT_NOFILE]
    assert soft <= 4096 and soft <= hard <= 65536
    assert resource.RLIMIT_AS not in floor
    assert resource.RLIMIT_NPROC not in {r for r, _, _ in cgroups.rlimit_floor(Limits())}
    # The floor must be applicable by an unprivileged child: setrlimit in a real process.
    code = (
        "import resource, sys\n"
        f"for r, s, h in {cgroups.rlimit_floor(Limits(pids=64))!r}: resource.setrlimit(r, (s, h))\n"
    )
    subprocess.run([sys.executable, "-S", "-c", code], check=True, timeout=30)


def test_unlimited_cpu_gets_no_group_but_memory_and_pids_stay(make: list[Cgroup]) -> None:
    """No cpu limit (permissive): no group in a v1 hierarchy that holds only cpu (a mkdir,
    writes and an rmdir per sandbox saved); memory and pids groups are made even without
    a limit, since they measure the sandbox and list its processes for kill_all."""
    support = _support()
    cg = _create(make, Limits(), "pids")
    made = {h.base for h in cg.dirs.values()}
    for ctrl, h in support.usable.items():
        only_cpu = h.controllers & {"memory", "pids", "cpu"} == {"cpu"}
        assert (h.base in made) is not only_cpu, (ctrl, h, cg.dirs)
    proc = subprocess.Popen(["sleep", "30"], preexec_fn=cg.join_fn())
    try:
        listed = {int(p) for d in cg.dirs for p in (d / "cgroup.procs").read_text().split()}
        assert proc.pid in listed
    finally:
        cg.kill_all()
        proc.wait()
    limited = _create(make, Limits(cpus=0.5), "cpu")
    assert "cpu" in limited.enforced()


def test_destroy_kills_a_process_left_in_one_group_or_a_sub_group(make: list[Cgroup]) -> None:
    """destroy removes empty groups without listing them first; a process still in any
    one of a sandbox's groups (the others already empty and removed), or only in a
    sub-group, is killed and every group goes."""
    support = _support()
    cg = Cgroup.create(f"test-{uuid.uuid4().hex[:12]}", Limits(64 * MiB, 50, 1.0), support)
    assert cg is not None
    make.append(cg)
    dirs = list(cg.dirs)
    last = dirs[-1]
    sub = last / "inner"
    sub.mkdir()
    proc = subprocess.Popen(["sleep", "60"])
    try:
        (sub / "cgroup.procs").write_text(str(proc.pid))
        cg.destroy()
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not any(d.exists() for d in dirs)
    empty = Cgroup.create(f"test-{uuid.uuid4().hex[:12]}", Limits(64 * MiB, 50, 1.0), support)
    assert empty is not None
    make.append(empty)
    empty.destroy()
    assert not any(d.exists() for d in empty.dirs)
