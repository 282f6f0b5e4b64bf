"""The always-denied egress set from a moderate microVM (QEMU user networking in a fenced,
slirp4netns-served namespace): the host's own addresses, private, link-local and CGNAT
addresses stay out of reach; the test host answers; DNS through the guest's 10.0.2.3 works."""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

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


def first_resolver_answers() -> bool:
    for line in Path("/etc/resolv.conf").read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["nameserver"] and len(parts) > 1 and ":" not in parts[1]:
            query = struct.pack(">HHHHHH", 9, 0x0100, 1, 0, 0, 0) + \
                b"\x09localhost\x00\x00\x01\x00\x01"
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(3)
                try:
                    s.sendto(query, (parts[1], 53))
                    return s.recv(512)[:2] == query[:2]
                except OSError:
                    return False
    return False


def test_moderate_vm_dns_still_answers(moderate_vm: Sandbox) -> None:
    """QEMU asks the host's resolvers (often in a denied range): the fence steers those
    queries to slirp4netns's forwarder, so the guest's 10.0.2.3 keeps answering."""
    if not first_resolver_answers():
        pytest.skip("this host's own resolver does not answer")
    out, err, _ = moderate_vm.client.exec(
        ["sh", "-c", "nslookup localhost 10.0.2.3"]).wait(60)
    text = (out + err).decode(errors="replace")
    assert "timed out" not in text and "no servers could be reached" not in text, text
    assert "Address" in text, text
