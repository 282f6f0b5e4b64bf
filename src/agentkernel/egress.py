"""The always-denied egress set (host, private, link-local, metadata addresses) and its fence."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BackendUnavailable, SandboxError
from .paths import which

# slirp4netns's fixed addresses (network.py starts it): the sandbox namespace's one way
# out, and its DNS forwarder — the one denied address a sandbox may reach (port 53).
SLIRP_DNS = "10.0.2.3"
SLIRP_DEV = "tap0"

if TYPE_CHECKING:
    from ipaddress import IPv4Network, IPv6Network

CHAIN = "ak-egress"

# (network, why). Whatever is listed here no sandbox with egress reaches, on any backend;
# a later egress policy adds allow/deny lists *on top* of this set, never instead of it.
ALWAYS_DENIED_V4: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "this network (0.0.0.0 is the host itself)"),
    ("127.0.0.0/8", "loopback"),
    ("10.0.0.0/8", "RFC 1918 private"),
    ("172.16.0.0/12", "RFC 1918 private"),
    ("192.168.0.0/16", "RFC 1918 private"),
    ("100.64.0.0/10", "carrier-grade NAT (RFC 6598)"),
    ("169.254.0.0/16", "link-local"),
    ("169.254.169.254/32", "cloud metadata (AWS, GCP, Azure, OpenStack)"),
    ("100.100.100.200/32", "cloud metadata (Alibaba)"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved, and the broadcast address 255.255.255.255"),
)
ALWAYS_DENIED_V6: tuple[tuple[str, str], ...] = (
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::ffff:0:0/96", "IPv4-mapped (never valid on the wire)"),
    ("64:ff9b:1::/48", "local-use NAT64 (RFC 8215)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("fc00::/7", "unique local (ULA)"),
    ("fd00:ec2::254/128", "cloud metadata (AWS)"),
    ("ff00::/8", "multicast"),
)
# IPv6 prefixes that embed an IPv4 address (NAT64, 6to4): each denied IPv4 network is
# denied in these forms too, so a translator cannot carry a sandbox back to it.
EMBEDDING_V6 = (("64:ff9b::", 96), ("2002::", 16))


def host_addresses() -> list[str]:
    """Every address of this host, as networks: IPv4 from the kernel's local routes (every
    interface, aliases and `ip route add local` ranges included), IPv6 from if_inet6.

    Read in the network namespace slirp4netns runs in: the one its connections leave from.
    """
    try:
        trie = Path("/proc/net/fib_trie").read_text()
    except OSError as exc:
        raise SandboxError(f"cannot list the host's addresses to fence them off: {exc}") from exc
    found = _fib_local(trie)
    try:
        inet6 = Path("/proc/net/if_inet6").read_text()
    except FileNotFoundError:
        inet6 = ""  # IPv6 is off in this kernel
    for line in inet6.splitlines():
        hexaddr = line.split()[0] if line.strip() else ""
        if len(hexaddr) == 32:
            found.append(":".join(hexaddr[i:i + 4] for i in range(0, 32, 4)) + "/128")
    return found


def _fib_local(trie: str) -> list[str]:
    """The LOCAL and BROADCAST entries of /proc/net/fib_trie, as `addr/prefix`."""
    found: list[str] = []
    last = ""
    for line in trie.splitlines():
        word = line.strip()
        if word.startswith("|-- "):
            last = word[4:]
        elif last and word.startswith("/") and word.endswith((" LOCAL", " BROADCAST")):
            found.append(f"{last}/{word.split()[0][1:]}")
    return list(dict.fromkeys(found))  # each table lists them again


def denied_networks(
    extra: Iterable[str] = (),
) -> tuple[list[IPv4Network], list[IPv6Network]]:
    """The always-denied set plus `extra` (the host's addresses), collapsed, with every
    IPv4 network also in its NAT64 and 6to4 forms."""
    v4, v6 = _denied(tuple(sorted(extra)))
    return list(v4), list(v6)


@lru_cache(maxsize=4)
def _denied(extra: tuple[str, ...]) -> tuple[tuple[IPv4Network, ...], tuple[IPv6Network, ...]]:
    """denied_networks, computed once per set of host addresses (~2 ms): a gate forked by
    egress_forkserver finds it computed already while the host's addresses stay the same."""
    from ipaddress import IPv4Network, IPv6Network, collapse_addresses, ip_network

    v4: list[IPv4Network] = [IPv4Network(n) for n, _ in ALWAYS_DENIED_V4]
    v6: list[IPv6Network] = [IPv6Network(n) for n, _ in ALWAYS_DENIED_V6]
    for text in extra:
        net = ip_network(text, strict=False)
        if isinstance(net, IPv4Network):
            v4.append(net)
        else:
            v6.append(net)
    v4 = list(collapse_addresses(v4))
    for base, bits in EMBEDDING_V6:
        head = int(IPv6Network(f"{base}/{bits}").network_address)
        shift = 128 - bits - 32
        v6 += [IPv6Network((head | int(n.network_address) << shift, bits + n.prefixlen))
               for n in v4]
    return tuple(v4), tuple(collapse_addresses(v6))


def is_denied(address: str, networks: tuple[list[IPv4Network], list[IPv6Network]]) -> bool:
    """Whether `address` falls in `networks` (as returned by denied_networks)."""
    from ipaddress import ip_address

    addr = ip_address(address)
    return any(addr in net for net in (networks[0] if addr.version == 4 else networks[1]))


def restore_file(networks: list[IPv4Network] | list[IPv6Network], v6: bool) -> str:
    """An iptables-restore / ip6tables-restore input that rejects `networks` for everything
    sent from the namespace (OUTPUT) or through it (FORWARD: a VMM's TAP guest), except to
    the namespace's own loopback, replies coming back in from slirp4netns, and, for IPv4,
    DNS to slirp's forwarder."""
    reject = "icmp6-adm-prohibited" if v6 else "icmp-admin-prohibited"
    # IPv6: the kernel's own neighbour discovery on tap0 (fe80::/10, ff00::/8) is rejected
    # too. Harmless while slirp4netns runs without IPv6; allow it when IPv6 egress comes.
    # The built-in chains are not declared: with the nf_tables backend that alone creates
    # every base chain (INPUT too) and costs ~10 ms; a fresh namespace has nothing to flush.
    lines = ["*filter", f":{CHAIN} - [0:0]",
             "-A OUTPUT -o lo -j ACCEPT",  # the namespace's own addresses: its business
             f"-A OUTPUT -j {CHAIN}",
             # slirp4netns only ever sends in what answers the namespace's own connections
             # (it forwards no ports): those go on to a TAP guest in a private range.
             f"-A FORWARD -i {SLIRP_DEV} -j ACCEPT",
             f"-A FORWARD -j {CHAIN}"]
    if not v6:
        lines += [f"-A {CHAIN} -d {SLIRP_DNS}/32 -p {proto} --dport 53 -j RETURN"
                  for proto in ("udp", "tcp")]
    lines += [f"-A {CHAIN} -d {net} -j REJECT --reject-with {reject}" for net in networks]
    lines.append("COMMIT")
    if not v6:
        lines += _dns_redirect()
    return "\n".join(lines) + "\n"


def _dns_redirect() -> list[str]:
    """nat rules that send DNS meant for the host's own (non-loopback) resolvers to slirp's
    forwarder instead: QEMU's user-mode stack in the namespace asks the resolvers of the
    host's resolv.conf, which are often in a denied range. Same answers, no new reach."""
    servers: list[str] = []
    try:
        text = Path("/etc/resolv.conf").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver" and "." in parts[1] \
                and ":" not in parts[1] and not parts[1].startswith("127."):
            servers.append(parts[1])
    if not servers:
        return []
    rules = ["*nat"]
    rules += [f"-A {chain} -d {server}/32 -p {proto} --dport 53 -j DNAT "
              f"--to-destination {SLIRP_DNS}:53"
              for chain in ("OUTPUT", "PREROUTING") for server in servers
              for proto in ("udp", "tcp")]
    rules.append("COMMIT")
    return rules


def tool(name: str) -> str | None:
    """A packet-filter tool: on PATH, or in the sbin dirs an ordinary user's PATH lacks."""
    found = which(name)
    if found is None:
        for directory in ("/usr/sbin", "/sbin"):
            path = os.path.join(directory, name)
            if os.access(path, os.X_OK):
                return path
    return found


class Fence:
    """The always-denied set being loaded into a sandbox's network namespace (`enter`: the
    argv prefix that runs a command in it). `wait()` before anything untrusted runs there:
    it fails closed, with SandboxError, and the caller does not start the sandbox.

    Loading takes ~10 ms; starting it first lets slirp4netns come up meanwhile (nothing
    but our own agent or VMM is in the namespace until the caller's start returns). The
    sandboxed code holds no capability, so it can neither change nor remove the rules.
    """

    def __init__(self, enter: list[str]) -> None:
        v4, v6 = denied_networks(host_addresses())
        names = ["iptables-restore"]
        if os.path.exists("/proc/net/if_inet6"):  # else the kernel has no IPv6 to fence
            names.append("ip6tables-restore")
        binaries = {name: tool(name) for name in names}
        missing = [name for name, path in binaries.items() if path is None]
        if missing:
            raise BackendUnavailable(
                f"egress networking needs {' and '.join(missing)} to fence the sandbox off "
                "the host and private networks (apt install iptables), or use --no-network")
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        for name, binary in binaries.items():
            rules = restore_file(v6, v6=True) if name.startswith("ip6") else \
                restore_file(v4, v6=False)
            proc = subprocess.Popen([*enter, str(binary)], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    close_fds=True, bufsize=0)
            self.procs.append((name, proc))
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):  # it failed: wait() says why
                proc.stdin.write(rules.encode())  # read whole before it writes a byte
                proc.stdin.close()

    def wait(self) -> None:
        failures = []
        for name, proc in self.procs:
            assert proc.stderr is not None and proc.stdin is not None
            with contextlib.suppress(OSError):
                proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            err = proc.stderr.read().decode(errors="replace").strip()
            proc.stderr.close()
            if proc.returncode != 0:
                failures.append(f"{name}: {err or proc.returncode}")
        if failures:
            raise SandboxError("could not fence the sandbox's network off the host and "
                               f"private networks, so it does not start: {'; '.join(failures)}"
                               " (or use --no-network)")

    def abandon(self) -> None:
        for _, proc in self.procs:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()


def fence(enter: list[str]) -> None:
    """Load the always-denied set into a namespace and wait for it (see Fence)."""
    Fence(enter).wait()
