"""Kept (persistent) microVMs through the daemon: one VM, every lifecycle step, real TCG boots.

create -> exec -> daemon SIGKILL -> re-adopted by a new daemon -> stop -> start -> remove,
then `run --keep`. Boots: the VM, its restart, and the `run --keep` VM.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel.cgroups import Cgroup
from agentkernel.paths import data_dir, runtime_dir
from sandbox_helpers import Result, ak

# No warm pool: under emulation a `backend auto` pool would boot VMs nobody asked for.
DAEMON_TOML = "[daemon]\npools = []\nreaper_interval = 0.2\n"


def _state(pid: int) -> bytes:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return b"X"
    return data[data.rfind(b")") + 2:][:1]


def vm_processes(name: str) -> dict[int, str]:
    """Live (not zombie) QEMU, egress gate and slirp4netns processes of sandbox `name`.

    QEMU is found by its cgroup: its command line names no path of ours (it gets every
    file as a descriptor)."""
    found: dict[int, str] = {}
    qemus = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or _state(int(entry)) in (b"Z", b"X"):
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"qemu-system-x86_64") and _in_cgroup(int(entry), name):
            found[int(entry)] = "qemu"
            qemus.add(int(entry))
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or _state(int(entry)) in (b"Z", b"X"):
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # slirp4netns names the netns holder's pid; the holder runs `unshare ... cat`.
        if cmd and cmd[0].endswith(b"slirp4netns") and _holder_of(cmd, qemus):
            found[int(entry)] = "slirp4netns"
        elif _gate_of(int(entry), cmd, name):
            found[int(entry)] = "gate"
    return found


def lasting(name: str) -> dict[int, str]:
    """vm_processes without the egress gate, which comes and goes with the guest's use of
    the network (an on-demand gate exits when idle)."""
    return {p: what for p, what in vm_processes(name).items() if what != "gate"}


def _gate_of(pid: int, cmd: list[bytes], name: str) -> bool:
    """Is this the egress gate (forked, or its own interpreter) of sandbox `name`? It holds
    its log and control socket open in the sandbox's scratch dir."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    if comm == "ak-gate-forks":  # the gates' fork server: it holds the sandbox's log too
        return False
    if comm != "ak-egress-gate" and not any(b"egress" in a for a in cmd):
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if f"/{name}/" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                return True
    return False


def _in_cgroup(pid: int, name: str) -> bool:
    try:
        from agentkernel.cgroups import group_dirname

        return f"/agentkernel/{group_dirname(name)}\n" in Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False


def _holder_of(slirp_cmd: list[bytes], qemus: set[int]) -> bool:
    """Does this slirp4netns serve the namespace one of `qemus` runs in?"""
    args = [a for a in slirp_cmd if a.isdigit()]
    if not args:
        return False
    try:
        holder_ns = os.readlink(f"/proc/{int(args[-1])}/ns/net")
        return any(os.readlink(f"/proc/{q}/ns/net") == holder_ns for q in qemus)
    except OSError:
        return False


def wait_gone(pids: set[int], timeout: float = 10.0) -> set[int]:
    deadline = time.monotonic() + timeout
    left = pids
    while time.monotonic() < deadline:
        left = {p for p in pids if _state(p) not in (b"Z", b"X")}
        if not left:
            break
        time.sleep(0.05)
    return left


def daemon_status() -> dict[str, object]:
    r = ak("daemon", "status", "--json")
    assert r.returncode == 0, r.stderr
    doc: dict[str, object] = json.loads(r.stdout)
    return doc


def ok(r: Result) -> Result:
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r


@pytest.fixture
def vm_daemon(microvm_ready: None, tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A daemon of our own config (no pool) in the session's private dirs."""
    ak("daemon", "stop")
    (tmp_path / "daemon.toml").write_text(DAEMON_TOML)
    monkeypatch.setenv("AGENTKERNEL_DAEMON_CONFIG", str(tmp_path / "daemon.toml"))
    yield
    listing = ak("list", "--json")
    if listing.returncode == 0:
        for row in json.loads(listing.stdout or "[]"):
            ak("remove", row["name"])
    ak("daemon", "stop")


def test_kept_vm_lifecycle(vm_daemon: None, tmp_path: Path) -> None:
    name = f"kvm-{os.getpid()}"
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "hello.txt").write_text("from the host\n")
    state_dir = data_dir() / "sandboxes" / name
    scratch = runtime_dir() / "sandboxes" / name

    # A bad name is refused before anything is made for it.
    def entries() -> list[str]:
        dirs = (data_dir(), data_dir() / "sandboxes", runtime_dir(), runtime_dir() / "sandboxes")
        return sorted(str(p) for d in dirs if d.is_dir() for p in d.iterdir())

    before = entries()
    bad = ak("create", "../evil", "-B", "microvm")
    assert bad.returncode != 0 and "invalid sandbox name" in bad.stderr
    assert entries() == before and not (data_dir() / "evil").exists()

    t0 = time.monotonic()
    ok(ak("create", name, "-B", "microvm", "-p", "moderate", "-i", "host", "--dir", str(proj),
          timeout=180))
    boot_s = time.monotonic() - t0
    kernel = ok(ak("exec", name, "--", "uname", "-r")).stdout.strip()
    assert kernel and kernel != platform.release()  # the guest's own kernel
    ok(ak("exec", name, "--", "sh", "-c",
          "echo hi > /root/f && echo guest >> /workspace/hello.txt && "
          "(while [ ! -e /tmp/go ]; do sleep 0.1; done; echo bg > /root/bg) >/dev/null 2>&1 &"))
    from agentkernel.ipc import client

    # A detached command that outlives the daemon: it finishes once /tmp/go exists.
    det = client.call("exec_detached", {"name": name, "argv": [
        "sh", "-c", "echo early; while [ ! -e /tmp/go ]; do sleep 0.1; done; echo late; exit 3"]})
    deadline = time.monotonic() + 30
    while client.call("detached_logs", {"name": name, "cmd_id": det["id"]})[0] != "early\n":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Its egress gate (moderate) runs only while the guest uses the network: forked on
    # demand by the daemon's gate fork server, which polls its listeners meanwhile.
    procs_before = lasting(name)
    qemu = [p for p, what in procs_before.items() if what == "qemu"]
    assert len(qemu) == 1, procs_before
    assert f"agentkernel/{name}" in Path(f"/proc/{qemu[0]}/cgroup").read_text()
    assert (state_dir / "vm" / "layer.ext4").is_file()
    assert (state_dir / "vm" / "workspace.ext4").is_file()

    # The daemon dies hard: the VM and its helpers do not care.
    old_pid = int(str(daemon_status()["pid"]))
    os.kill(old_pid, signal.SIGKILL)
    assert not wait_gone({old_pid}, 5)
    assert lasting(name) == procs_before

    # With no daemon at all, the guest agent answers a new connection with a fresh HELLO.
    from agentkernel.agent.client import AgentClient

    for attempt in range(3):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(scratch / "ctl" / "agent.sock"))
        agent = AgentClient.from_socket(sock)
        try:
            agent.hello(timeout=3)
        except Exception:
            agent.close()  # connected before the guest saw the hang-up: hang up, retry
            assert attempt < 2
            time.sleep(0.2)
            continue
        out, _, st = agent.exec(["cat", "/root/f"]).wait(30)
        agent.close()
        assert (out, st.code) == (b"hi\n", 0)
        break

    # The next daemon (started on demand) re-adopts it.
    t0 = time.monotonic()
    r = ok(ak("exec", name, "--", "cat", "/root/f", "/workspace/hello.txt"))
    readopt_s = time.monotonic() - t0
    assert r.stdout == "hi\nfrom the host\nguest\n"
    ok(ak("exec", name, "--", "touch", "/tmp/go"))
    status = daemon_status()
    assert status["pid"] != old_pid
    assert f"re-adopted {name}" in status["recovered"]  # type: ignore[operator]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = client.call("detached_status", {"name": name, "cmd_id": det["id"]})
        if st["status"] != "running":
            break
        time.sleep(0.1)
    assert (st["status"], st["exit_code"]) == ("completed", 3)
    out, _err = client.call("detached_logs", {"name": name, "cmd_id": det["id"]})
    assert out == "early\nlate\n"
    # The background job of an earlier exec ran on too.
    r = ok(ak("exec", name, "--", "sh", "-c",
              "for i in $(seq 100); do [ -s /root/bg ] && break; sleep 0.1; done; cat /root/bg"))
    assert r.stdout == "bg\n"

    # stop: a clean guest shutdown; the VM's disks stay, its processes and scratch go.
    t0 = time.monotonic()
    ok(ak("stop", name))
    stop_s = time.monotonic() - t0
    assert not wait_gone(set(procs_before)), vm_processes(name)
    assert not scratch.exists()
    r = ak("exec", name, "--", "true")
    assert r.returncode != 0, r.stderr
    assert f"sandbox '{name}' is not running: it is stopped" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

    t0 = time.monotonic()
    ok(ak("start", name, timeout=180))
    start_s = time.monotonic() - t0
    r = ok(ak("exec", name, "--", "cat", "/root/f", "/root/bg", "/workspace/hello.txt"))
    assert r.stdout == "hi\nbg\nfrom the host\nguest\n"
    running = vm_processes(name)
    assert sorted(lasting(name).values()) == ["qemu"], running

    ok(ak("remove", name))
    assert not wait_gone(set(running)), vm_processes(name)
    assert not state_dir.exists() and not scratch.exists()
    assert not Cgroup.open(name).dirs
    print(f"\nkept microVM: create {boot_s:.2f} s, exec after daemon SIGKILL (re-adopt) "
          f"{readopt_s:.2f} s, stop {stop_s:.2f} s, start {start_s:.2f} s")


def test_run_keep_on_microvm(vm_daemon: None, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("project\n")
    r = ok(ak("run", "--keep", "-B", "microvm", "-p", "moderate", "-i", "host", "--",
              "sh", "-c", "cat /workspace/a.txt; echo x > /root/kept",
              cwd=tmp_path, timeout=180))
    assert r.stdout == "project\n"
    line = next(ln for ln in r.stderr.splitlines() if "kept. Remove with" in ln)
    name = line.split("agentkernel remove ")[-1].strip()
    rows = json.loads(ok(ak("list", "--json")).stdout)
    assert [(x["name"], x["status"], x["backend"]) for x in rows] == [
        (name, "running", "microvm")]
    assert ok(ak("exec", name, "--", "cat", "/root/kept")).stdout == "x\n"
    running = vm_processes(name)
    assert "qemu" in running.values()
    ok(ak("remove", name))
    assert not wait_gone(set(running)), vm_processes(name)
    assert not (data_dir() / "sandboxes" / name).exists()
    assert not Cgroup.open(name).dirs
