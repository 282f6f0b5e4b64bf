"""Host side of the egress gate: wire a sandbox's network namespace to its policy process.

The sandbox's namespace gets no device that leads anywhere: one veth pair whose both ends
stay inside it (so there is a default route), and rules, loaded from outside before
anything untrusted runs, that redirect every TCP connection and every DNS query to the
gate process (egress_proxy) listening on its loopback, and reject everything else (other
UDP, QUIC, ICMP, all IPv6). The gate connects out from the host's namespace where the
policy allows. Nothing the sandbox does to its own namespace can open another way out: it
holds no capability, and even with the rules gone its packets would reach only the veth
peer in the same namespace, which forwards nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BackendUnavailable, NotFound, SandboxError, UsageError

if TYPE_CHECKING:
    import socket
    from collections.abc import Callable

    from .egress_policy import Policy

SANDBOX_DEV = "eth0"
PEER_DEV = "akgw0"  # the veth's other end: in the same namespace, leads nowhere
SANDBOX_ADDR = "10.0.2.100"
GATEWAY = "10.0.2.2"
RESOLVER = "10.0.2.3"  # resolv.conf's nameserver (network.SLIRP_DNS)
TRUST_NAME = "egress-trust.pem"  # system bundle + the sandbox's CA: bound in (namespaces)
LEAF_NAME = "egress-leaf.pem"  # the gate's certificate and key for the secrets' hosts
LOG_NAME = "egress.log"
CONTROL_NAME = "egress.sock"
INSTANCE_NAME = "egress-instance"  # SandboxSpec.instance of a running sandbox (GateStart.attach)
READY_TIMEOUT = 15.0
NS_GET_USERNS = 0xB701  # _IO(0xb7, 0x1): the user namespace that owns a namespace


def ip_batch() -> str:
    return "\n".join([
        "link set lo up",  # the gate listens there (bwrap brings it up; a VMM's holder not)
        f"link add {SANDBOX_DEV} type veth peer name {PEER_DEV}",
        f"link set {PEER_DEV} up",
        f"link set {SANDBOX_DEV} up",
        f"addr add {SANDBOX_ADDR}/24 dev {SANDBOX_DEV}",
        f"route add default via {GATEWAY} dev {SANDBOX_DEV} onlink",
    ]) + "\n"


def rules_v4(*, loopback_dns: bool = False) -> str:
    """`loopback_dns`: DNS to the namespace's own loopback goes to the gate too (a VMM's
    user-mode network stack asks the resolvers of the host's resolv.conf for its guest,
    often 127.0.0.53; left alone, those queries would meet an empty loopback)."""
    from .egress_policy import DNS_PORT, TCP_PORT

    dns = f"-A OUTPUT -p udp --dport 53 -j REDIRECT --to-ports {DNS_PORT}"
    return "\n".join([
        "*nat",
        *([dns] if loopback_dns else []),
        "-A OUTPUT -o lo -j RETURN",  # the sandbox's own addresses: its business
        f"-A OUTPUT -p tcp -j REDIRECT --to-ports {TCP_PORT}",
        *([] if loopback_dns else [dns]),
        "COMMIT",
        "*filter",
        "-A OUTPUT -o lo -j ACCEPT",
        "-A OUTPUT -m conntrack --ctstate DNAT -j ACCEPT",  # what was redirected to the gate
        "-A OUTPUT -j REJECT --reject-with icmp-admin-prohibited",
        "COMMIT",
    ]) + "\n"


def router_batches(router_pid: int) -> tuple[str, str]:
    """`ip -batch` inputs for a gVisor or VMM sandbox, whose network stack writes frames
    itself (its packets never meet its own namespace's rules): its namespace gets `eth0`,
    whose peer `akgw0` (the gateway, 10.0.2.2) sits in a router namespace of ours where
    the rules and the gate are."""
    sandbox_side = "\n".join([
        "link set lo up",
        f"link add {SANDBOX_DEV} type veth peer name {PEER_DEV} netns {router_pid}",
        f"addr add {SANDBOX_ADDR}/24 dev {SANDBOX_DEV}",
        f"link set {SANDBOX_DEV} up",
        f"route add default via {GATEWAY} dev {SANDBOX_DEV}",
    ]) + "\n"
    router_side = "\n".join([
        "link set lo up",
        f"addr add {GATEWAY}/24 dev {PEER_DEV}",
        # the sandbox's resolver address is on its link: answered here (ARP), redirected
        f"addr add {RESOLVER}/32 dev {PEER_DEV}",
        f"link set {PEER_DEV} up",
    ]) + "\n"
    return sandbox_side, router_side


def router_rules_v4() -> str:
    from .egress_policy import DNS_PORT, TCP_PORT

    return "\n".join([
        "*nat",
        f"-A PREROUTING -i {PEER_DEV} -p tcp -j REDIRECT --to-ports {TCP_PORT}",
        f"-A PREROUTING -i {PEER_DEV} -p udp --dport 53 -j REDIRECT --to-ports {DNS_PORT}",
        "COMMIT",
        "*filter",
        f"-A INPUT -i {PEER_DEV} -m conntrack --ctstate DNAT -j ACCEPT",
        f"-A INPUT -i {PEER_DEV} -j DROP",
        "-A FORWARD -j DROP",  # the router routes nothing: forwarding is off, and this too
        "COMMIT",
    ]) + "\n"


def router_rules_v6() -> str:
    return "\n".join(["*filter", f"-A INPUT -i {PEER_DEV} -j DROP", "-A FORWARD -j DROP",
                      "COMMIT"]) + "\n"


def router_holder(sandbox_holder: int, lifeline_r: int) -> subprocess.Popen[bytes]:
    """The router namespace for a gVisor/VMM sandbox whose namespace `sandbox_holder`
    holds: owned by the same user namespace (an ordinary user has no other way to join a
    veth across them), alive as long as the lifeline."""
    from .network import netns_holder
    from .paths import which

    if os.geteuid() == 0:
        return netns_holder(lifeline_r)
    nsenter, unshare = which("nsenter"), which("unshare")
    if nsenter is None or unshare is None:
        raise BackendUnavailable("the egress gate needs nsenter and unshare (util-linux)")
    import time

    own = os.readlink(f"/proc/{sandbox_holder}/ns/net")
    # `unshare --map-root-user` writes its uid map just after the namespace exists: joined
    # before that, we would be unmapped there, and exec would drop every capability.
    deadline = time.monotonic() + 10
    while not Path(f"/proc/{sandbox_holder}/uid_map").read_text().strip():
        if time.monotonic() > deadline:
            raise SandboxError("the sandbox's user namespace got no id map")
        time.sleep(0.001)
    holder = subprocess.Popen(
        [nsenter, f"--target={sandbox_holder}", "--user", "--preserve-credentials", "--",
         unshare, "--net", "--", "cat"], stdin=lifeline_r, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # until it is in a namespace of its own
        with contextlib.suppress(OSError):
            ns = os.readlink(f"/proc/{holder.pid}/ns/net")
            if ns != own and ns != os.readlink("/proc/self/ns/net"):
                return holder
        if holder.poll() is not None:
            break
        time.sleep(0.001)
    holder.kill()
    holder.wait()
    raise SandboxError("could not create the egress router's network namespace")


def rules_v6() -> str:
    return "\n".join([
        "*filter",
        "-A OUTPUT -o lo -j ACCEPT",
        "-A OUTPUT -j REJECT --reject-with icmp6-adm-prohibited",
        "COMMIT",
    ]) + "\n"


def write_tls(scratch: Path, policy: Policy) -> None:
    """For a sandbox with secrets: a CA of its own, the trust bundle it gets (the system's
    bundle plus that CA) and the gate's certificate for the secrets' hosts, signed by it.
    The CA's key signs that one certificate and is never written anywhere: neither the
    sandbox nor anything else can sign another. The leaf and its key (0600, in the private
    scratch dir) are read by the gate before it drops privileges, then deleted."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    hosts = sorted({h for g in policy.secrets for h in g.hosts})
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                            f"agentkernel egress {scratch.name}")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .add_extension(x509.NameConstraints([x509.DNSName(h) for h in hosts], None),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    ca_pem = ca.public_bytes(pem)
    system = b""
    with contextlib.suppress(OSError):
        system = Path("/etc/ssl/certs/ca-certificates.crt").read_bytes()[:4 * 1024 * 1024]
    (scratch / TRUST_NAME).write_bytes(system.rstrip(b"\n") + b"\n" + ca_pem)
    fd = os.open(scratch / LEAF_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(leaf.public_bytes(pem) + key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def listen_in(netns_fd: int, userns_fd: int, address: str = "127.0.0.1") -> tuple[int, int]:
    """The gate's TCP and UDP listeners (fds), made by a forked child that joins the
    sandbox's network namespace (first its user namespace, for an ordinary user) and
    hands them back (after the tools brought the namespace's addresses up: see
    listeners_here); the sandbox's first packets wait in their queues until it serves.
    As root (no user namespace to join) a thread does it instead (_listen_in_thread).
    The child (of a process that may have threads, as subprocess's preexec functions
    are) only makes system calls through modules loaded before the fork."""
    import ctypes
    import socket

    from .egress_child import listeners_here
    from .egress_policy import DNS_PORT, TCP_PORT

    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork
    if userns_fd < 0:
        return _listen_in_thread(libc, netns_fd, address)
    # SEQPACKET: a child that dies before it answers reads as an empty message (EOF)
    # here, where a datagram pair would wait forever.
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # Not even our stdio: a child that outlived us (killed between fork and answer) must
    # not hold our caller's pipes open.
    keep = sorted({netns_fd, userns_fd, right.fileno()})
    top = os.sysconf("SC_OPEN_MAX")
    pid = os.fork()
    if pid == 0:  # the child: only syscalls, then _exit
        code = 1
        try:
            # Nothing but what it needs before it joins the sandbox's user namespace: the
            # starter's other fds (a daemon's copies of other sandboxes' gate fds) stay out.
            for low, high in zip([-1, *keep], [*keep, top], strict=True):
                if high > low + 1:  # closerange(n, n) would close every fd from n on
                    os.closerange(low + 1, high)
            if userns_fd >= 0 and libc.setns(userns_fd, 0x10000000) != 0:
                raise OSError(ctypes.get_errno(), "setns(user)")
            if libc.setns(netns_fd, 0x40000000) != 0:
                raise OSError(ctypes.get_errno(), "setns(net)")
            tcp, udp = listeners_here(address, TCP_PORT, DNS_PORT)
            socket.send_fds(right, [b"k"], [tcp.fileno(), udp.fileno()])
            code = 0
        except BaseException as exc:
            with contextlib.suppress(Exception):
                right.send(f"E{exc}".encode()[:500])
        finally:
            os._exit(code)
    right.close()
    try:
        msg, fds = _child_answer(left, pid)
    finally:
        left.close()
    if msg != b"k" or len(fds) != 2:
        for fd in fds:
            os.close(fd)
        why = msg[1:].decode(errors="replace") or "its child ended without an answer"
        raise OSError(f"cannot listen in the sandbox's network namespace: {why}")
    return fds[0], fds[1]


LISTEN_CHILD_SECONDS = 30.0  # a wiring child's answer, on the most loaded host


def _child_answer(left: Any, pid: int) -> tuple[bytes, list[int]]:
    """The listen_in child's message and fds (an empty message if it timed out), the
    child reaped: killed first if it has not answered, or if we are interrupted."""
    import select
    import signal
    import socket

    msg: bytes = b""
    fds: list[int] = []
    try:
        poller = select.poll()
        poller.register(left.fileno(), select.POLLIN)
        if poller.poll(round(LISTEN_CHILD_SECONDS * 1000)):
            msg, fds, _flags, _addr = socket.recv_fds(left, 512, 2)
    finally:
        if not msg:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return msg, fds


def _listen_in_thread(libc: Any, netns_fd: int, address: str) -> tuple[int, int]:
    """listen_in without a fork, where no user namespace must be joined (root): a thread
    of ours enters the namespace (setns moves the calling thread only) and makes the
    listeners there, then ends. A fork in a process with threads (the daemon) can deadlock
    in Python's fork hooks (the import lock against logging's lock); this cannot."""
    import socket
    import threading

    from .egress_policy import DNS_PORT, TCP_PORT

    made: list[int] = []
    failed: list[BaseException] = []

    def work() -> None:
        socks: list[socket.socket] = []
        try:
            if libc.setns(netns_fd, 0x40000000) != 0:
                import ctypes

                raise OSError(ctypes.get_errno(), "setns(net)")
            socks.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            socks.append(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            for sock in socks:  # as listeners_here (made after the tools ran)
                sock.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND
            socks[0].bind((address, TCP_PORT))
            socks[0].listen(128)
            socks[1].bind((address, DNS_PORT))
            made.extend(sock.detach() for sock in socks)
        except BaseException as exc:
            failed.append(exc)
            for sock in socks:
                sock.close()

    thread = threading.Thread(target=work, name="egress-listen", daemon=True)
    thread.start()
    thread.join()
    if failed or len(made) != 2:
        raise OSError(f"cannot listen in the sandbox's network namespace: "
                      f"{failed[0] if failed else 'no sockets'}")
    return made[0], made[1]


def _sealed(name: str, data: bytes) -> int:
    """A memfd holding `data` that no one can change (sealed): an activated gate's config."""
    import fcntl

    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK
                    | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _wire_netlink(netns: int, loopback_dns: bool) -> tuple[int, int] | None:
    """A sandbox's own namespace wired as ip_batch, rules_v4 and rules_v6 say, by a
    thread of ours over netlink (egress_netlink: no tool processes), and the gate's
    listeners there; None where this kernel has no nf_tables (the tools then do it).
    Root only: an ordinary user must join the sandbox's user namespace first, which a
    process with threads cannot."""
    from .egress_netlink import Unsupported, wire_in

    try:
        return wire_in(netns, SANDBOX_DEV, PEER_DEV, SANDBOX_ADDR, 24, GATEWAY,
                       loopback_dns=loopback_dns)
    except Unsupported:
        return None
    except OSError as exc:
        raise SandboxError("could not set up the sandbox's egress gate, so it does not "
                           f"start: {exc} (or use --no-network)") from None


def _secrets_for(policy: Policy) -> list[dict[str, object]]:
    """What the gate needs of each secret, values read from the host's store now."""
    out: list[dict[str, object]] = []
    if not policy.secrets:
        return out  # (no secrets store to import)
    from .secrets_store import load

    for grant in policy.secrets:
        if not grant.placeholder:
            continue  # a pooled sandbox's slot: its secret comes with its run (grant)
        secret = load(grant.name)
        out.append({"name": grant.name, "hosts": list(grant.hosts), "header": grant.header,
                    "placeholder": grant.placeholder, "value": secret.value})
    return out


def _drop_ids(pid: int) -> tuple[int, int]:
    """Started by root: the host ids of the sandbox's own `nobody` (65534 of its range),
    for the gate to run as; (-1, -1) for an ordinary user (it stays that user)."""
    if os.geteuid() != 0:
        return -1, -1
    ids = []
    for kind in ("uid", "gid"):
        try:
            first = Path(f"/proc/{pid}/{kind}_map").read_text().split()
        except OSError as exc:  # the sandbox ended before its gate came: say why it ended
            raise SandboxError(f"the sandbox exited while it was starting ({exc.strerror})"
                               ) from None
        inside, outside, count = (int(x) for x in first[:3])
        if inside == 0 and outside == 0:
            ids.append(65534)  # a namespace without a private id range: plain nobody
            continue
        if inside != 0 or count < 65535:
            raise SandboxError("the sandbox's user namespace has no private id range for "
                               "its egress gate to run as")
        ids.append(outside + 65534)
    return ids[0], ids[1]


def _proxy_argv(fds_sock: int) -> list[str]:
    """Our own interpreter without site start-up (~15 ms less), on our own sys.path.

    `-P`: `-c` would otherwise search the current directory (a run's project, which its
    repository's authors wrote) for any module found nowhere else (subprocess's `msvcrt`),
    and run it as the gate's starter, host root before the drop."""
    paths = [p for p in sys.path if p]
    code = (f"import sys; sys.path[:0] = {paths!r}; "
            f"from agentkernel.egress_child import gate_main; gate_main({fds_sock})")
    return [sys.executable, "-P", "-S", "-c", code]


class GateStart:
    """The gate coming up for a sandbox. Spawned first (`GateStart(scratch, exit_fd=…)`):
    its interpreter starts and imports while the sandbox's namespaces are made; `attach(pid,
    policy)` once they exist loads the rules and hands it the namespace and its config;
    `wait()` before anything untrusted runs there. It fails closed: SandboxError, and the
    caller does not start the sandbox. With gates on demand (egress_forkserver.activating)
    nothing is spawned: `attach` registers the wired namespace with the fork server, and
    `wait()` returns None (no gate process until the sandbox first uses the network)."""

    def __init__(self, scratch: Path, *, exit_fd: int) -> None:
        self._tools: dict[str, str] | None = None
        self.scratch = scratch
        self.exit_fd = exit_fd
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        from . import egress_forkserver

        # On demand: no gate until the sandbox first connects (egress_forkserver.register).
        self.registration: int | None = None
        self.gate: subprocess.Popen[bytes] | None = None
        if egress_forkserver.activating():
            self.ready_r = -1
            # Ours until attach registers it: the caller may close its own now, as it may
            # once a gate of the sandbox's own has started.
            self.exit_fd = os.dup(exit_fd)
            try:
                with open(scratch / "egress-gate.err", "wb"):
                    pass  # (also what says a sandbox has a gate: scratch_of)
            except BaseException:
                os.close(self.exit_fd)
                raise
            return
        import socket

        self.ready_r, self.ready_w = os.pipe()
        self.fds, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            with open(scratch / "egress-gate.err", "wb") as err:
                self.gate = self._start(err.fileno(), theirs.fileno())
        except BaseException:
            self.fds.close()
            os.close(self.ready_r)
            raise
        finally:
            theirs.close()
            os.close(self.ready_w)

    @property
    def tools(self) -> dict[str, str]:
        """The wiring tools, looked up when first needed: a root-started sandbox's own
        namespace is wired over netlink without them (_wire_netlink)."""
        if self._tools is None:
            from .egress import tool
            from .paths import which

            tools = {"ip": which("ip") or tool("ip"),
                     "iptables-restore": tool("iptables-restore")}
            if os.path.exists("/proc/net/if_inet6"):
                tools["ip6tables-restore"] = tool("ip6tables-restore")
            missing = [name for name, path in tools.items() if path is None]
            if missing:
                raise BackendUnavailable(
                    f"the egress gate needs {' and '.join(missing)} (apt install iproute2 "
                    "iptables), or use --no-network")
            self._tools = {name: str(path) for name, path in tools.items()}
        return self._tools

    def _start(self, err: int, carrier: int) -> subprocess.Popen[bytes]:
        """The gate process: forked by the fork server (egress_forkserver), or, where
        that cannot be had, a new interpreter. `gate_fds` are the numbers its config
        names for the ready pipe and the lifeline."""
        from . import egress_forkserver

        stdin_r, stdin_w = os.pipe()
        try:
            gate = egress_forkserver.spawn(stdin_r, err, self.ready_w, self.exit_fd, carrier)
        except BaseException:
            os.close(stdin_w)
            raise
        finally:
            os.close(stdin_r)
        if gate is not None:
            self.gate_fds = egress_forkserver.GATE_FDS
            gate.stdin = open(stdin_w, "wb")  # noqa: SIM115 - closed once the config is in
            return gate
        os.close(stdin_w)
        self.gate_fds = (self.ready_w, self.exit_fd)
        return subprocess.Popen(
            _proxy_argv(carrier), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=err, pass_fds=(self.ready_w, self.exit_fd, carrier), close_fds=True,
            start_new_session=True,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"})

    def attach(self, pid: int, policy: Policy, *, router: int | None = None,
               ids: tuple[int, int] | None = None, loopback_dns: bool = False,
               instance: str = "") -> None:
        """The rules into the namespace of `pid`, and that namespace to the gate. With
        `router` (gVisor): `pid`'s namespace only gets its way to the router's, and the
        rules and the gate's listeners are in the router's. `loopback_dns` (QEMU's user
        networking, whose sockets are the guest's connections): see rules_v4. `instance`:
        SandboxSpec.instance, the audit log's key beside the name (a one-shot run's is
        made here); kept in the scratch dir for `egress NAME log --audit`."""
        import socket

        from .network import enter_netns

        try:
            if router is None:
                enter: list[str] = []  # nsenter's prefix: made only if the tools wire it
                inputs = {"ip": ip_batch(),
                          "iptables-restore": rules_v4(loopback_dns=loopback_dns),
                          "ip6tables-restore": rules_v6()}
            else:
                sandbox_side, router_side = router_batches(router)
                self._spawn("ip", [*enter_netns(pid), str(self.tools["ip"]), "-batch", "-"],
                            sandbox_side.encode())
                self._finish()  # the veth must exist before the router's side is set up
                enter = enter_netns(router)
                inputs = {"ip": router_side, "iptables-restore": router_rules_v4(),
                          "ip6tables-restore": router_rules_v6()}
            where = router if router is not None else pid
            ns = [os.open(f"/proc/{where}/ns/net", os.O_RDONLY)]
            try:
                if os.geteuid() != 0:  # the namespace's owner (not /proc/PID/ns/user:
                    # the sandbox's first process may be in one of its own below it by now)
                    import fcntl

                    ns.append(fcntl.ioctl(ns[0], NS_GET_USERNS))
                fast = _wire_netlink(ns[0], loopback_dns) if router is None and len(ns) == 1 \
                    else None
                userns = ns[1] if len(ns) > 1 else -1
                listeners = fast or self._wire(
                    ns[0], userns, enter or enter_netns(pid, userns), inputs,
                    GATEWAY if router is not None else "127.0.0.1",
                    netlink=None if router is not None else {
                        "dev": SANDBOX_DEV, "peer": PEER_DEV, "address": SANDBOX_ADDR,
                        "prefix": 24, "gateway": GATEWAY, "loopback_dns": loopback_dns})
            finally:
                for fd in ns:
                    os.close(fd)
            uid, gid = ids if ids is not None else _drop_ids(pid)
            from .egress_audit import audit_path

            audit = audit_path()
            audit.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            instance = instance or os.urandom(8).hex()
            (self.scratch / INSTANCE_NAME).write_text(instance + "\n")
            cfg = {"sandbox": self.scratch.name, "instance": instance, "uid": uid, "gid": gid,
                   "owner": os.geteuid(), "policy": policy.to_json(),
                   "secrets": _secrets_for(policy),
                   # Trust for the gate's own TLS to the secrets' hosts: the system's,
                   # or a CA file the host's user names (a corporate or test CA).
                   "upstream_ca": os.environ.get("AGENTKERNEL_EGRESS_UPSTREAM_CA")}
            if self.gate is None:
                try:
                    self._register(listeners, cfg, audit, bool(policy.secrets))
                finally:
                    for fd in listeners:
                        os.close(fd)
                return
            try:
                socket.send_fds(self.fds, [b"n"], list(listeners))
            finally:
                for fd in listeners:
                    os.close(fd)
            cfg.update({"audit": str(audit), "ready_fd": self.gate_fds[0],
                        "exit_fd": self.gate_fds[1], "log": str(self.scratch / LOG_NAME),
                        "control": str(self.scratch / CONTROL_NAME),
                        "leaf": str(self.scratch / LEAF_NAME) if policy.secrets else None})
            assert self.gate.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                self.gate.stdin.write(json.dumps(cfg).encode())
            with contextlib.suppress(OSError):
                self.gate.stdin.close()
        except BaseException:
            self.abandon()
            raise

    def _register(self, listeners: tuple[int, int], cfg: dict[str, object], audit: Path,
                  secrets: bool) -> None:
        """The sandbox's gate on demand: its listeners, lifeline, config, log and audit
        files to the fork server, which forks the gate when the sandbox first needs it.
        The config (with the secrets' values) and the leaf's key go in sealed memfds, never
        in the server's memory, where every gate it forks would find them."""
        import socket

        from . import egress_forkserver
        from .egress_audit import AuditWriter

        cfg = {**cfg, "idle": egress_forkserver.activated_idle()}
        ours: list[int] = []
        control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            control.bind(str(self.scratch / CONTROL_NAME))
            control.listen(8)
            ours.append(control.detach())
            ours.append(_sealed("ak-gate-config", json.dumps(cfg).encode()))
            ours.append(os.memfd_create("ak-gate-state", os.MFD_CLOEXEC))
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
            ours.append(os.open(self.scratch / LOG_NAME, flags, 0o600))
            writer = AuditWriter(str(audit), self.scratch.name)
            ours += [writer.fd, writer.old]
            ours.append(os.open(self.scratch / "egress-gate.err", flags, 0o600))
            if secrets:
                leaf = self.scratch / LEAF_NAME
                ours.append(_sealed("ak-gate-leaf", leaf.read_bytes()))
                leaf.unlink()  # in the memfd only now: no copy of its key on disk
            tcp, udp = listeners
            cfg_fd, state, log, audit_fd, audit_old, err, *leaf_fd = ours[1:]
            fds = [tcp, udp, ours[0], self.exit_fd, cfg_fd, state, log, audit_fd, audit_old,
                   err, *leaf_fd]
            self.registration = egress_forkserver.register(fds)
        finally:
            for fd in ours:
                os.close(fd)
        if self.registration is None:
            raise SandboxError("could not set up the sandbox's egress gate, so it does not "
                               "start: its fork server did not take it (or use --no-network)")

    def _wire(self, netns: int, userns: int, enter: list[str], inputs: dict[str, str],
              address: str, netlink: dict[str, Any] | None = None) -> tuple[int, int]:
        """The rules into the namespace `netns` and the gate's listeners there: by a child
        of the fork server (which joins it once, then wires over netlink as `netlink`
        says, or runs every tool), or else through nsenter and a forked child of ours
        (listen_in)."""
        from . import egress_forkserver

        steps = [([str(path), *(["-batch", "-"] if name == "ip" else [])], inputs[name])
                 for name, path in self.tools.items()]
        got = egress_forkserver.wire(netns, userns, steps, address, netlink)
        if got is not None:
            return got
        for name, (argv, data) in zip(self.tools, steps, strict=True):
            self._spawn(name, [*enter, *argv], data.encode())
        # The listeners only once the tools are done (as the fork server's child does):
        # a UDP socket bound before its address is up (lo, the router's gateway) sends
        # its answers from another source, which conntrack does not map back to the
        # address the query was sent to, so the client drops every answer.
        self._finish()
        return listen_in(netns, userns, address)

    def _spawn(self, name: str, argv: list[str], data: bytes) -> None:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, close_fds=True, bufsize=0)
        self.procs.append((name, proc))
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(data)  # read whole before it writes a byte
        with contextlib.suppress(OSError):
            proc.stdin.close()
        proc.stdin = None  # communicate() in wait() then only reads stderr

    def _finish(self) -> None:
        """Wait for the set-up commands started so far; SandboxError if any failed."""
        failures = []
        for name, proc in self.procs:
            try:
                _out, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                _out, err = proc.communicate()
            if proc.returncode != 0:
                failures.append(f"{name}: {err.decode(errors='replace').strip()[:300]}")
        self.procs = []
        if failures:
            raise SandboxError("could not set up the sandbox's egress gate, so it does "
                               f"not start: {'; '.join(failures)} (or use --no-network)")

    def wait(self, ready: bool = True) -> subprocess.Popen[bytes] | None:
        """The gate process, once the rules hold, its listeners exist and it serves.
        Without `ready`, not waiting for it to serve: what the sandbox sends waits in
        its listeners' queues, but a client's own timeout (a resolver's 5 s) may pass
        first on a loaded host, so every backend waits. None for a gate on demand: its
        fork server polls the listeners from now on (attach registered them)."""
        if self.gate is None:
            self._close_exit()
            self._finish()
            return None
        try:
            self._finish()
            if ready:
                poller = select.poll()  # not select(): a daemon's fds may pass FD_SETSIZE
                poller.register(self.ready_r, select.POLLIN)
                readable = poller.poll(round(READY_TIMEOUT * 1000))
                if not readable or os.read(self.ready_r, 1) != b"1":
                    raise SandboxError(f"the egress gate did not start: {self._why()}")
            elif self.gate.poll() is not None:
                raise SandboxError(f"the egress gate did not start: {self._why()}")
            return self.gate
        except BaseException:
            self.abandon()
            raise
        finally:
            os.close(self.ready_r)
            self.ready_r = -1
            self.fds.close()

    def _why(self) -> str:
        with contextlib.suppress(OSError):
            lines = (self.scratch / "egress-gate.err").read_text(
                errors="replace").strip().splitlines()
            if lines:
                return lines[-1]
        return "timed out"

    def _close_exit(self) -> None:
        if getattr(self, "gate", 0) is None and self.exit_fd >= 0:  # our dup (on demand)
            os.close(self.exit_fd)
            self.exit_fd = -1

    def __del__(self) -> None:  # a start abandoned before wait(): no fd left behind
        with contextlib.suppress(Exception):
            self._close_exit()

    def abandon(self) -> None:
        self._close_exit()
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        gate = getattr(self, "gate", None)
        if gate is not None and gate.poll() is None:
            gate.kill()
            gate.wait()


# --- the CLI's side: live updates and the log --------------------------------------------


def scratch_of(name: str) -> Path:
    from .names import validate_sandbox_name
    from .paths import runtime_dir

    validate_sandbox_name(name)
    path = runtime_dir() / "sandboxes" / name
    if not (path / "egress-gate.err").exists():
        raise NotFound(f"no running sandbox {name!r} with an egress gate")
    return path


def control(name: str, request: dict[str, str]) -> dict[str, object]:
    """Send one request to a running sandbox's gate; its reply."""
    return _request(scratch_of(name), name, request)


def grant(scratch: Path, secrets: list[dict[str, object]]) -> None:
    """Give a pooled sandbox's gate the secrets of the run that took it (name, hosts,
    header, placeholder, value each): once, for the hosts its certificate names."""
    grant_sent(scratch, secrets)()


def grant_sent(scratch: Path, secrets: list[dict[str, object]]) -> Callable[[], None]:
    """`grant`, sent: the call that waits for the gate's answer (raising as `grant`), so
    that the run's command starts meanwhile. The gate holds a connection of the sandbox to
    one of these hosts until this grant has come (egress_proxy Gate.grant_due)."""
    sock = _send(scratch, scratch.name, {"op": "grant", "secrets": secrets})

    def answered() -> None:
        _reply(sock, scratch.name)

    return answered


def wake(scratch: Path) -> None:
    """Have a sandbox's gate running now (a gate on demand is forked for a request): a
    pooled sandbox's, with slots for secrets, sets its TLS up before a run takes it."""
    _request(scratch, scratch.name, {"op": "status"})


def _request(scratch: Path, name: str, request: dict[str, Any]) -> dict[str, object]:
    return _reply(_send(scratch, name, request), name)


def _send(scratch: Path, name: str, request: dict[str, Any]) -> socket.socket:
    """A control request sent (connected to a gate that may still be starting)."""
    import socket
    import time

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    path = str(scratch / CONTROL_NAME)
    deadline = time.monotonic() + 10
    try:
        while True:  # a gate may still be starting (its sandbox was just started)
            try:
                sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        sock.sendall((json.dumps(request) + "\n").encode())
    except OSError as exc:
        sock.close()
        raise SandboxError(f"cannot reach the egress gate of {name!r}: {exc}") from None
    return sock


def _reply(sock: socket.socket, name: str) -> dict[str, object]:
    """The gate's answer to a request `_send` sent (the socket closed)."""
    data = b""
    try:
        while not data.endswith(b"\n") and len(data) < 65536:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise SandboxError(f"cannot reach the egress gate of {name!r}: {exc}") from None
    finally:
        sock.close()
    try:
        reply: dict[str, object] = json.loads(data)
    except ValueError:
        raise SandboxError(f"the egress gate of {name!r} did not answer") from None
    if not reply.get("ok"):
        raise UsageError(str(reply.get("error", "refused")))
    return reply


def format_entry(doc: dict[str, object]) -> str:
    """One log entry as a line for people, for a terminal: the names in it are what the
    sandbox sent (an SNI, a Host header, a DNS name), so nothing but printable text goes
    out; the rest is escaped (an ESC there set the viewer's terminal title, colours, ...)."""
    line = _entry_line(doc)
    if line.isprintable():
        return line
    return "".join(c if c.isprintable() else
                   f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"
                   for c in line)


def _entry_line(doc: dict[str, object]) -> str:
    if "note" in doc:
        return f"-- {doc['note']}"
    import time

    when = time.strftime("%H:%M:%S", time.localtime(float(str(doc.get("t", 0)))))
    kind = doc.get("kind", "?")
    if kind == "policy":
        return f"{when} policy {doc.get('op')} {doc.get('entry')}"
    where = doc.get("host") or doc.get("addr") or "?"
    if doc.get("port"):
        where = f"{where}:{doc['port']}"
    if kind == "close":
        return f"{when} closed {where} sent={doc.get('sent')} received={doc.get('received')}"
    verdict = "allowed" if doc.get("allowed") else "REFUSED"
    extra = ""
    if doc.get("answers"):
        extra += f" -> {','.join(map(str, doc['answers']))}"  # type: ignore[call-overload]
    if doc.get("dropped"):
        extra += f" dropped {','.join(map(str, doc['dropped']))}"  # type: ignore[call-overload]
    if doc.get("error"):
        extra += f" ({doc['error']})"
    return f"{when} {kind} {where} {verdict} by {doc.get('rule')}{extra}"


def read_log(scratch: Path, offset: int = 0) -> tuple[list[dict[str, object]], int]:
    """Entries of a gate's log from `offset` (restarting if the log started over)."""
    path = scratch / LOG_NAME
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < offset:
                offset = 0
            f.seek(offset)
            data = f.read(4 * 1024 * 1024)
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    out = []
    for line in data[:end].splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out, offset + end


def refusals(scratch: Path, limit: int = 10) -> list[str]:
    """What the gate refused during a run, as lines for stderr (at most `limit`)."""
    entries, _ = read_log(scratch)
    refused = [format_entry(e) for e in entries if e.get("allowed") is False]
    if len(refused) > limit:
        refused = [*refused[:limit], f"... and {len(refused) - limit} more"]
    return refused
