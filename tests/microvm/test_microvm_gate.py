"""The egress gate in front of a microVM (QEMU user networking, TCG here): the guest's
connections and DNS queries are QEMU's own sockets, in a namespace whose only way out is
the sandbox's gate. Real guests (busybox) against the suite's test upstream: an allow-list
holds (by name, pinned DNS, Host), private and metadata addresses stay refused, refusals
are in `egress log`, a live update opens a host. (Secrets, and every client and bypass of
issue 11's list, are in test_microvm_matrix.py: one boot of a guest with those clients.)"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel.sandbox import Sandbox
from sandbox_helpers import SYSTEM_PYTHON, ShellProbe, Upstream, ak, make_upstream

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_egress_policy import UPSTREAM_NAMES, hosts

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(os.geteuid() != 0, reason="the test upstream needs root")]

TCP_PORT_PROBE = "10.0.2.2"  # QEMU's view of its namespace's loopback: the gate's listeners


@pytest.fixture(scope="module")
def upstream(microvm_ready: None) -> Iterator[Upstream]:
    with make_upstream(UPSTREAM_NAMES) as up:
        server = Path(__file__).resolve().parent.parent / "egress_upstream.py"
        up.serve(SYSTEM_PYTHON, str(server), str(up.dir / "srv.pem"), str(up.dir / "srv.key"))
        yield up


def sh(vm: Sandbox, script: str) -> str:
    out, err, _ = vm.client.exec(["sh", "-c", script], env={"PATH": "/bin:/usr/bin"},
                                 cwd="/").wait(180)
    return (out + err).decode(errors="replace")


def marked(text: str) -> dict[str, str]:
    """`@label value...` lines of a guest script's output, by label."""
    seen: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"@(\S+) ?(.*)", line)
        if m:
            seen[m.group(1)] = (seen.get(m.group(1), "") + " " + m.group(2)).strip()
    return seen


def probe_script(up: Upstream) -> str:
    from agentkernel.egress_proxy import TCP_PORT

    p = ShellProbe(wget_timeout=10)  # the guest's busybox wget has no timeout of its own
    return "".join([*p.common(up), p.nc("gate-itself", TCP_PORT_PROBE, TCP_PORT),
                    p.get("other", "http://other.test:18080/")])


def test_allow_list_log_and_live_update(upstream: Upstream) -> None:
    from agentkernel.backends.microvm import MicrovmBackend
    from agentkernel.egress_policy import policy_for
    from agentkernel.egress_proxy import TCP_PORT
    from agentkernel.profiles import get_profile
    from agentkernel.rootfs import host_rootfs
    from agentkernel.sandbox import SandboxSpec

    name = f"vmgate-{os.getpid()}"
    policy = policy_for("egress", None, ("allowed.test", "rebind.test"), (),
                        tuple(h for h in hosts(upstream) if h != "--add-host"))
    spec = SandboxSpec(name=name, profile=get_profile("moderate"), rootfs=host_rootfs(),
                       image="busybox", egress=policy)
    vm = MicrovmBackend().start(spec)
    try:
        seen = marked(sh(vm, probe_script(upstream)))
        assert seen.pop("http-allowed") == "hello host=allowed.test:18080 key=-", seen
        assert seen.pop("raw-allowed") == "SSH-2.0-upstream", seen
        assert "NXDOMAIN" in seen.pop("dns-denied"), seen
        assert all("hello" not in v and "SSH" not in v for v in seen.values()), seen
        log = ak("egress", name, "log")
        assert log.returncode == 0, log.stderr
        for line in ("dns denied.test REFUSED by default deny",
                     "http allowed.test:18080 allowed by allow allowed.test",
                     "http denied.test:18080 REFUSED",  # the Host sent to allowed.test's IP
                     f"tcp {upstream.private}:18022 REFUSED by always-denied address",
                     f"tcp {upstream.addr2}:18022 REFUSED by default deny",
                     # 10.0.2.2 is QEMU's namespace's loopback: the gate's own listener
                     f"tcp 127.0.0.1:{TCP_PORT} REFUSED by always-denied address"):
            assert line in log.stdout, (line, log.stdout)
        # Live: one more allowed name, at once, in the running VM.
        r = ak("egress", name, "allow", "other.test")
        assert r.returncode == 0, r.stderr
        again = marked(sh(vm, probe_script(upstream).splitlines()[-1] + "\n"))
        assert again["other"] == "hello host=other.test:18080 key=-", again
    finally:
        vm.destroy()
