"""A sandbox's egress wiring over netlink, from the calling thread: no process per step.

What `ip -batch` (egress_gate.ip_batch), `iptables-restore` (rules_v4) and
`ip6tables-restore` (rules_v6) do to a sandbox's own network namespace, as messages this
thread sends from inside it (a thread that joined it with setns): one nftables batch
(atomic: all rules or none) and a few rtnetlink requests. Three tool processes cost ~5 ms of
CPU per sandbox; this costs well under one. The rules are the same rules, in nftables'
own terms: in table `ip agentkernel`, a nat chain on the output hook (priority -100, as
iptables' nat OUTPUT) redirects TCP and DNS to the gate's ports and returns for loopback;
a filter chain (priority 0) accepts loopback and what was redirected (conntrack status
DNAT) and rejects everything else (ICMP admin-prohibited); `ip6 agentkernel` accepts
loopback and rejects everything else.

`Unsupported` means nothing was changed (a kernel without nf_tables): the caller wires
with the tools instead. Any other failure is an OSError, and the sandbox does not start.
"""

from __future__ import annotations

import errno
import functools
import os
import queue
import socket
import struct
import threading
from collections.abc import Callable, Iterable

# netlink, rtnetlink (linux/netlink.h, linux/rtnetlink.h, linux/if_link.h, linux/veth.h)
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_APPEND = 1, 4, 0x200, 0x400, 0x800
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000
RTM_NEWLINK, RTM_GETLINK, RTM_NEWADDR, RTM_NEWROUTE = 16, 18, 20, 24
IFLA_IFNAME, IFLA_LINKINFO, IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 3, 18, 1, 2, 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_OIF, RTA_GATEWAY = 4, 5
RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST, RTNH_F_ONLINK = 254, 3, 0, 1, 4
IFF_UP = 1
LOOPBACK_IFINDEX = 1  # lo is the first device of every network namespace
CLONE_NEWNET = 0x40000000

# nfnetlink, nf_tables (linux/netfilter/nfnetlink.h, linux/netfilter/nf_tables.h)
NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 16, 17
NFT_MSG_NEWTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_NEWRULE = 0, 3, 6
NFPROTO_IPV4, NFPROTO_IPV6 = 2, 10
NF_INET_LOCAL_OUT = 3
NF_ACCEPT = 1
NFT_REG_VERDICT, NFT_REG_1 = 0, 1
NFT_CMP_EQ, NFT_CMP_NEQ = 0, 1
NFT_META_OIF, NFT_META_L4PROTO = 5, 16
NFT_PAYLOAD_TRANSPORT_HEADER = 2
NFT_CT_STATUS = 2
IPS_DST_NAT = 0x20
NFT_REJECT_ICMP_UNREACH = 0
ICMP_PKT_FILTERED = 13  # iptables' icmp-admin-prohibited
ICMPV6_ADM_PROHIBITED = 1  # ip6tables' icmp6-adm-prohibited
TABLE = "agentkernel"
MAX_REPLY = 65536


class Unsupported(OSError):
    """This kernel has no nf_tables for us: nothing was changed."""


def wire_here(sandbox_dev: str, peer_dev: str, address: str, prefix: int, gateway: str,
              tcp_port: int, dns_port: int, *, loopback_dns: bool = False) -> None:
    """Load the rules, then set up the devices, in this thread's network namespace."""
    load_rules(tcp_port, dns_port, loopback_dns=loopback_dns,
               ipv6=os.path.exists("/proc/net/if_inet6"))
    devices(sandbox_dev, peer_dev, address, prefix, gateway)


# --- messages --------------------------------------------------------------------------


def _attr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def _nest(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(attrs))


def _str(kind: int, text: str) -> bytes:
    return _attr(kind, text.encode() + b"\0")


def _u32be(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack(">I", value & 0xFFFFFFFF))


def _msg(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def _nfgen(family: int, res_id: int = 0) -> bytes:
    return struct.pack("=BB", family, 0) + struct.pack(">H", res_id)


# --- nftables expressions --------------------------------------------------------------


def _expr(name: str, *attrs: bytes) -> bytes:
    return _nest(1, _str(1, name), _nest(2, *attrs))  # NFTA_LIST_ELEM{NAME, DATA}


def _data(kind: int, value: bytes) -> bytes:
    return _nest(kind, _attr(1, value))  # {NFTA_DATA_VALUE}


def _meta(key: int) -> bytes:
    return _expr("meta", _u32be(1, NFT_REG_1), _u32be(2, key))  # DREG, KEY


def _cmp(value: bytes, op: int = NFT_CMP_EQ) -> bytes:
    return _expr("cmp", _u32be(1, NFT_REG_1), _u32be(2, op), _data(3, value))


def _verdict(code: int) -> bytes:
    # IMMEDIATE{DREG verdict, DATA{VERDICT{CODE}}}
    return _expr("immediate", _u32be(1, NFT_REG_VERDICT),
                 _nest(2, _nest(2, _u32be(1, code))))


def _oif_lo() -> list[bytes]:
    return [_meta(NFT_META_OIF), _cmp(struct.pack("=I", LOOPBACK_IFINDEX))]


def _l4(proto: int) -> list[bytes]:
    return [_meta(NFT_META_L4PROTO), _cmp(bytes([proto]))]


def _redirect(port: int) -> list[bytes]:
    return [_expr("immediate", _u32be(1, NFT_REG_1), _data(2, struct.pack(">H", port))),
            _expr("redir", _u32be(1, NFT_REG_1))]  # REDIR_REG_PROTO_MIN


def _udp_dport(port: int) -> list[bytes]:
    return [*_l4(socket.IPPROTO_UDP),
            _expr("payload", _u32be(1, NFT_REG_1), _u32be(2, NFT_PAYLOAD_TRANSPORT_HEADER),
                  _u32be(3, 2), _u32be(4, 2)),  # DREG, BASE, OFFSET, LEN
            _cmp(struct.pack(">H", port))]


def _ct_dnat() -> list[bytes]:
    return [_expr("ct", _u32be(1, NFT_REG_1), _u32be(2, NFT_CT_STATUS)),
            _expr("bitwise", _u32be(1, NFT_REG_1), _u32be(2, NFT_REG_1), _u32be(3, 4),
                  _data(4, struct.pack("=I", IPS_DST_NAT)), _data(5, b"\0\0\0\0")),
            _cmp(b"\0\0\0\0", NFT_CMP_NEQ)]


def _reject(code: int) -> list[bytes]:
    return [_expr("reject", _u32be(1, NFT_REJECT_ICMP_UNREACH), _attr(2, bytes([code])))]


def ruleset(tcp_port: int, dns_port: int, *, loopback_dns: bool = False, ipv6: bool = True
            ) -> list[tuple[int, str, str, int, list[list[bytes]]]]:
    """(family, chain, type, priority, rules) for every chain: rules_v4 and rules_v6 in
    nftables' terms (rules_v6 only with `ipv6`: a kernel without IPv6 has no ip6 family,
    and no IPv6 to reject). Pure."""
    dns = [*_udp_dport(53), *_redirect(dns_port)]
    nat = [*([dns] if loopback_dns else []),
           [*_oif_lo(), _verdict(NF_ACCEPT)],  # the sandbox's own addresses: no NAT
           [*_l4(socket.IPPROTO_TCP), *_redirect(tcp_port)],
           *([] if loopback_dns else [dns])]
    accept_lo = [*_oif_lo(), _verdict(NF_ACCEPT)]
    filter4 = [accept_lo, [*_ct_dnat(), _verdict(NF_ACCEPT)], _reject(ICMP_PKT_FILTERED)]
    filter6 = [accept_lo, _reject(ICMPV6_ADM_PROHIBITED)]
    return [(NFPROTO_IPV4, "nat-out", "nat", -100, nat),
            (NFPROTO_IPV4, "filter-out", "filter", 0, filter4),
            *([(NFPROTO_IPV6, "filter-out", "filter", 0, filter6)] if ipv6 else [])]


def batch(chains: Iterable[tuple[int, str, str, int, list[list[bytes]]]], seq: int = 1
          ) -> tuple[bytes, int]:
    """One nftables transaction making every table, chain and rule: the bytes and how
    many acknowledgements to expect."""
    subsys = NFNL_SUBSYS_NFTABLES << 8
    create = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE
    out = [_msg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, _nfgen(0, NFNL_SUBSYS_NFTABLES))]
    tables: set[int] = set()
    for family, chain, kind, priority, rules in chains:
        if family not in tables:
            tables.add(family)
            out.append(_msg(subsys | NFT_MSG_NEWTABLE, create, seq + len(out),
                            _nfgen(family) + _str(1, TABLE)))
        hook = _nest(4, _u32be(1, NF_INET_LOCAL_OUT), _u32be(2, priority))
        out.append(_msg(subsys | NFT_MSG_NEWCHAIN, create, seq + len(out),
                        _nfgen(family) + _str(1, TABLE) + _str(3, chain) + hook
                        + _u32be(5, NF_ACCEPT) + _str(7, kind)))
        for exprs in rules:
            out.append(_msg(subsys | NFT_MSG_NEWRULE, create | NLM_F_APPEND, seq + len(out),
                            _nfgen(family) + _str(1, TABLE) + _str(2, chain)
                            + _nest(4, *exprs)))
    acks = len(out) - 1
    out.append(_msg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq + len(out),
                    _nfgen(0, NFNL_SUBSYS_NFTABLES)))
    return b"".join(out), acks


def load_rules(tcp_port: int, dns_port: int, *, loopback_dns: bool = False,
               ipv6: bool = True) -> None:
    """The rules (`ruleset`) as one transaction; Unsupported if this kernel has no
    nf_tables (nothing loaded), OSError if it refused them (nothing loaded either)."""
    data, acks = _batch_of(tcp_port, dns_port, loopback_dns, ipv6)
    try:
        sock = _open(NETLINK_NETFILTER)
    except OSError as exc:
        raise Unsupported(exc.errno, f"no nfnetlink: {exc.strerror}") from None
    with sock:
        errors = _exchange(sock, data, acks)
    if errors:
        # The transaction is atomic: on any error nothing was loaded.
        code = -errors[0]
        if code in (errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT, errno.ENOENT, errno.EOPNOTSUPP):
            raise Unsupported(code, f"nftables: {os.strerror(code)}")  # no nf_tables here
        raise OSError(code, f"nftables: {os.strerror(code)}")


@functools.lru_cache(maxsize=8)
def _batch_of(tcp_port: int, dns_port: int, loopback_dns: bool, ipv6: bool
              ) -> tuple[bytes, int]:
    """`batch(ruleset(...))`, built once per process for each set of its arguments: the
    same bytes for every sandbox (~0.2 ms of Python each, on the daemon's start path)."""
    return batch(ruleset(tcp_port, dns_port, loopback_dns=loopback_dns, ipv6=ipv6))


def _open(protocol: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
    try:
        sock.settimeout(5.0)
        sock.bind((0, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def _exchange(sock: socket.socket, data: bytes, acks: int) -> list[int]:
    """Send `data`, read `acks` acknowledgements: the errors among them (negative)."""
    sock.send(data)
    errors: list[int] = []
    seen = 0
    while seen < acks:
        reply = sock.recv(MAX_REPLY)
        if not reply:
            raise OSError("netlink: no answer")
        pos = 0
        while pos + 16 <= len(reply):
            size, kind = struct.unpack_from("=IH", reply, pos)
            if size < 16 or pos + size > len(reply):
                raise OSError("netlink: malformed answer")
            if kind == NLMSG_ERROR:
                seen += 1
                code = struct.unpack_from("=i", reply, pos + 16)[0]
                if code:
                    errors.append(code)
            pos += (size + 3) & ~3
    return errors


# --- devices ---------------------------------------------------------------------------


def _ifinfo(index: int = 0, up: bool = False) -> bytes:
    flags = IFF_UP if up else 0
    return struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, flags, flags)


def devices(sandbox_dev: str, peer_dev: str, address: str, prefix: int, gateway: str) -> None:
    """lo up; a veth pair whose both ends stay here, up; the address; the default route."""
    create = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    peer = _attr(VETH_INFO_PEER, _ifinfo() + _str(IFLA_IFNAME, peer_dev))
    link = _nest(IFLA_LINKINFO, _str(IFLA_INFO_KIND, "veth"), _nest(IFLA_INFO_DATA, peer))
    with _open(socket.NETLINK_ROUTE) as sock:
        # Up only once both ends exist (a veth end without its peer refuses: ENOTCONN).
        _check(_exchange(sock, b"".join([
            _msg(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, 1, _ifinfo(LOOPBACK_IFINDEX, up=True)),
            _msg(RTM_NEWLINK, create, 2, _ifinfo() + _str(IFLA_IFNAME, sandbox_dev) + link),
        ]), 2), "link")
        index, peer_index = _index(sock, sandbox_dev), _index(sock, peer_dev)
        addr = socket.inet_aton(address)
        ifa = struct.pack("=BBBBI", socket.AF_INET, prefix, 0, RT_SCOPE_UNIVERSE, index)
        route = struct.pack("=BBBBBBBBI", socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT,
                            RT_SCOPE_UNIVERSE, RTN_UNICAST, RTNH_F_ONLINK)
        _check(_exchange(sock, b"".join([
            _msg(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, 4, _ifinfo(peer_index, up=True)),
            _msg(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, 5, _ifinfo(index, up=True)),
            _msg(RTM_NEWADDR, create, 6, ifa + _attr(IFA_LOCAL, addr) + _attr(IFA_ADDRESS, addr)),
            _msg(RTM_NEWROUTE, create, 7, route + _attr(RTA_GATEWAY, socket.inet_aton(gateway))
                 + _attr(RTA_OIF, struct.pack("=I", index))),
        ]), 4), "address and route")


def _index(sock: socket.socket, name: str) -> int:
    sock.send(_msg(RTM_GETLINK, NLM_F_REQUEST, 3, _ifinfo() + _str(IFLA_IFNAME, name)))
    reply = sock.recv(MAX_REPLY)
    if len(reply) < 32:
        raise OSError("netlink: short answer")
    kind = struct.unpack_from("=H", reply, 4)[0]
    if kind == NLMSG_ERROR:
        code = struct.unpack_from("=i", reply, 16)[0]
        raise OSError(-code, f"netlink: {name}: {os.strerror(-code)}")
    return int(struct.unpack_from("=i", reply, 20)[0])


def _check(errors: list[int], what: str) -> None:
    if errors:
        raise OSError(-errors[0], f"netlink ({what}): {os.strerror(-errors[0])}")


# --- from a thread of ours --------------------------------------------------------------


def wire_in(netns_fd: int, sandbox_dev: str, peer_dev: str, address: str, prefix: int,
            gateway: str, *, loopback_dns: bool = False) -> tuple[int, int]:
    """wire_here in the network namespace `netns_fd`, then the gate's TCP and UDP
    listeners on 127.0.0.1 there (made once lo is up: see egress_child.listeners_here):
    their fds. Done by a thread of ours that joins the namespace (setns moves the calling
    thread only, and needs no user namespace joined: root's case), so no process is
    made; one such thread serves every sandbox of this process (`_Wirer`), not one
    started per sandbox. Unsupported: nothing was changed."""
    from .egress_child import listeners_here
    from .egress_policy import DNS_PORT, TCP_PORT

    def work() -> tuple[int, int]:
        wire_here(sandbox_dev, peer_dev, address, prefix, gateway, TCP_PORT, DNS_PORT,
                  loopback_dns=loopback_dns)
        tcp, udp = listeners_here("127.0.0.1", TCP_PORT, DNS_PORT)
        return tcp.detach(), udp.detach()

    return _Wirer.run(netns_fd, work)


class _Job:
    """One sandbox's wiring, for the wiring thread: its namespace and what to do there."""

    __slots__ = ("done", "error", "netns", "result", "work")

    def __init__(self, netns: int, work: Callable[[], tuple[int, int]]) -> None:
        self.netns = netns
        self.work = work
        self.done = threading.Event()
        self.result: tuple[int, int] | None = None
        self.error: BaseException | None = None


class _Wirer:
    """The thread that wires sandboxes: for each job it joins the job's network namespace,
    does the work there, and goes back to the process's own before it takes the next. A
    thread started per sandbox cost a thread's start and exit each (pthread_create holds
    the GIL: ~2 % of the daemon's Python time under a stream of runs). If it cannot go
    back (setns refused), it ends, and the next job starts a new one: no work ever runs
    in the namespace a previous sandbox left it in."""

    _lock = threading.Lock()
    _jobs: queue.SimpleQueue[_Job] | None = None  # the live thread's, None: none

    @classmethod
    def run(cls, netns: int, work: Callable[[], tuple[int, int]]) -> tuple[int, int]:
        job = _Job(netns, work)
        with cls._lock:
            if cls._jobs is None:
                jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
                home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    threading.Thread(target=cls._serve, args=(jobs, home), name="egress-wire",
                                     daemon=True).start()
                except BaseException:
                    os.close(home)
                    raise
                cls._jobs = jobs
            cls._jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    @classmethod
    def _serve(cls, jobs: queue.SimpleQueue[_Job], home: int) -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        try:
            while True:
                job = jobs.get()
                try:
                    if libc.setns(job.netns, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns(net): {os.strerror(err)}")
                    job.result = job.work()
                except BaseException as exc:
                    job.error = exc
                if libc.setns(home, CLONE_NEWNET) != 0:  # stuck in the sandbox's: end
                    with cls._lock:
                        if cls._jobs is jobs:
                            cls._jobs = None
                    job.done.set()
                    _fail_all(jobs)
                    return
                job.done.set()
        finally:
            os.close(home)


def _fail_all(jobs: queue.SimpleQueue[_Job]) -> None:
    """Jobs queued for a wiring thread that ended: each fails (its sandbox does not start)."""
    while True:
        try:
            job = jobs.get_nowait()
        except queue.Empty:
            return
        job.error = OSError(errno.EIO, "the egress wiring thread could not return to its "
                                       "own network namespace")
        job.done.set()
