"""Persistent sandboxes can't fill the host's disk: a quota per sandbox, capped detached logs.

A daemon of its own runs with `[resources] disk = "64m"` and `detached_log = "1m"`; the
sandboxes write far past both, from every writable place they have.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel.daemon import quota
from sandbox_helpers import backend_available

sys.path.insert(0, str(Path(__file__).parent))
from conftest import Daemon

QUOTA_TOML = """
[resources]
disk = "64m"
detached_log = "1m"

[daemon]
pool_min = 0
pools = []
reaper_interval = 0.2
"""
DISK = 64 * quota.MIB
LOG_CAP = 1 * quota.MIB

pytestmark = pytest.mark.skipif(not quota.can_mount(),
                                reason="needs root with loop devices (see test_rootless_*)")


@pytest.fixture(scope="module")
def qd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    if shutil.which("bwrap") is None:
        pytest.skip("needs bubblewrap")
    root = tmp_path_factory.mktemp("akq")
    (root / "daemon.toml").write_text(QUOTA_TOML)
    env = {"AGENTKERNEL_HOME": str(root / "home"), "AGENTKERNEL_RUNTIME_DIR": str(root / "run"),
           "AGENTKERNEL_DAEMON_CONFIG": str(root / "daemon.toml")}
    (root / "run").mkdir(mode=0o700)
    (root / "project").mkdir()
    (root / "project" / "keep.txt").write_text("host file\n")
    d = Daemon(root, env)
    d.ensure_up()
    try:
        yield d
    finally:
        for state in (root / "home" / "sandboxes").glob("*"):
            if state.is_dir():
                d.ak("remove", state.name)
        d.ak("daemon", "stop")
        _assert_nothing_left(root / "home" / "sandboxes")


def _assert_nothing_left(sandboxes: Path) -> None:
    """No mount, no loop device, no image, no mount point of ours anywhere."""
    ours = quota.mount_point(sandboxes / "x").parent
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(sandboxes) not in mounts and str(ours) not in mounts
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True,
                           check=False).stdout
    assert str(sandboxes) not in loops, loops
    assert not sandboxes.exists() or not any(sandboxes.iterdir()), list(sandboxes.iterdir())
    assert not ours.exists()


def _name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def _sh(d: Daemon, name: str, script: str) -> tuple[int, str]:
    r = d.ak("exec", name, "--", "sh", "-c", script, timeout=120)
    return r.returncode, r.stdout + r.stderr


FILL = "head -c 3G /dev/zero > {0}; echo rc=$?; rm -f {0}"


def test_persistent_sandbox_hits_its_quota_everywhere_it_writes(qd: Daemon) -> None:
    name = _name("quota")
    r = qd.ak("create", name, "-i", "host", "-B", "namespaces", "-p", "moderate", "-d",
              str(qd.root / "project"))
    assert r.returncode == 0, r.stderr
    state = qd.home / "sandboxes" / name
    assert quota.is_mounted(quota.mount_point(state))
    # /tmp, the root overlay's upper, the project's copy-on-write upper, /root, /var/tmp.
    for target in ("/tmp/x", "/usr/x", "/workspace/x", "/root/x", "/var/tmp/x"):
        code, out = _sh(qd, name, FILL.format(target))
        assert code == 0 and "rc=1" in out and "No space left on device" in out, (target, out)
    image = quota.image_path(state)
    assert image.stat().st_blocks * 512 <= DISK  # what the host's disk really holds
    assert sorted(p.name for p in (qd.root / "project").iterdir()) == ["keep.txt"]
    # Room again once the files are gone: a full disk is not a broken sandbox.
    code, out = _sh(qd, name, "head -c 8M /dev/zero > /tmp/y && echo fits")
    assert "fits" in out, out
    assert qd.ak("remove", name).returncode == 0
    assert not quota.is_mounted(quota.mount_point(state)) and not state.exists()
    assert not quota.mount_point(state).exists()


def test_project_dir_holding_the_data_dir_still_runs(qd: Daemon) -> None:
    """A disk mounted inside the data dir would reach a run from $HOME as a locked
    submount of its project, which overlayfs refuses: the disks are mounted elsewhere."""
    name = _name("home")
    assert qd.ak("create", name, "-i", "host", "-B", "namespaces").returncode == 0
    for extra in ((), ("--no-network",)):
        r = qd.ak("run", "-i", "host", "-B", "namespaces", "-p", "moderate", *extra, "--",
                  "sh", "-c", "echo ok", cwd=qd.root, env={"AGENTKERNEL_NO_DAEMON": "1"})
        assert r.returncode == 0 and r.stdout == "ok\n", r.stderr
    assert qd.ak("remove", name).returncode == 0


def test_detached_command_printing_forever_keeps_a_capped_log(qd: Daemon) -> None:
    name = _name("logs")
    assert qd.ak("create", name, "-i", "host", "-B", "namespaces").returncode == 0
    with qd.use():
        from agentkernel.ipc import client

        det = client.call("exec_detached", {"name": name, "argv": [
            "sh", "-c", "i=0; while :; do echo line $i; i=$((i+1)); done"]})
        log_dir = qd.home / "sandboxes" / name / "exec"
        # Until the log has rotated a few times (the command never ends by itself).
        deadline = time.monotonic() + 120
        while not (log_dir / f"{det['id']}.stdout.dropped").exists():
            assert time.monotonic() < deadline, "the log never filled"
            time.sleep(0.2)
        time.sleep(1)
        files = list(log_dir.glob(f"{det['id']}.stdout*"))
        assert sum(f.stat().st_size for f in files) <= LOG_CAP, files
        client.call("detached_kill", {"name": name, "cmd_id": det["id"]})
        out, _err = client.call("detached_logs", {"name": name, "cmd_id": det["id"]})
    assert out.startswith("[agentkernel: earlier output dropped")
    assert len(out.encode()) <= LOG_CAP + 100
    last = [ln for ln in out.splitlines() if ln.startswith("line ")][-1]
    assert int(last.split()[1]) > 100_000  # the newest output is what was kept
    assert qd.ak("remove", name).returncode == 0


@pytest.mark.skipif(not backend_available("gvisor"), reason="runsc is not installed")
def test_gvisor_persistent_project_copy_is_within_the_quota(qd: Daemon) -> None:
    """gVisor keeps its overlays in memory (the memory cap bounds them); what it keeps on
    the host's disk is a copy-on-write project's copy, which the quota covers."""
    name = _name("gvq")
    r = qd.ak("create", name, "-i", "host", "-B", "gvisor", "-p", "moderate", "-d",
              str(qd.root / "project"))
    assert r.returncode == 0, r.stderr
    state = qd.home / "sandboxes" / name
    assert (quota.mount_point(state) / "workspace" / "keep.txt").exists()
    _code, out = _sh(qd, name, FILL.format("/workspace/x"))
    assert "rc=1" in out and "No space left on device" in out, out
    assert sorted(p.name for p in (qd.root / "project").iterdir()) == ["keep.txt"]
    assert qd.ak("remove", name).returncode == 0


def test_quota_survives_daemon_restarts_and_reboots(qd: Daemon) -> None:
    name = _name("reboot")
    assert qd.ak("create", name, "-i", "host", "-B", "namespaces").returncode == 0
    state = qd.home / "sandboxes" / name
    disk = quota.mount_point(state)
    assert _sh(qd, name, "echo kept > /root/f")[0] == 0
    # A daemon killed outright: the sandbox and its mounted disk live on, and are adopted.
    pid = qd.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    qd.ensure_up()
    assert quota.is_mounted(disk)
    _code, out = _sh(qd, name, "cat /root/f; " + FILL.format("/tmp/x"))
    assert out.startswith("kept") and "rc=1" in out, out
    # A reboot: the sandbox is stopped and the mount is gone; the next daemon mounts the
    # same image again, files intact.
    assert qd.ak("stop", name).returncode == 0
    qd.ak("daemon", "stop")
    subprocess.run(["umount", str(disk)], check=True)
    assert not quota.is_mounted(disk)
    qd.ensure_up()
    assert quota.is_mounted(disk)
    assert qd.ak("start", name).returncode == 0
    _code, out = _sh(qd, name, "cat /root/f; " + FILL.format("/tmp/x"))
    assert out.startswith("kept") and "rc=1" in out, out
    assert qd.ak("remove", name).returncode == 0
    assert not quota.is_mounted(disk) and not state.exists()


def test_rootless_daemon_stops_a_sandbox_over_its_quota(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no image can be mounted (an ordinary user), the daemon measures the state dir
    and stops a sandbox that outgrew its quota."""
    from agentkernel.config import parse_config
    from agentkernel.daemon.api import CreateRequest
    from agentkernel.daemon.manager import SandboxManager

    monkeypatch.setenv("AGENTKERNEL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AGENTKERNEL_RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "run").mkdir(mode=0o700)
    monkeypatch.setattr(quota, "can_mount", lambda: False)
    config, _ = parse_config({"resources": {"disk": "16m"}, "daemon": {"pools": []}})
    m = SandboxManager(config, start_threads=False)
    name = _name("rootless")
    try:
        m.create(CreateRequest(name=name, image="host", backend="namespaces"))
        state = tmp_path / "home" / "sandboxes" / name
        assert not quota.image_path(state).exists()
        from agentkernel.daemon.api import ExecRequest

        m.exec(name, ExecRequest(argv=["sh", "-c", "head -c 4M /dev/zero > /tmp/small"]))
        assert m.check_disks() == []
        m.exec(name, ExecRequest(argv=["sh", "-c", "head -c 40M /dev/zero > /tmp/big"]))
        assert m.check_disks() == [name]
        assert m.get(name).status == "stopped"
        assert any(str(e.get("reason", "")).startswith("its files outgrew")
                   for e in m.logs(name))
    finally:
        with contextlib.suppress(Exception):
            m.remove(name)
        m.close()


def test_capped_log_rotates_and_reads_back_in_order(tmp_path: Path) -> None:
    path = tmp_path / "cmd.stdout"
    with quota.CappedLog(path, cap=100) as log:
        for i in range(40):
            log.write(b"%02d\n" % i)  # 3 bytes each: 120 in all
    data = quota.read_log(path)
    assert data.startswith(quota.LOG_MARKER)
    body = data[len(quota.LOG_MARKER):]
    assert len(body) <= 100 and body.endswith(b"39\n")
    small = tmp_path / "small.stdout"
    with quota.CappedLog(small, cap=100) as log:
        log.write(b"hello\n")
    assert quota.read_log(small) == b"hello\n"


def test_mountinfo_names_are_unescaped(tmp_path: Path) -> None:
    assert quota._unescape(r"/a\040b\134c") == "/a b\\c"
    assert not quota.is_mounted(tmp_path)
