"""The always-denied egress set: what a sandbox with egress (moderate) can never reach.

Attacks from real moderate sandboxes on each backend: servers on the host's own addresses
(its real interfaces and the host's end of the test veth, an address outside every denied
range, so only the enumeration of the host's addresses can stop it), servers on RFC 1918,
link-local and CGNAT addresses of a test network namespace routed from the host, the cloud
metadata addresses, slirp's gateway; the sandbox first tries to tear the rules down. The
test host at 198.18.N.2 must still answer, and DNS through slirp's 10.0.2.3 (UDP and TCP).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import sandbox_helpers
from agentkernel import egress
from agentkernel.errors import SandboxError
from engines import skip_for_ordinary_users
from sandbox_helpers import HostServers, NetnsHost, ak, ak_as_user

NETWORKS = egress.denied_networks()

# Runs inside the sandbox and on the host: one DNS query for `localhost` to `server` over
# UDP and over TCP; what came back.
DNS_QUERY_CODE = r"""
import socket, struct
def dns(server):
    query = struct.pack(">HHHHHH", 0x4B1D, 0x0100, 1, 0, 0, 0)
    query += b"\x09localhost\x00\x00\x01\x00\x01"
    found = {}
    try:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.settimeout(5)
        u.sendto(query, (server, 53))
        found["dns-udp"] = "answered" if u.recv(512)[:2] == query[:2] else "replied"
    except OSError as e:
        found["dns-udp"] = "blocked " + type(e).__name__
    try:
        t = socket.create_connection((server, 53), timeout=5)
        t.sendall(struct.pack(">H", len(query)) + query)
        data = t.recv(512)
        found["dns-tcp"] = ("answered" if data[2:4] == query[:2] else
                            "replied" if data else "closed")
    except OSError as e:
        found["dns-tcp"] = "blocked " + type(e).__name__
    return found
"""
# Runs inside the sandbox: try to remove the fence, then connect to every [label, host,
# port] of argv[1] (JSON) and query slirp's DNS; print one JSON object.
PROBE = DNS_QUERY_CODE + r"""
import json, subprocess, sys
for argv in (["iptables", "-F"], ["iptables", "-P", "OUTPUT", "ACCEPT"], ["ip6tables", "-F"],
             ["iptables", "-t", "nat", "-F"], ["ip", "route", "add", "198.51.100.0/24",
             "dev", "lo"]):
    try:
        subprocess.run(argv, capture_output=True, timeout=10)
    except OSError:
        pass
out = {}
for label, host, port in json.loads(sys.argv[1]):
    try:
        s = socket.create_connection((host, port), timeout=3)
        out[label] = "reached " + s.recv(100).decode().strip()
    except OSError as e:
        out[label] = "blocked " + type(e).__name__
out.update(dns("10.0.2.3"))
print(json.dumps(out))
"""


# --- the set itself ----------------------------------------------------------------------


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.8.9.10", "10.0.2.2", "10.1.2.3", "172.16.0.1", "172.31.255.254",
    "192.168.1.1", "169.254.169.254", "169.254.0.1", "100.100.100.200", "100.64.0.1",
    "0.0.0.0", "224.0.0.251", "239.255.255.250", "255.255.255.255",
    "::1", "::", "fe80::1", "fd00:ec2::254", "fd12:3456::1", "fc00::1", "ff02::1",
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:8.8.8.8",
    "64:ff9b::a9fe:a9fe", "64:ff9b::10.0.0.1", "64:ff9b:1::1", "2002:a9fe:a9fe::1",
    "2002:c0a8:0101::1",
])
def test_always_denied(address: str) -> None:
    assert egress.is_denied(address, NETWORKS)


@pytest.mark.parametrize("address", [
    "198.18.77.2", "8.8.8.8", "1.1.1.1", "172.32.0.1", "192.169.0.1", "100.128.0.1",
    "2001:4860:4860::8888", "64:ff9b::808:808", "2002:808:808::1",
])
def test_public_addresses_are_not_denied(address: str) -> None:
    assert not egress.is_denied(address, NETWORKS)


def test_the_hosts_own_addresses_are_found() -> None:
    listed = egress.host_addresses()
    nets = egress.denied_networks(listed)
    out = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True,
                         check=True).stdout
    for line in out.splitlines():
        addr = line.split()[3].split("/")[0]
        assert egress.is_denied(addr, nets), (addr, listed)


def test_local_routes_are_read_from_the_fib() -> None:
    trie = """Local:
  +-- 0.0.0.0/0 3 0 5
     +-- 127.0.0.0/8 2 0 2
           |-- 127.0.0.1
              /32 host LOCAL
     |-- 203.0.113.0
        /24 host LOCAL
     |-- 192.0.2.0
        /24 link UNICAST
     |-- 192.0.2.255
        /32 link BROADCAST
"""
    assert egress._fib_local(trie) == ["127.0.0.1/32", "203.0.113.0/24", "192.0.2.255/32"]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root to load rules into a scratch network namespace")
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_rules_load(v6: bool) -> None:
    v4nets, v6nets = egress.denied_networks(egress.host_addresses())
    rules = egress.restore_file(v6nets if v6 else v4nets, v6=v6)
    binary = egress.tool("ip6tables-restore" if v6 else "iptables-restore")
    assert binary is not None
    r = subprocess.run(["unshare", "--net", binary, "--test"], input=rules, text=True,
                       capture_output=True, check=False)
    assert r.returncode == 0, r.stderr


# --- real sandboxes ----------------------------------------------------------------------


def host_resolver() -> dict[str, str]:
    """What this host's own (first, IPv4) resolver answers to the sandbox's DNS probe: what
    slirp's forwarder must answer inside too."""
    for line in Path("/etc/resolv.conf").read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["nameserver"] and len(parts) > 1 and ":" not in parts[1]:
            scope: dict[str, Any] = {}
            exec(DNS_QUERY_CODE, scope)  # the very code the sandbox runs
            found: dict[str, str] = scope["dns"](parts[1])
            return found
    return {}


def targets(servers: HostServers, host: NetnsHost) -> list[tuple[str, str, int]]:
    """[label, address, port] for every address a moderate sandbox must not reach."""
    found = [(f"host {a}", a, servers.port) for a in servers.addrs]
    found += [(f"host v4-mapped {a}", f"::ffff:{a}", servers.port)
              for a in servers.addrs if ":" not in a]
    found += [(f"{kind} {addr}", addr, host.port) for kind, addr in host.denied.items()]
    found += [("metadata", "169.254.169.254", 80), ("metadata-alibaba", "100.100.100.200", 80),
              ("slirp gateway", "10.0.2.2", servers.port)]
    return found


def probe(backend: str, profile: str, cwd: Path, todo: list[tuple[str, str, int]]
          ) -> dict[str, str]:
    r = ak("run", "-B", backend, "-p", profile, "-i", "host", "--", "python3", "-c", PROBE,
           json.dumps(todo), cwd=cwd)
    assert r.returncode == 0, r.stderr
    result: dict[str, str] = json.loads(r.stdout)
    return result


def test_moderate_reaches_only_the_outside(backend: str, project: Path, netns_host: NetnsHost,
                                           host_address_servers: HostServers) -> None:
    todo = targets(host_address_servers, netns_host)
    todo.append(("test host", netns_host.addr, netns_host.port))
    seen = probe(backend, "moderate", project, todo)
    assert seen.pop("test host") == "reached test-host-hello", seen
    dns = {k: seen.pop(k) for k in ("dns-udp", "dns-tcp")}
    reached = {k: v for k, v in seen.items() if not v.startswith("blocked")}
    assert not reached, reached
    assert len(seen) == len(todo) - 1
    # Whatever the host's resolver says (this build host's answers HTTP on TCP 53), the
    # sandbox hears it through 10.0.2.3 too; where it answers nothing, neither does slirp.
    if backend in ("namespaces", "gvisor", "docker", "podman"):  # the gate answers DNS
        assert dns == {"dns-udp": "answered", "dns-tcp": "answered"}, dns
        return
    direct = host_resolver()
    for proto in ("dns-udp", "dns-tcp"):
        if not direct.get(proto, "blocked").startswith("blocked"):
            assert dns[proto] == direct[proto], (dns, direct)


NOBODY = 65534


@pytest.fixture
def nobody_home() -> Iterator[Path]:
    """A home for host user nobody, with a project in it (pytest's tmp dirs are 0700)."""
    with sandbox_helpers.nobody_home() as home:
        yield home


@pytest.mark.parametrize("forkserver", ["0", "1"])
def test_moderate_as_an_ordinary_user(backend: str, forkserver: str, nobody_home: Path,
                                      netns_host: NetnsHost,
                                      host_address_servers: HostServers) -> None:
    """The same fence when agentkernel runs as an ordinary user: installed from the host
    through the sandbox's own user namespace (nsenter --user --net and the tools), or by
    a child of the gates' fork server that joined it (over netlink: egress_netlink)."""
    skip_for_ordinary_users(backend)
    if forkserver == "1" and backend != "namespaces":
        pytest.skip("the fork server's netlink wiring is the namespaces backend's")
    todo = targets(host_address_servers, netns_host)
    todo.append(("test host", netns_host.addr, netns_host.port))
    proc = ak_as_user(NOBODY, nobody_home, "run", "-B", backend, "-p", "moderate", "-i",
                      "host", "--", "python3", "-c", PROBE, json.dumps(todo),
                      cwd=nobody_home / "project",
                      env={"AGENTKERNEL_GATE_FORKSERVER": forkserver})
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    seen = json.loads(out)
    assert seen.pop("test host") == "reached test-host-hello", seen
    reached = {k: v for k, v in seen.items()
               if not k.startswith("dns") and not v.startswith("blocked")}
    assert not reached, reached
    assert len(seen) == len(todo) + 1  # every target but the test host, and two DNS probes


def test_gvisor_permissive_keeps_the_host_network(project: Path, netns_host: NetnsHost,
                                                  host_address_servers: HostServers,
                                                  loopback_server: int) -> None:
    """permissive gVisor's runsc has a namespace of its own now (S3), served by slirp4netns
    without a fence: it still reaches what the host reaches, the host's loopback at
    10.0.2.2 included."""
    if shutil.which("runsc") is None:
        pytest.skip("runsc is not installed")
    todo = [("test host", netns_host.addr, netns_host.port),
            ("host", netns_host.host_addr, host_address_servers.port),
            ("host loopback", "10.0.2.2", loopback_server)]
    seen = probe("gvisor", "permissive", project, todo)
    assert seen["test host"] == "reached test-host-hello", seen
    assert seen["host"] == "reached host-own-secret", seen
    assert seen["host loopback"] == "reached host-loopback-secret", seen


# --- failing closed ----------------------------------------------------------------------


@pytest.fixture(params=["no-nftables", "nftables-refuses"])
def broken_fence(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
                 ) -> Iterator[None]:
    """No way to load the rules: a kernel without nf_tables (the netlink wiring gives up
    and the tools, here `false`, fail too, as without netfilter), or one whose nf_tables
    refuses the batch (no fallback then)."""
    from agentkernel import egress_netlink

    def refuse(*_a: object, **_k: object) -> None:
        import errno

        if request.param == "no-nftables":
            raise egress_netlink.Unsupported(errno.EPROTONOSUPPORT, "no nf_tables")
        raise OSError(errno.EPERM, "nftables: refused")

    monkeypatch.setattr(egress_netlink, "load_rules", refuse)
    monkeypatch.setattr(egress, "tool", lambda name: shutil.which("false"))
    # A fork server (started by an earlier test in this process) is not patched.
    monkeypatch.setenv("AGENTKERNEL_GATE_FORKSERVER", "0")
    yield


def test_no_fence_no_sandbox(backend: str, project: Path, broken_fence: None) -> None:
    from agentkernel.backends import get_backend
    from agentkernel.profiles import get_profile
    from agentkernel.rootfs import host_rootfs
    from agentkernel.sandbox import SandboxSpec

    name = f"nofence-{os.getpid()}"
    spec = SandboxSpec(name=name, profile=get_profile("moderate"), rootfs=host_rootfs(),
                       image="host", workspace=project)
    with pytest.raises(SandboxError, match=r"could not (fence|set up the sandbox's egress gate)"):
        get_backend(backend).start(spec).destroy()
    # An engine's conmon may take a moment to leave after its container is removed.
    deadline = time.monotonic() + 15
    while True:
        left = [p for p in os.listdir("/proc") if p.isdigit() and name.encode() in
                _cmdline(p)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not left, [_cmdline(p)[:300] for p in left]


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
