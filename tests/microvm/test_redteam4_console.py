"""Outside review, round 4: a microVM's guest cannot fill the host's disk through its console.

The guest's root writes the serial port as fast as it likes (`/dev/ttyS0`, `/dev/console`,
or the UART's I/O ports directly: the guest kernel is no boundary). QEMU wrote it all to
`console.log` in the sandbox's scratch dir under the runtime dir (RAM where `/run` is a
tmpfs) for as long as the VM lived: ~250 KB/s under TCG here, far more under KVM, with no
bound. Now a pipe's reader keeps the first `CONSOLE_MAX_BYTES` and QEMU's later writes are
dropped; the VM goes on working. Attacked as root (the backend's own sandbox) and as host
`nobody` (the real CLI); one TCG boot each.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agentkernel.sandbox import Sandbox
from agentkernel.vm.qemu import CONSOLE_MAX_BYTES
from sandbox_helpers import SYSTEM_PYTHON, ak_as_user

pytestmark = pytest.mark.timeout(300)

NOBODY = 65534
# More than the cap, small enough for TCG's slow UART (~250 KB/s here).
FLOOD = CONSOLE_MAX_BYTES + 300_000
WRITE = f"head -c {FLOOD} /dev/zero | tr '\\0' A > /dev/ttyS0; echo rc=$?"


def test_guest_console_flood_is_bounded_on_the_host(vm_factory: Callable[..., Sandbox]) -> None:
    sandbox = vm_factory(f"rt4-console-{os.getpid()}", "restrictive")
    try:
        assert sandbox.scratch is not None
        log = Path(sandbox.scratch) / "console.log"
        out, err, code = sandbox.client.exec(["sh", "-c", WRITE]).wait(120)
        assert code.code == 0 and b"rc=0" in out, (out, err)
        # (A UART write returns once QEMU took the byte: all of it reached QEMU by now.)
        assert log.stat().st_size <= CONSOLE_MAX_BYTES, log.stat().st_size
        # QEMU dropped the rest and lives on: the VM still answers, and still writes its
        # console without growing the file.
        out, err, code = sandbox.client.exec(
            ["sh", "-c", "echo more > /dev/ttyS0; echo alive"]).wait(60)
        assert code.code == 0 and out == b"alive\n", (out, err)
        assert log.stat().st_size <= CONSOLE_MAX_BYTES
    finally:
        sandbox.destroy()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")
def test_guest_console_flood_is_bounded_as_an_ordinary_user(microvm_ready: None,
                                                           tmp_path: Path) -> None:
    if shutil.which("setpriv") is None or not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip("needs setpriv and the system's python3")
    from agentkernel.paths import data_dir

    home = Path(subprocess.run(["mktemp", "-d", "/tmp/ak-rt4-vm-XXXXXX"], check=True,
                               capture_output=True, text=True).stdout.strip())
    try:
        (home / "project").mkdir()
        src, dst = data_dir() / "microvm", home / "data" / "microvm"
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("kvm-probe.json"))
        for doc in dst.rglob("*.json"):
            doc.write_text(doc.read_text().replace(str(src), str(dst)))
        subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(home)], check=True)
        home.chmod(0o755)
        # The guest floods its console, then holds still while the host looks at the file.
        script = f"{WRITE}; sleep 10; echo alive"
        proc = ak_as_user(NOBODY, home, "run", "-B", "microvm", "-p", "restrictive", "-i",
                          "busybox", "--", "sh", "-c", script, cwd=home / "project",
                          env={"AGENTKERNEL_MICROVM_ALLOW_EMULATION": "1"}, timeout=240)
        biggest = -1
        while proc.poll() is None:
            for log in (home / "run" / "sandboxes").glob("*/console.log"):
                with contextlib.suppress(FileNotFoundError):
                    biggest = max(biggest, log.stat().st_size)
            time.sleep(0.2)
        out, err = proc.communicate()
        assert proc.returncode == 0 and "rc=0" in out and "alive" in out, (out, err)
        assert biggest >= 0, "never saw the VM's console.log"
        assert biggest <= CONSOLE_MAX_BYTES, biggest
    finally:
        shutil.rmtree(home, ignore_errors=True)
