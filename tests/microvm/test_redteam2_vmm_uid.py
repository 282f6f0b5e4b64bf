"""Outside review, round 2: whom a root-started microVM's QEMU belongs to on the host.

QEMU dropped to the host's `nobody` (65534): every root-started VM shared that uid with
each other and with whatever else runs as `nobody` on the host. The owner of QEMU's own
user namespace, host `nobody` holds every capability in it: any process of host `nobody`
could trace QEMU, read its memory and environment, and open its disk images and sockets
through /proc/PID/fd (the guest's disk, the agent's channel), and one VM's escaped QEMU
could do the same to every other.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from pathlib import Path

import pytest

from agentkernel.sandbox import Sandbox

NOBODY = 65534


def _qemu_pid(sandbox: Sandbox) -> int:
    """QEMU: the process below the VM's setpriv/unshare whose executable is QEMU's."""
    todo = [sandbox.process.pid]
    while todo:
        pid = todo.pop()
        try:
            if "qemu-system" in os.readlink(f"/proc/{pid}/exe"):
                return pid
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        todo += [int(k) for k in kids]
    raise AssertionError("no QEMU process under the sandbox")


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def _as_nobody(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", "--", *argv],
                          capture_output=True, timeout=30, check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="QEMU drops its ids only when root starts it")
def test_root_started_vmm_is_not_the_hosts_nobody(restrictive_vm: Sandbox) -> None:
    qemu = _qemu_pid(restrictive_vm)
    assert _uid(qemu) != NOBODY, "QEMU runs as the host's nobody, shared with other VMs"
    # Another local user (here: nobody) reaches nothing of it through /proc.
    assert _as_nobody("head", "-c", "1", f"/proc/{qemu}/environ").returncode != 0
    fds = os.listdir(f"/proc/{qemu}/fd")
    opened = [fd for fd in fds
              if _as_nobody("test", "-r", f"/proc/{qemu}/fd/{fd}").returncode == 0]
    assert not opened, f"host nobody can open QEMU's fds {opened}"
    out, _err, _status = restrictive_vm.client.exec(["echo", "ok"]).wait(60)
    assert out == b"ok\n"  # the VM still works under its own ids


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(k) for k in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            continue
        out += kids
        todo += kids
    return out


@pytest.mark.timeout(300)
@pytest.mark.skipif(os.geteuid() != 0, reason="QEMU drops its ids only when root starts it")
def test_snapshot_template_vmm_is_not_the_hosts_nobody(microvm_ready: None,
                                                       vm_project: Path) -> None:
    """The template VM every clone is restored from booted as host nobody: traced during
    its boot, its saved memory (every later clone's guest) was another user's to choose."""
    from agentkernel.backends.microvm import MicrovmBackend
    from agentkernel.profiles import get_profile
    from agentkernel.rootfs import host_rootfs
    from agentkernel.sandbox import SandboxSpec
    from agentkernel.vm import snapshot

    for old in snapshot.snapshots_dir().glob(f"*{snapshot.STATE_SUFFIX}"):
        old.unlink()  # the next snapshot start builds a template afresh
    seen: dict[int, int] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.05):
            for pid in _descendants(os.getpid()):
                with contextlib.suppress(OSError, AssertionError):
                    if "qemu-system" in os.readlink(f"/proc/{pid}/exe"):
                        seen[pid] = _uid(pid)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    saved = os.environ.get("AGENTKERNEL_MICROVM_SNAPSHOT")
    os.environ["AGENTKERNEL_MICROVM_SNAPSHOT"] = "1"
    try:
        spec = SandboxSpec(name=f"vmrt2-{os.getpid()}", profile=get_profile("restrictive"),
                           rootfs=host_rootfs(), image="busybox", workspace=vm_project)
        sandbox = MicrovmBackend().start(spec)
        sandbox.destroy()
    finally:
        done.set()
        watcher.join()
        if saved is None:
            os.environ.pop("AGENTKERNEL_MICROVM_SNAPSHOT", None)
        else:
            os.environ["AGENTKERNEL_MICROVM_SNAPSHOT"] = saved
    assert list(snapshot.snapshots_dir().glob(f"*{snapshot.STATE_SUFFIX}")), "no template"
    assert len(seen) >= 2, seen  # the template's QEMU and the clone's
    assert NOBODY not in seen.values(), f"QEMU uids seen: {seen}"
