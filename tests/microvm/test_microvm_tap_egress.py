"""The moderate profile's network for TAP-only VMMs (Firecracker), proven with a QEMU guest.

Firecracker cannot run here, but its egress path is ours: a TAP device in a private network
namespace, NATed out through slirp4netns. A QEMU guest on that same TAP (QEMU speaks TAP
too) shows what a Firecracker guest would get: the outside world (a test host in a network
namespace this suite creates), never the host's loopback, nothing in the namespace itself.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel.agent.client import AgentClient
from agentkernel.backends.microvm import ROOT_SERIAL, module_args
from agentkernel.network import (
    TAP_EGRESS_GUEST,
    TAP_EGRESS_HOST,
    TAP_EGRESS_PREFIX,
    egress_netns,
    enter_netns,
    tap_egress,
)
from agentkernel.rootfs import host_rootfs
from agentkernel.sandbox import close_fds
from agentkernel.vm import disk
from agentkernel.vm import qemu as q
from agentkernel.vm.initramfs import ensure_initramfs
from agentkernel.vm.kernel import current_kernel
from sandbox_helpers import HostServers, NetnsHost


@pytest.fixture(scope="module")
def tap_guest(microvm_ready: None, tmp_path_factory: pytest.TempPathFactory,
              ) -> Iterator[AgentClient]:
    qemu = q.qemu_binary()
    kernel = current_kernel(None)
    assert qemu is not None and kernel is not None
    scratch = tmp_path_factory.mktemp("tapvm")
    procs: list[subprocess.Popen[bytes]] = []
    holder, life_w = egress_netns(scratch / "slirp.log", procs)
    try:
        tap = tap_egress(holder)
        root, _ = disk.ensure_root_image(host_rootfs())
        cfg = q.VmConfig(
            kernel=Path(kernel.vmlinux), initrd=ensure_initramfs(kernel),
            agent_args=["--mount-basics", *module_args(kernel.modules, net=True),
                        "--root", ROOT_SERIAL, "--rw", "tmpfs",
                        "--net", f"{TAP_EGRESS_GUEST}/{TAP_EGRESS_PREFIX},{TAP_EGRESS_HOST}",
                        "--hostname", "tapvm", "--vport", q.AGENT_PORT, "--poweroff"],
            accel="tcg", vcpus=1, memory_mb=256, serial_log=scratch / "console.log",
            agent_socket=scratch / "agent.sock", drives=[q.Drive(root, ROOT_SERIAL, True)])
        bus = "pci" if cfg.arch == "aarch64" else "device"
        argv = [*enter_netns(holder), *q.build_argv(qemu, cfg),
                "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                "-device", f"virtio-net-{bus},netdev=n0"]
        with open(scratch / "qemu.log", "wb") as log:
            vmm = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                   pass_fds=(life_w,), start_new_session=True)
        close_fds(life_w)
        life_w = -1  # its number may be reused by the agent socket below
        procs.insert(0, vmm)
        client = AgentClient.from_socket(q.connect_agent_socket(cfg.agent_socket, vmm, 120))
        client.hello(timeout=30)
        yield client
        with contextlib.suppress(Exception):
            client.shutdown()
        client.close()
    finally:
        close_fds(life_w)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


def sh(client: AgentClient, script: str) -> str:
    out, err, _ = client.exec(["sh", "-c", script]).wait(60)
    return (out + err).decode(errors="replace")


@pytest.mark.skipif(os.geteuid() != 0, reason="the test host's namespace needs root")
def test_guest_on_the_egress_tap_reaches_the_outside(tap_guest: AgentClient,
                                                     netns_host: NetnsHost) -> None:
    out = sh(tap_guest, f"nc -w 5 {netns_host.addr} {netns_host.port} </dev/null")
    assert "test-host-hello" in out


def test_guest_on_the_egress_tap_cannot_reach_the_host(tap_guest: AgentClient,
                                                       loopback_server: int) -> None:
    out = sh(tap_guest, "ip -4 addr show eth0; ip route")
    assert TAP_EGRESS_GUEST in out and f"default via {TAP_EGRESS_HOST}" in out
    # slirp4netns's gateway (--disable-host-loopback), the namespace's own end of the TAP,
    # and the guest's own loopback: the host's 127.0.0.1 server answers on none of them.
    for target in ("10.0.2.2", TAP_EGRESS_HOST, "127.0.0.1"):
        out = sh(tap_guest, f"nc -w 3 {target} {loopback_server} </dev/null; echo rc=$?")
        assert "host-loopback-secret" not in out, target


@pytest.mark.skipif(os.geteuid() != 0, reason="the test hosts need root")
def test_guest_on_the_egress_tap_is_fenced(tap_guest: AgentClient, netns_host: NetnsHost,
                                           host_address_servers: HostServers) -> None:
    """The fence covers what the namespace forwards for its TAP guest, not only what it
    sends itself: the host's own addresses and private ranges stay out of reach."""
    for addr in host_address_servers.addrs:
        if ":" not in addr:
            out = sh(tap_guest, f"nc -w 3 {addr} {host_address_servers.port} </dev/null")
            assert "host-own-secret" not in out, addr
    for kind, addr in netns_host.denied.items():
        out = sh(tap_guest, f"nc -w 3 {addr} {netns_host.port} </dev/null")
        assert "test-host-hello" not in out, kind
