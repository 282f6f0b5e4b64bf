"""A microVM's egress gate when agentkernel runs as an ordinary user (host `nobody`, the
real CLI with the system's python3): QEMU's user networking in a namespace of the user's
own, whose one way out is the gate. The guest's first commands: a DNS query (answered by
the gate), the suite's test host (reached), a private address the test host also serves
(refused), the gate's own port through QEMU's loopback alias (refused). One boot (TCG)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_helpers import SYSTEM_PYTHON, NetnsHost, ak_as_user

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")]

NOBODY = 65534


@pytest.fixture
def nobody_vm_home(microvm_ready: None) -> Iterator[Path]:
    """A home for nobody holding a copy of the suite's prepared guest (kernel, initramfs,
    base disk: `setup --microvm` again would cost ~30 s), its paths rewritten."""
    if shutil.which("setpriv") is None or not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip("needs setpriv and the system's python3")
    from agentkernel.paths import data_dir

    src = data_dir() / "microvm"
    home = Path(tempfile.mkdtemp(prefix="ak-nobody-vm-", dir="/tmp"))
    try:
        (home / "project").mkdir()
        dst = home / "data" / "microvm"
        # The KVM probe's verdict is root's: nobody cannot open /dev/kvm here anyway.
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("kvm-probe.json"))
        for doc in dst.rglob("*.json"):
            doc.write_text(doc.read_text().replace(str(src), str(dst)))
        for top, dirs, files in os.walk(home):
            for name in [top, *(os.path.join(top, n) for n in dirs + files)]:
                os.chown(name, NOBODY, NOBODY)
        home.chmod(0o755)
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_rootless_vm_reaches_the_allowed_host_only(nobody_vm_home: Path,
                                                   netns_host: NetnsHost) -> None:
    kind, private = next(iter(netns_host.denied.items()))
    script = (f"nslookup localhost 10.0.2.3; echo '#allowed'; "
              f"nc -w 5 {netns_host.addr} {netns_host.port} </dev/null; echo '#private'; "
              f"nc -w 3 {private} {netns_host.port} </dev/null; echo '#gate'; "
              f"nc -w 3 10.0.2.2 15001 </dev/null; echo '#end'")
    proc = ak_as_user(NOBODY, nobody_vm_home, "run", "-B", "microvm", "-p", "moderate", "-i",
                      "busybox", "--", "sh", "-c", script, cwd=nobody_vm_home / "project",
                      env={"AGENTKERNEL_MICROVM_ALLOW_EMULATION": "1"}, timeout=170)
    out, err = proc.communicate(timeout=180)
    why = (out, err[-2000:])
    assert proc.returncode == 0, why
    dns, rest = out.split("#allowed", 1)
    allowed, rest = rest.split("#private", 1)
    denied, rest = rest.split("#gate", 1)
    gate, _ = rest.split("#end", 1)
    assert "Server:" in dns and "127.0.0.1" not in dns, why  # the gate's, loopback dropped
    assert "test-host-hello" in allowed, why
    assert "test-host-hello" not in denied, (kind, why)
    assert f"{private}:{netns_host.port} REFUSED" in err, (kind, why)  # by the gate
    assert "test-host-hello" not in gate and "127.0.0.1:15001 REFUSED" in err, why
