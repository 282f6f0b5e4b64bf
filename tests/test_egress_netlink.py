"""The egress wiring over netlink (egress_netlink): the batch's shape, and the rules it
loads attacked for real in a fresh network namespace (root)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentkernel import egress_netlink as nl

SRC = str(Path(nl.__file__).resolve().parents[1])


def _messages(data: bytes) -> list[tuple[int, int]]:
    out, pos = [], 0
    while pos < len(data):
        size, kind, flags = struct.unpack_from("=IHH", data, pos)
        assert size >= 16 and size % 4 == 0
        out.append((kind, flags))
        pos += size
    assert pos == len(data)
    return out


def test_batch_is_one_transaction_with_an_ack_per_message() -> None:
    data, acks = nl.batch(nl.ruleset(15001, 15053))
    msgs = _messages(data)
    assert msgs[0][0] == nl.NFNL_MSG_BATCH_BEGIN and msgs[-1][0] == nl.NFNL_MSG_BATCH_END
    inner = msgs[1:-1]
    assert acks == len(inner)
    assert all(flags & nl.NLM_F_ACK for _, flags in inner)
    # two tables (ip, ip6), three chains, 3 + 3 + 2 rules
    kinds = [kind & 0xFF for kind, _ in inner]
    assert kinds.count(nl.NFT_MSG_NEWTABLE) == 2
    assert kinds.count(nl.NFT_MSG_NEWCHAIN) == 3
    assert kinds.count(nl.NFT_MSG_NEWRULE) == 8


def test_loopback_dns_redirects_before_loopback_returns() -> None:
    plain = nl.ruleset(15001, 15053)[0][4]
    vmm = nl.ruleset(15001, 15053, loopback_dns=True)[0][4]
    dns = plain[-1]
    assert vmm[0] == dns and vmm[1:] == plain[:-1]


# Runs as root in a fresh network namespace: wire it, stand in for the gate, then try
# every way out. Prints one JSON object.
PROBE = r"""
import json, socket, sys
from agentkernel import egress_netlink as nl
from agentkernel.egress_child import listeners_here
nl.wire_here("eth0", "akgw0", "10.0.2.100", 24, "10.0.2.2", 15001, 15053)
tcp, udp = listeners_here("127.0.0.1", 15001, 15053)
udp.settimeout(1)
out = {}
c = socket.create_connection(("203.0.113.7", 443), timeout=3)  # any TCP: to the gate
conn, _ = tcp.accept()
out["tcp"] = "gate" if conn else "?"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(b"q", ("203.0.113.7", 53))  # DNS: to the gate
out["dns"] = "gate" if udp.recvfrom(16)[0] == b"q" else "?"
for label, fam, addr in (("udp", socket.AF_INET, ("203.0.113.7", 123)),
                         ("udp6", socket.AF_INET6, ("2001:db8::7", 53))):
    try:
        u = socket.socket(fam, socket.SOCK_DGRAM)
        u.settimeout(1)
        u.sendto(b"x", addr)
        u.recv(16)
        out[label] = "answered"
    except OSError as e:
        out[label] = "blocked " + type(e).__name__
    try:
        udp.recvfrom(16)
        out[label] += " reached the gate"
    except OSError:
        pass
try:
    socket.create_connection(("2001:db8::7", 443), timeout=2)
    out["tcp6"] = "connected"
except OSError as e:
    out["tcp6"] = "blocked " + type(e).__name__
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
socket.create_connection(srv.getsockname(), timeout=2)  # its own loopback: its business
out["loopback"] = "ok"
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a fresh network namespace as root")
def test_rules_send_tcp_and_dns_to_the_gate_and_nothing_else_out() -> None:
    r = subprocess.run(["unshare", "--net", "--", sys.executable, "-c", PROBE],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": SRC}, check=False)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen["tcp"] == "gate" and seen["dns"] == "gate", seen
    assert seen["udp"].startswith("blocked") and "gate" not in seen["udp"], seen
    assert seen["udp6"].startswith("blocked") and "gate" not in seen["udp6"], seen
    assert seen["tcp6"].startswith("blocked"), seen
    assert seen["loopback"] == "ok", seen


@pytest.mark.skipif(os.geteuid() != 0, reason="a fresh network namespace as root")
def test_wiring_twice_fails_instead_of_half_applying() -> None:
    """A namespace that already has our devices refuses a second wiring (fail closed)."""
    code = ("from agentkernel import egress_netlink as nl\n"
            "nl.wire_here('eth0', 'akgw0', '10.0.2.100', 24, '10.0.2.2', 15001, 15053)\n"
            "try:\n"
            "    nl.devices('eth0', 'akgw0', '10.0.2.100', 24, '10.0.2.2')\n"
            "except OSError as e:\n"
            "    print('refused', e.errno)\n")
    r = subprocess.run(["unshare", "--net", "--", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": SRC}, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("refused 17"), r.stdout  # EEXIST


def test_no_ipv6_family_where_the_kernel_has_no_ipv6() -> None:
    chains = nl.ruleset(15001, 15053, ipv6=False)
    assert {family for family, *_ in chains} == {nl.NFPROTO_IPV4}
    _data, acks = nl.batch(chains)
    assert acks == 1 + 2 + 3 + 3  # one table, two chains, 3 + 3 rules


def _netns_holder() -> subprocess.Popen[bytes]:
    """A process alone in a fresh network namespace (until killed)."""
    proc = subprocess.Popen(["unshare", "--net", "--", "sleep", "60"])
    own = os.stat("/proc/self/ns/net").st_ino
    for _ in range(2000):
        try:
            if os.stat(f"/proc/{proc.pid}/ns/net").st_ino != own:
                return proc
        except FileNotFoundError:
            pass
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("unshare --net did not make a namespace")


def _socket_netns(fd: int) -> int:
    """The inode of the network namespace a socket was made in (SIOCGSKNS)."""
    import fcntl

    ns = fcntl.ioctl(fd, 0x894C)
    try:
        return os.fstat(ns).st_ino
    finally:
        os.close(ns)


def _wiring_threads() -> list[int]:
    import threading

    return [t.native_id for t in threading.enumerate()
            if t.name == "egress-wire" and t.native_id is not None]


@pytest.mark.skipif(os.geteuid() != 0, reason="fresh network namespaces as root")
def test_one_wiring_thread_serves_each_namespace_and_always_goes_home() -> None:
    """The wiring thread is shared by every sandbox: each one's listeners are made in its
    own namespace, a job that fails (a descriptor that is no namespace) changes nothing
    for the next, and between jobs the thread is back in this process's namespace (no
    sandbox's wiring, and nothing else it runs, lands in another sandbox's)."""
    own = os.stat("/proc/self/ns/net").st_ino
    holders = [_netns_holder() for _ in range(2)]
    try:
        for i, proc in enumerate(holders):
            if i == 1:
                with open("/proc/self/stat", "rb") as not_a_namespace, \
                        pytest.raises(OSError, match="setns"):
                    nl.wire_in(not_a_namespace.fileno(), "eth0", "akgw0", "10.0.2.100", 24,
                               "10.0.2.2")
            ns = os.open(f"/proc/{proc.pid}/ns/net", os.O_RDONLY)
            try:
                fds = nl.wire_in(ns, "eth0", "akgw0", "10.0.2.100", 24, "10.0.2.2")
            finally:
                os.close(ns)
            try:
                target = os.stat(f"/proc/{proc.pid}/ns/net").st_ino
                assert [_socket_netns(fd) for fd in fds] == [target, target]
            finally:
                for fd in fds:
                    os.close(fd)
            threads = _wiring_threads()
            assert len(threads) == 1, threads
            assert os.stat(f"/proc/self/task/{threads[0]}/ns/net").st_ino == own
    finally:
        for proc in holders:
            proc.kill()
            proc.wait()
