"""`agentkernel doctor`: which isolation this host really offers, and why not the rest."""

from __future__ import annotations

import json
import os
import platform
import shutil
from dataclasses import asdict, dataclass

from .backends import BACKEND_NAMES, get_backend
from .errors import AgentKernelError


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def kvm_verdict() -> Check:
    """Can KVM boot a standard (non-PVM) Linux guest here? Decided from what the host shows."""
    from .vm.kvm import kvm_verdict as verdict

    ok, detail = verdict()
    return Check("kvm", ok, detail)


def backend_checks() -> list[Check]:
    """Each backend's deep probe and, for those `auto` may pick, a fresh functional probe
    (a real sandbox; its verdict replaces the cached one the runs read)."""
    from .backends import AUTO_ORDER
    from .backends.functional import verdict

    backends: list[Check] = []
    for name in BACKEND_NAMES:
        try:
            backend = get_backend(name)
        except AgentKernelError as exc:
            backends.append(Check(name, False, exc.message))
            continue
        probe = backend.probe(deep=True)
        detail = f"{backend.isolation}; {probe.detail}"
        ok = probe.ok
        if ok and name in AUTO_ORDER:
            seen = verdict(backend, fresh=True)
            ok = seen.ok
            detail += (f"; functional probe passed ({seen.detail})" if seen.ok else
                       f"; starts, but its functional probe failed: {seen.detail} "
                       f"(auto skips it; --backend {name} forces it)")
        backends.append(Check(name, ok, detail))
    return backends


def auto_choice() -> tuple[str, list[str]]:
    """What `--backend auto` picks now (from the verdicts just stored), and what it skips."""
    from .backends import choose

    try:
        choice = choose("auto")
    except AgentKernelError as exc:
        return "none", [exc.message]
    return choice.backend.name, list(choice.skipped)


def gather() -> tuple[list[Check], list[Check], tuple[str, list[str]]]:
    from .cgroups import detect

    backends = backend_checks()
    host: list[Check] = [kvm_verdict()]
    support = detect()
    host.append(Check("cgroups", support.memory or support.pids or support.cpu, support.explain()))
    from .egress import tool
    from .network import tun_problem

    slirp = shutil.which("slirp4netns")
    tun = tun_problem()
    fence = tool("iptables-restore")
    host.append(Check("egress network", slirp is not None and tun is None and fence is not None,
                      "slirp4netns missing: the moderate profile's egress network needs it"
                      if slirp is None else tun or
                      ("iptables missing: the moderate profile's egress network needs it to "
                       "fence off the host and private networks" if fence is None else
                       f"slirp4netns at {slirp}, fenced with {fence}")))
    host.append(_egress_gate_check(fence))
    host.append(unix_guard_check())
    if os.geteuid() == 0:
        host.append(owned_userns_check())
    for binary in ("ak-agent", "ak-seccomp", "ak-enter", "ak-logcap"):
        from .paths import native_binary

        try:
            host.append(Check(binary, True, str(native_binary(binary))))
        except AgentKernelError as exc:
            host.append(Check(binary, False, exc.message))
    from .vm.settings import doctor_lines

    host.extend(Check(name, ok, detail) for name, ok, detail in doctor_lines())
    return backends, host, auto_choice()


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 without Landlock (its syscalls are 444.. on
    every architecture)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    abi = libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(int(abi), 0)


def owned_userns_check() -> Check:
    """Whether a root-started sandbox's user namespace can be made as the range's own
    root (idmap.new_userns), so that what the sandbox holds is charged to it alone."""
    from .idmap import owned_userns_problem

    problem = owned_userns_problem()
    if problem is None:
        return Check("sandbox user namespaces", True, "made as each sandbox's own root")
    return Check("sandbox user namespaces", False,
                 f"cannot be made as a sandbox's own root ({problem}): host root makes "
                 "them, and what sandboxes hold (inotify instances, queued signals) counts "
                 "against host root's own share")


def unix_guard_check() -> Check:
    """Whether the agent's unix-socket guard (`--guard-unix`) can run here (Linux 5.8:
    pidfd_getfd, statx's mount id) and whether Landlock scopes abstract sockets (ABI 6)."""
    try:
        version = tuple(int(x) for x in platform.release().split("-")[0].split(".")[:2])
    except ValueError:
        version = (0, 0)
    if version < (5, 8):
        return Check("unix-socket guard", False,
                     f"Linux {platform.release()} is older than 5.8: namespaces, docker and "
                     "podman sandboxes cannot start (the agent refuses to run unguarded)")
    abi = landlock_abi()
    abstract = (f"abstract sockets scoped by Landlock (ABI {abi})" if abi >= 6 else
                f"abstract sockets NOT scoped (Landlock ABI {abi} < 6): permissive with "
                "network shares the host's")
    return Check("unix-socket guard", True,
                 "namespaces, docker, podman: no connect() or datagram to a host server's "
                 f"unix socket in a bound dir (seccomp notification, mount check); {abstract}"
                 "; gvisor and microvm reach no host socket")


def _egress_gate_check(fence: str | None) -> Check:
    """Which egress enforcement each backend gets here (egress_gate)."""
    from .egress import tool
    from .paths import which

    missing = [n for n, p in (("ip", which("ip") or tool("ip")), ("iptables-restore", fence))
               if p is None]
    try:
        import cryptography  # noqa: F401 - secrets' TLS interception
        secrets = ("secrets (TLS interception) on namespaces, gvisor, microvm (a writable "
                   "guest root), docker and podman")
    except ImportError:
        secrets = "no secrets: the cryptography package is missing"
    if missing:
        return Check("egress gate", False, f"{' and '.join(missing)} missing: moderate "
                                           "sandboxes cannot start (apt install iproute2 "
                                           "iptables)")
    return Check("egress gate", True,
                 "namespaces, gvisor, microvm (QEMU user networking), docker and podman "
                 "(the container's namespace, wired from the host): every TCP connection "
                 "and DNS query through the per-sandbox gate (allow/deny lists, SNI/Host, "
                 "pinned DNS); microvm with vmm = firecracker: slirp4netns with the "
                 f"always-denied fence only (lists refused); {secrets}")


def doctor(as_json: bool = False) -> int:
    from .config import configure_microvm_here

    configure_microvm_here()  # the user's and the project's [microvm], as a run would see
    backends, host, (auto, skipped) = gather()
    if as_json:
        print(json.dumps({
            "host": {"kernel": platform.release(), "arch": platform.machine(),
                     "uid": os.getuid()},
            "backends": [asdict(c) for c in backends],
            "checks": [asdict(c) for c in host],
            "auto": auto,
            "auto_skipped": skipped,
        }, indent=2))
        return 0 if auto != "none" else 1
    print(f"Host: Linux {platform.release()} {platform.machine()}, uid {os.getuid()}")
    print("\nBackends:")
    for c in backends:
        print(f"  {'ok ' if c.ok else 'no '} {c.name:<11} {c.detail}")
    print("\nHost facilities:")
    for c in host:
        print(f"  {'ok ' if c.ok else 'no '} {c.name:<15} {c.detail}")
    print(f"\n`--backend auto` picks: {auto}")
    for line in skipped:
        print(f"  {line}")
    return 0 if auto != "none" else 1
