"""Every profile is bounded: pids, memory and tmpfs caps, attacked with fork and memory bombs.

Run as root through the real CLI on each backend, and as an ordinary user (nobody, no
cgroups: the rlimit floor is all there is) on the namespaces backend.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel.agent.client import AgentClient, Execution
from agentkernel.backends import gvisor
from agentkernel.backends.base import spawn_agent
from agentkernel.backends.namespaces import build_bwrap_argv
from agentkernel.cgroups import Limits, rlimit_floor
from agentkernel.config import parse_config
from agentkernel.errors import ConfigError, UsageError
from agentkernel.paths import native_binary
from agentkernel.planner import RunRequest, resolve_profile
from agentkernel.profiles import (
    PERMISSIVE_MEMORY_MB,
    PERMISSIVE_PIDS,
    PROFILES,
    UNLIMITED,
    Profile,
    get_profile,
    parse_memory_limit,
    parse_pids,
)
from agentkernel.rootfs import host_rootfs
from agentkernel.sandbox import SandboxSpec, command_rlimits
from agentkernel.seccomp import compile_bpf
from sandbox_helpers import BACKENDS, backend_available

NOBODY = 65534

# Forks until fork fails (or `n` children), says how far it got and how many processes
# its pid namespace holds, waits for a line on stdin, then kills its children and exits.
FORKER = (
    "import os,sys\n"
    "n=int(sys.argv[1]); kids=[]; err=None\n"
    "for i in range(n):\n"
    "    try:\n"
    "        pid=os.fork()\n"
    "    except OSError as e:\n"
    "        err=e.errno; break\n"
    "    if pid==0:\n"
    "        try: os.execv('/bin/sleep',['sleep','300'])\n"
    "        finally: os._exit(127)\n"
    "    kids.append(pid)\n"
    "procs=sum(1 for d in os.listdir('/proc') if d.isdigit())\n"
    "print('forked',len(kids),'errno',err,'procs',procs,flush=True)\n"
    "sys.stdin.readline()\n"
    "for k in kids: os.kill(k,9)\n"
    "for k in kids: os.waitpid(k,0)\n"
    "print('done',flush=True)\n"
)


# --- what the profiles and the config promise ----------------------------------------------


def test_every_profile_has_pids_and_memory_caps() -> None:
    for profile in PROFILES.values():
        assert profile.memory_mb and profile.pids, profile.name
    permissive = get_profile("permissive")
    assert (permissive.memory_mb, permissive.pids) == (PERMISSIVE_MEMORY_MB, PERMISSIVE_PIDS)


def test_only_an_explicit_unlimited_lifts_a_cap() -> None:
    p = get_profile("permissive")
    assert p.with_overrides(memory_mb=None, pids=None) == p  # "not set" keeps the caps
    lifted = p.with_overrides(memory_mb=UNLIMITED, pids=UNLIMITED)
    assert lifted.memory_mb is None and lifted.pids is None
    assert parse_memory_limit("unlimited") == UNLIMITED and parse_memory_limit("2g") == 2048
    assert parse_pids("unlimited") == UNLIMITED and parse_pids("300") == 300
    for bad in ("0", "-1", "lots"):
        with pytest.raises(UsageError):
            parse_pids(bad)
    with pytest.raises(UsageError):
        parse_memory_limit("0")  # 0 is not how to say unlimited
    with pytest.raises(UsageError):
        p.with_overrides(pids=3)


def test_resources_section_sets_and_lifts_caps() -> None:
    config, warnings = parse_config({"security": {"profile": "permissive"},
                                     "resources": {"memory": "unlimited", "pids": "unlimited",
                                                   "disk": "2g", "detached_log": "8m"}})
    assert not warnings
    assert (config.resources.memory, config.resources.pids) == (UNLIMITED, UNLIMITED)
    assert (config.resources.disk, config.resources.detached_log) == (2048, 8)
    p = resolve_profile(RunRequest(argv=["true"], cwd=Path("/")), config)
    assert p.memory_mb is None and p.pids is None
    config, _ = parse_config({"resources": {"memory": 1024, "pids": 64}})
    p = resolve_profile(RunRequest(argv=["true"], cwd=Path("/")), config)
    assert (p.memory_mb, p.pids) == (1024, 64)
    # The CLI's flags come last and win.
    p = resolve_profile(RunRequest(argv=["true"], cwd=Path("/"), pids=UNLIMITED), config)
    assert p.pids is None
    for bad in ({"pids": 2}, {"memory": "lots"}, {"pids": True}, {"disk": [1]},
                {"detached_log": "unlimited"}):
        with pytest.raises(ConfigError):
            parse_config({"resources": bad})


def test_rlimit_floor_stands_in_for_missing_controllers() -> None:
    limits = Limits(memory_bytes=256 << 20, pids=100)
    without = {res: (soft, hard) for res, soft, hard in rlimit_floor(limits)}
    assert without[resource.RLIMIT_NPROC] == (100, 100)
    assert without[resource.RLIMIT_DATA] == (256 << 20, 256 << 20)
    assert resource.RLIMIT_CORE not in without  # the agent's, 1, before its filter
    with_cgroup = {res for res, _, _ in rlimit_floor(limits, {"memory", "pids"})}
    assert resource.RLIMIT_DATA not in with_cgroup  # the cgroup counts memory exactly
    assert resource.RLIMIT_NPROC in with_cgroup
    unlimited = {res for res, _, _ in rlimit_floor(Limits())}
    assert not unlimited & {resource.RLIMIT_NPROC, resource.RLIMIT_DATA}


def test_gvisor_pids_stay_within_a_share_of_the_host() -> None:
    gvisor._pid_max.cache_clear()
    budget = gvisor._pid_max() // gvisor.HOST_PID_SHARE
    for pids in (8, 128, 512, 4096, 1 << 20):
        inside = gvisor.sandbox_pids(pids)
        assert inside is not None and 8 <= inside <= pids
        host = gvisor.host_pids(inside)
        assert host is not None and (host <= budget or inside == 8)
    assert gvisor.sandbox_pids(None) is None and gvisor.host_pids(None) is None


def test_tmpfs_mounts_are_sized_at_the_memory_cap() -> None:
    p = get_profile("permissive")
    spec = SandboxSpec(name="t", profile=p, rootfs=host_rootfs(), image="host")
    argv = build_bwrap_argv("bwrap", spec, "/agent", "/bpf", resolv=None, info_fd=-1)
    size = str(p.memory_mb * 1024 * 1024) if p.memory_mb else ""
    for mount in ("/tmp", "/run"):
        at = next(i for i in range(len(argv) - 1) if argv[i:i + 2] == ["--tmpfs", mount])
        assert argv[at - 2:at] == ["--size", size], mount
    lifted = spec._replace(profile=p.with_overrides(memory_mb=UNLIMITED))
    assert "--size" not in build_bwrap_argv("bwrap", lifted, "/a", "/b", resolv=None,
                                            info_fd=-1)


# --- attacks as root, through the CLI ------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    if not backend_available(name):
        pytest.skip(f"{name} is not installed")
    return name


@pytest.fixture
def project() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ak-limits-"))
    (path / "forker.py").write_text(FORKER)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _cli(*args: str, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "AGENTKERNEL_NO_DAEMON": "1"}
    return subprocess.Popen([sys.executable, "-m", "agentkernel", *args], cwd=cwd, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _host_can_fork(times: int = 20) -> bool:
    return all(subprocess.run(["true"], check=False).returncode == 0 for _ in range(times))


def test_fork_bomb_in_permissive_stops_at_the_cap(backend: str, project: Path) -> None:
    cap = PERMISSIVE_PIDS if backend == "namespaces" else gvisor.sandbox_pids(PERMISSIVE_PIDS)
    assert cap is not None
    proc = _cli("run", "-B", backend, "-i", "host", "-p", "permissive", "--",
                "python3", "/workspace/forker.py", "20000", cwd=project)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline().split()  # the bomb is at its cap now, and stays there
        assert line[:1] == ["forked"], (line, proc.stderr.read() if proc.stderr else "")
        forked, err, procs = int(line[1]), line[3], int(line[5])
        assert _host_can_fork(), "the host could not fork while the sandbox was at its cap"
        proc.stdin.write("\n")
        proc.stdin.flush()
        out, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert err == "11" and forked < 20000  # EAGAIN: the cap, not the loop's end
    assert procs <= cap, f"{procs} processes in a sandbox capped at {cap}"
    assert proc.returncode == 0 and out.strip() == "done", stderr


def test_memory_hog_in_permissive_is_killed_at_its_cap(backend: str, project: Path) -> None:
    hog = f"b = bytearray({PERMISSIVE_MEMORY_MB + 1024} << 20); print('survived')"
    proc = _cli("run", "-B", backend, "-i", "host", "-p", "permissive", "--",
                "python3", "-c", hog, cwd=project)
    out, err = proc.communicate(input="", timeout=300)
    assert "survived" not in out
    assert proc.returncode == 137, err
    assert f"out of memory (limit {PERMISSIVE_MEMORY_MB} MiB)" in err


def test_tmpfs_counts_within_the_memory_cap(project: Path) -> None:
    """/tmp's pages are charged to the sandbox's memory cgroup: filling it past the cap
    ends the sandbox (tmpfs can't be reclaimed without swap), or hits the tmpfs's size."""
    proc = _cli("run", "-B", "namespaces", "-i", "host", "-p", "moderate", "--memory", "256m",
                "--", "sh", "-c", "head -c 1G /dev/zero > /tmp/x; echo rc=$?", cwd=project)
    out, err = proc.communicate(input="", timeout=300)
    assert "rc=0" not in out
    assert (proc.returncode == 137 and "out of memory (limit 256 MiB)" in err) or \
        "No space left on device" in err, (proc.returncode, out, err)


# --- attacks as an ordinary user: no cgroups, the rlimit floor alone -----------------------


nobody_only = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("bwrap"),
    reason="needs root (to become nobody), setpriv and bwrap")


@pytest.fixture(scope="module")
def public_dir() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="ak-limits-nobody-", dir="/tmp"))
    root.chmod(0o755)
    try:
        shutil.copy(native_binary("ak-agent"), root / "ak-agent")
        (root / "project").mkdir(mode=0o755)
        (root / "project" / "forker.py").write_text(FORKER)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def as_nobody(public: Path, profile: Profile, name: str) -> Iterator[AgentClient]:
    """A namespaces sandbox that nobody starts: bwrap unprivileged, no cgroup at all."""
    bpf = public / f"{name}.bpf"
    shutil.copy(compile_bpf(profile.seccomp), bpf)
    spec = SandboxSpec(name=name, profile=profile, rootfs=host_rootfs(), image="host",
                       workspace=public / "project")
    bwrap = shutil.which("bwrap")
    assert bwrap is not None
    argv = build_bwrap_argv(bwrap, spec, str(public / "ak-agent"), str(bpf), resolv=None,
                            info_fd=-1)
    setpriv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
    log = Path(tempfile.mkstemp(prefix="ak-limits-log-")[1])
    spawned = spawn_agent(setpriv + argv, log=log)
    client = AgentClient.from_fds(spawned.read_fd, spawned.write_fd)
    try:
        client.hello(timeout=15)
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.shutdown()
        client.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(spawned.process.pid, 9)
        spawned.process.wait()
        log.unlink(missing_ok=True)


def _nobody_profile(*, pids: int | None = None, memory_mb: int | None = None) -> Profile:
    return get_profile("permissive").with_overrides(network=False, pids=pids,
                                                    memory_mb=memory_mb)


def _start_bomb(client: AgentClient, profile: Profile, n: int) -> tuple[Execution, list[str]]:
    ex = client.exec(["python3", "/workspace/forker.py", str(n)], cwd="/", stdin=True,
                     env={"PATH": "/usr/bin:/bin"},
                     rlimits=command_rlimits(profile, None))
    for kind, payload in ex.events():
        if kind == "stdout" and isinstance(payload, bytes):
            return ex, payload.decode().split()
        if kind != "stderr":
            break
    pytest.fail("the forker said nothing")


@nobody_only
def test_rootless_fork_bomb_stops_at_the_cap_per_sandbox(public_dir: Path) -> None:
    """RLIMIT_NPROC counts per (user namespace, uid): each sandbox has its own count, and
    neither the host's processes of the same uid nor another sandbox's use it up."""
    profile = _nobody_profile(pids=64)
    with as_nobody(public_dir, profile, "lim-a") as a, as_nobody(public_dir, profile,
                                                                 "lim-b") as b:
        ex_a, line_a = _start_bomb(a, profile, 1000)
        # While A sits at its cap, B (same host uid) still gets its full share.
        ex_b, line_b = _start_bomb(b, profile, 1000)
        for line in (line_a, line_b):
            assert line[:1] == ["forked"] and line[3] == "11", line
            assert 32 < int(line[5]) <= 64, line
        assert _host_can_fork()
        for ex in (ex_a, ex_b):
            ex.close_stdin()
            out, _err, status = ex.wait(120)
            assert out.endswith(b"done\n") and status.shell_code == 0


@nobody_only
def test_rootless_memory_hog_is_bounded_per_process(public_dir: Path) -> None:
    profile = _nobody_profile(memory_mb=256)
    with as_nobody(public_dir, profile, "lim-mem") as client:
        rl = command_rlimits(profile, None)
        ex = client.exec(["python3", "-c", "b = bytearray(512 << 20); print('survived')"],
                         cwd="/", env={"PATH": "/usr/bin:/bin"}, rlimits=rl)
        out, err, status = ex.wait(60)
        assert b"survived" not in out and b"MemoryError" in err, err
        assert status.shell_code != 0
        # tmpfs is outside RLIMIT_DATA: its size is the bound.
        ex = client.exec(["sh", "-c", "head -c 400M /dev/zero > /tmp/x; echo rc=$?"],
                         cwd="/", env={"PATH": "/usr/bin:/bin"}, rlimits=rl)
        out, err, status = ex.wait(60)
        assert b"rc=1" in out and b"No space left on device" in err, (out, err)
