"""The always-denied egress set from a moderate microVM (QEMU user networking in a
namespace whose one way out is the sandbox's egress gate): the host's own addresses,
private, link-local and CGNAT addresses stay out of reach; the test host answers; DNS
through the guest's 10.0.2.3 is the gate's."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from agentkernel.sandbox import Sandbox
from sandbox_helpers import HostServers, NetnsHost

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(os.geteuid() != 0, reason="the test hosts need root")]


def nc(vm: Sandbox, addr: str, port: int) -> str:
    out, err, _ = vm.client.exec(["sh", "-c", f"nc -w 3 {addr} {port} </dev/null"]).wait(60)
    return (out + err).decode(errors="replace")


def test_moderate_vm_reaches_only_the_outside(moderate_vm: Sandbox, netns_host: NetnsHost,
                                              host_address_servers: HostServers) -> None:
    assert "test-host-hello" in nc(moderate_vm, netns_host.addr, netns_host.port)
    for addr in host_address_servers.addrs:
        if ":" not in addr:  # QEMU's user-mode stack gives the guest IPv4 only
            assert "host-own-secret" not in nc(moderate_vm, addr, host_address_servers.port)
    for kind, addr in netns_host.denied.items():
        assert "test-host-hello" not in nc(moderate_vm, addr, netns_host.port), kind


def test_moderate_vm_dns_is_the_gates(moderate_vm: Sandbox) -> None:
    """QEMU asks the host's resolvers for the guest (often in a denied range, or on the
    host's loopback): the gate's rules send those queries to its own resolver, which
    answers and drops what is always denied (localhost's loopback address)."""
    out, err, _ = moderate_vm.client.exec(["nslookup", "localhost", "10.0.2.3"]).wait(60)
    text = (out + err).decode(errors="replace")
    log = (moderate_vm.scratch / "egress.log").read_text()
    why = (text, log, (moderate_vm.scratch / "egress-gate.err").read_text())
    assert "timed out" not in text and "no servers could be reached" not in text, why
    assert "127.0.0.1" not in text, text
    assert '"host":"localhost"' in log and '"dropped":["127.0.0.1"]' in log, log


def test_fresh_vms_first_dns_and_connection(vm_factory: Callable[..., Sandbox],
                                            netns_host: NetnsHost) -> None:
    """The very first thing fresh VMs do, a DNS query then a connection, is answered:
    once, a gate's first answers went to the guest from the wrong address (its UDP
    listener was bound before the namespace's loopback was up) and every query of that
    resolver socket timed out. Two fresh VMs (TCG boots are slow)."""
    for i in range(2):
        vm = vm_factory(f"vmtest-first{i}-{os.getpid()}", "moderate")
        try:
            out, err, _ = vm.client.exec(["sh", "-c", (
                "nslookup localhost 10.0.2.3; "
                f"nc -w 5 {netns_host.addr} {netns_host.port} </dev/null")]).wait(60)
            text = (out + err).decode(errors="replace")
            why = (text, (vm.scratch / "egress.log").read_text(errors="replace"))
            assert "timed out" not in text and "no servers could be reached" not in text, why
            assert "Server:" in text and "test-host-hello" in text, why
        finally:
            vm.destroy()
