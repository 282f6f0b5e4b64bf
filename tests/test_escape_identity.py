"""Who a sandbox is on the host, and what of the host's kernel it can change: attacks on
the "never host root" promise and on /proc and /sys, every profile, run as root (as the
README's quick start does) and as an ordinary user."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox_helpers import ak

ALL = ["permissive", "moderate", "restrictive"]
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="the promise is about root's sandboxes")


def inside(backend: str, profile: str, cwd: Path, *cmd: str) -> tuple[int, str, str]:
    r = ak("run", "-q", "-B", backend, "-p", profile, "-i", "host", "--", *cmd, cwd=cwd)
    return r.returncode, r.stdout, r.stderr


# --- identity ------------------------------------------------------------------------


@ROOT_ONLY
@pytest.mark.parametrize("profile", ALL)
def test_uid_0_inside_is_not_uid_0_outside(profile: str, project: Path) -> None:
    """The review's S1: bwrap mapped the sandbox's root to host root (`0 0 1`)."""
    code, out, err = inside("namespaces", profile, project, "cat", "/proc/self/uid_map",
                            "/proc/self/gid_map")
    assert code == 0, err
    for line in out.splitlines():
        inner, outer, count = (int(x) for x in line.split())
        # No sandbox id lands on a host id below 65536 (root, system and user accounts).
        assert outer >= 65536, line
        assert inner == 0 and count >= 1


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                tree.setdefault(ppid, []).append(int(entry))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _ids(pid: int) -> dict[str, list[int]]:
    status = Path(f"/proc/{pid}/status").read_text()
    return {key: [int(x) for x in m[1].split()]
            for key in ("Uid", "Gid") if (m := re.search(rf"^{key}:\s+(.*)$", status, re.M))}


# Host-side helpers of the network that run as the caller, outside the sandbox: the
# namespace holder, slirp4netns (which drops its capabilities and filters syscalls) and
# the egress gates' fork server (egress_forkserver; its gates are checked); and the
# server that makes root-started sandboxes' user namespaces (ak-enter --userns-server,
# kept by the process that starts sandboxes; nothing of a sandbox's ever runs in it).
NETWORK_HELPERS = {"slirp4netns", "unshare", "cat", "ak-gate-forks", "ak-userns-forks"}


def _start_sleeper(backend: str, profile: str, cwd: Path) -> subprocess.Popen[bytes]:
    seconds = f"77.{secrets.randbelow(10**6):06d}"
    return subprocess.Popen(
        [sys.executable, "-m", "agentkernel", "run", "-q", "-B", backend, "-p", profile, "-i",
         "host", "--", "sleep", seconds], cwd=cwd, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)


def _container_ids(proc: subprocess.Popen[bytes]) -> dict[str, dict[str, list[int]]]:
    """A container sandbox's processes are the engine's children, not the CLI's: every
    process in the pid namespace of the sleeper, found by its unique argument."""
    seconds = str(proc.args[-1])  # type: ignore[index]  # the sleeper's unique argument
    own = os.readlink("/proc/self/ns/pid")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            with contextlib.suppress(OSError):
                if (entry.isdigit() and os.readlink(f"/proc/{entry}/ns/pid") != own
                        and Path(f"/proc/{entry}/cmdline").read_bytes()
                        == f"sleep\0{seconds}\0".encode()):
                    ns = os.readlink(f"/proc/{entry}/ns/pid")
                    out = {}
                    for pid in os.listdir("/proc"):
                        with contextlib.suppress(OSError):
                            if pid.isdigit() and os.readlink(f"/proc/{pid}/ns/pid") == ns:
                                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                                out[f"{comm} {pid}"] = _ids(int(pid))
                    assert len(out) >= 2, out  # the agent and the command
                    return out
        time.sleep(0.05)
    raise AssertionError("the container sandbox never showed up on the host")


def _sandbox_ids(proc: subprocess.Popen[bytes], backend: str) -> dict[str, dict[str, list[int]]]:
    """The host ids of every process of the sandbox `proc` (an in-process run) started,
    by "comm pid", once its command runs (on namespaces it shows up on the host; under
    gVisor the sentry runs it; in a container, the engine starts it)."""
    if backend in ("docker", "podman"):
        return _container_ids(proc)
    deadline = time.monotonic() + 60
    found: dict[int, str] = {}
    last = b"runsc-sandbox" if backend == "gvisor" else b"sleep"
    while time.monotonic() < deadline:
        found, argv0s = {}, []
        for pid in _descendants(proc.pid):
            with contextlib.suppress(OSError):
                found[pid] = Path(f"/proc/{pid}/comm").read_text().strip()
                argv0s.append(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0])
        if last in argv0s:
            break
        time.sleep(0.05)
    out = {}
    for pid, comm in found.items():
        if comm not in NETWORK_HELPERS:
            with contextlib.suppress(OSError):
                if _is_egress_gate(pid):
                    _wait_gate_dropped(pid)
                out[f"{comm} {pid}"] = _ids(pid)
    assert out, "the sandbox never showed up"
    return out


def _is_egress_gate(pid: int) -> bool:
    return (b"gate_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
            or Path(f"/proc/{pid}/comm").read_text().strip() == "ak-egress-gate")


def _wait_gate_dropped(pid: int) -> None:
    """The egress gate is a host-side helper started by the caller: it opens its log and
    control socket and takes its secrets first, then becomes the sandbox range's `nobody`
    before it serves a byte of the sandbox's (connections wait in its listeners' backlog
    meanwhile). Its ids are checked once it has dropped; it must, within seconds."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and min(_ids(pid)["Uid"]) == 0:
        time.sleep(0.05)


@ROOT_ONLY
@pytest.mark.parametrize("profile", ALL)
def test_sandbox_processes_are_unprivileged_host_users(
    backend: str, profile: str, project: Path
) -> None:
    """Seen from the host, every process of the sandbox (bwrap, the agent and the command;
    runsc, its gofer and its sentry) has real, effective, saved and file-system uids and
    gids outside the host's own accounts."""
    proc = _start_sleeper(backend, profile, project)
    try:
        for who, ids in _sandbox_ids(proc, backend).items():
            for key, values in ids.items():
                assert min(values) >= 65536, (who, key, values)
    finally:
        proc.kill()
        proc.wait()


@ROOT_ONLY
def test_sandboxes_share_no_host_id(backend: str, project: Path) -> None:
    """Two sandboxes running at once (and so a gVisor sentry and anything else) never have
    a host uid or gid in common: each gets a range of its own."""
    if backend == "docker":
        pytest.skip("userns-remap: every container of a Docker engine has its one range "
                    "(doctor and docs/backends.md say so; test_containers checks it is that)")
    procs = [_start_sleeper(backend, "moderate", project) for _ in range(2)]
    try:
        seen = []
        for proc in procs:
            ids = _sandbox_ids(proc, backend)
            seen.append({i // 65536 for v in ids.values() for x in v.values() for i in x})
        assert not seen[0] & seen[1], seen
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("profile", ALL)
def test_global_sysctl_is_not_writable(backend: str, profile: str, project: Path) -> None:
    """The review's S1 probe: core_pattern is run by the host kernel as host root."""
    _code, out, err = inside(backend, profile, project, "sh", "-c",
                            "cat /proc/sys/kernel/core_pattern > /proc/sys/kernel/core_pattern "
                            "&& echo WRITABLE; echo done")
    assert "done" in out, err
    assert "WRITABLE" not in out


@ROOT_ONLY
def test_permissive_project_files_keep_their_owners(project: Path) -> None:
    """Id-mapped mounts: the sandbox's root owns what host root owns in the project, and
    what it writes there belongs to host root, as it did before the remapping."""
    secret = project / "private.txt"
    secret.write_text("mine\n")
    secret.chmod(0o600)
    code, out, err = inside(
        "namespaces", "permissive", project, "sh", "-c",
        "cat /workspace/private.txt && echo new > /workspace/new.txt && "
        "stat -c '%u %g' /workspace/new.txt")
    assert code == 0, err
    assert out.split("\n")[:2] == ["mine", "0 0"]
    new = project / "new.txt"
    assert (new.stat().st_uid, new.stat().st_gid) == (0, 0)


# --- /proc and /sys ------------------------------------------------------------------

# Opened for writing (and closed unwritten) by the sandbox's root: everything that opens
# must be a file about the sandbox's own processes. /proc/sys, sysrq-trigger and the
# rest of the kernel's global knobs never are.
WRITABLE_SCAN = r"""
import os, stat, sys
found = []
null = os.stat("/dev/null").st_rdev
def probe(path):
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return
    st = os.fstat(fd)
    os.close(fd)
    if not (stat.S_ISCHR(st.st_mode) and st.st_rdev == null):  # masked: /dev/null over it
        found.append(path)
for top in ("/proc", "/sys"):
    for root, dirs, files in os.walk(top):
        parts = root.split("/")
        # Other processes' entries repeat /proc/self's: the first pid's are enough.
        if len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and parts[2] != "1":
            dirs[:] = []
            continue
        if "/task/" in root + "/" and not root.endswith("/task"):
            dirs[:] = []
            continue
        for name in files:
            probe(os.path.join(root, name))
        if len(found) > 2000:
            break
print("\n".join(found))
"""

# gVisor's sysctls are its own emulation (per-sandbox netstack, its own ptrace rules), not
# the host kernel's; this runsc refuses read-only remounts of binds.
GVISOR_OWN = re.compile(r"^/proc/sys/(net/ipv4/(tcp_[rw]mem|tcp_sack|tcp_recovery|"
                        r"ip_local_port_range)|kernel/yama/ptrace_scope)$")
# Writable paths a sandbox may have: its own processes' files (pid 1 stands for all).
ALLOWED = re.compile(
    r"^/proc/(1|self|thread-self)/"
    r"(attr/.*|autogroup|clear_refs|comm|coredump_filter|fail-nth|gid_map|loginuid|"
    r"make-it-fail|mem|oom_adj|oom_score_adj|projid_map|sched|seccomp_cache|sessionid|"
    r"setgroups|timens_offsets|timerslack_ns|uid_map|fd/\d+|task|timers|ksm_.*)$"
    r"|^/proc/self$|^/proc/thread-self$"
)


@pytest.mark.parametrize("profile", ALL)
def test_only_own_process_files_are_writable(backend: str, profile: str, project: Path) -> None:
    code, out, err = inside(backend, profile, project, "python3", "-c", WRITABLE_SCAN)
    assert code == 0, err
    bad = [p for p in out.split() if not ALLOWED.match(p)
           and not (backend == "gvisor" and GVISOR_OWN.match(p))]
    assert not bad, f"writable from inside the sandbox: {bad[:20]}"


@pytest.mark.parametrize("profile", ALL)
def test_kernel_secrets_in_proc_are_hidden(backend: str, profile: str, project: Path) -> None:
    _code, out, err = inside(backend, profile, project, "sh", "-c",
                            "for f in /proc/kcore /proc/keys /proc/timer_list /proc/sched_debug "
                            "/proc/kallsyms; do n=$(head -c 64 $f 2>/dev/null | wc -c); "
                            "[ \"$n\" -gt 0 ] && echo READ $f; done; echo done")
    assert "done" in out, err
    assert "READ" not in out, out


@ROOT_ONLY
@pytest.mark.parametrize("tun_mode", [0o600, 0o666])
def test_slirp4netns_holds_no_power(project: Path, tun_mode: int) -> None:
    """slirp4netns parses every packet a gVisor `permissive` sandbox sends (namespaces'
    `moderate` goes through the egress gate now, its `permissive` shares the host's
    network): once up it keeps no capability but binding low ports."""
    tun = Path("/dev/net/tun")
    if not tun.exists():
        pytest.skip("no /dev/net/tun")
    before = tun.stat().st_mode & 0o777
    tun.chmod(tun_mode)
    proc = _start_sleeper("gvisor", "permissive", project)
    try:
        _sandbox_ids(proc, "gvisor")
        slirp = [p for p in _descendants(proc.pid)
                 if Path(f"/proc/{p}/comm").read_text().strip() == "slirp4netns"]
        assert slirp
        status = Path(f"/proc/{slirp[0]}/status").read_text()
        assert int(re.search(r"^CapEff:\s+(\w+)", status, re.M)[1], 16) == 1 << 10
        # (It stays host uid 0, without capabilities: docs/security.md "slirp4netns".)
    finally:
        tun.chmod(before)
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("profile", ["permissive", "moderate"])
def test_no_set_id_file_lands_in_the_host_project(backend: str, profile: str,
                                                  project: Path) -> None:
    """The sandbox's root owns, through the id-mapped project dir, what host root owns:
    a set-uid file it made there would be a host-root set-uid program for any local user
    who can reach the project. Where the project is the host's (read-write), set-uid and
    set-gid bits are refused (chmod, creation); elsewhere (copy-on-write) nothing of it
    reaches the host anyway."""
    _code, out, err = inside(
        backend, profile, project, "sh", "-c",
        "cp /bin/true /workspace/su; chmod 4755 /workspace/su; chmod 2755 /workspace/su; "
        "python3 -c \"import os; os.close(os.open('/workspace/su2', "
        "os.O_CREAT | os.O_WRONLY, 0o6755))\"; "
        "cp /bin/true /workspace/plain && chmod 700 /workspace/plain && echo plain-ok")
    assert "plain-ok" in out, err
    for name in ("su", "su2"):
        path = project / name
        if path.exists():
            assert not path.stat().st_mode & 0o6000, (name, oct(path.stat().st_mode))
