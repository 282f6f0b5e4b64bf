"""The microvm backend's Firecracker path: config file, vsock agent channel, drives, TAP.

Firecracker is not installable on the development machines (no package, no downloads), so
this path is exercised up to the point where a binary is needed: configs and requests are
schema-checked, the vsock handshake and TAP creation are tested against real sockets and
devices, the moderate profile's TAP egress path is tested with a QEMU guest on the same TAP,
and `start_firecracker` refuses clearly when the binary, KVM, a suitable kernel or network
privileges are missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from ..errors import BackendUnavailable, SandboxError
from ..network import (
    TAP_EGRESS_GUEST,
    TAP_EGRESS_HOST,
    TAP_EGRESS_PREFIX,
    egress_netns,
    empty_netns_prefix,
    enter_netns,
    run_setup,
    tap_egress,
)
from ..paths import which
from ..sandbox import Sandbox, SandboxSpec, close_fds
from ..vm import firecracker as fc
from ..vm.settings import MicrovmSettings

TAP_PREFIX = "akfc"
# Each permissive guest gets a /30 of its own: host end .1, guest .2.
TAP_NET = "172.31"


def tap_name(sandbox: str) -> str:
    """A TAP name (≤ 15 bytes, IFNAMSIZ) derived from the sandbox name."""
    return TAP_PREFIX + hashlib.sha256(sandbox.encode()).hexdigest()[:10]


def tap_addresses(name: str) -> tuple[str, str]:
    """(host end, guest end) of the /30 for TAP `name`."""
    n = int(hashlib.sha256(name.encode()).hexdigest()[:4], 16) % (256 * 64)
    third, fourth = divmod(n * 4, 256)
    return f"{TAP_NET}.{third}.{fourth + 1}", f"{TAP_NET}.{third}.{fourth + 2}"


def _ip(*args: str) -> None:
    ip = which("ip")
    if ip is None:
        raise BackendUnavailable("Firecracker networking needs the ip tool (iproute2)")
    run_setup([ip, *args], f"ip {' '.join(args)}")


def make_tap(name: str) -> Callable[[], None]:
    """Create TAP `name` with the host end of its /30 up; returns the undo."""
    if not fc.can_make_tap():
        raise BackendUnavailable(
            "Firecracker gives a guest network only through a TAP device, and creating one "
            "needs CAP_NET_ADMIN (root) and /dev/net/tun, which this process lacks: use the "
            "restrictive profile (no network) or [microvm] vmm = qemu")
    host, _ = tap_addresses(name)
    _ip("tuntap", "add", "dev", name, "mode", "tap")

    def remove() -> None:
        with contextlib.suppress(SandboxError, BackendUnavailable):
            _ip("link", "del", name)

    try:
        _ip("addr", "add", f"{host}/30", "dev", name)
        _ip("link", "set", name, "up")
    except BaseException:
        remove()
        raise
    return remove


def start_firecracker(backend_name: str, spec: SandboxSpec, settings: MicrovmSettings,
                      firecracker: str) -> Sandbox:
    """One sandbox as a Firecracker guest (needs KVM and a kernel with built-in virtio-mmio
    command-line devices, e.g. the minimal kernel)."""
    from ..agent.client import AgentClient
    from ..backends.base import make_scratch
    from ..backends.microvm_guest import (
        DEFAULT_MEMORY_MB,
        GUEST_MIN_MEMORY_MB,
        ROOT_SERIAL,
        VMM_MEMORY_OVERHEAD_MB,
        WORKSPACE_SERIAL,
        choose_accel,
        module_args,
    )
    from ..cgroups import Cgroup, Limits
    from ..vm import disk
    from ..vm.initramfs import ensure_initramfs
    from ..vm.kernel import current_kernel
    from ..vm.qemu import Drive

    kernel = current_kernel(settings.kernel)
    if kernel is None:
        raise BackendUnavailable("no guest kernel prepared: run `agentkernel setup --microvm`")
    if kernel.modules:
        # Firecracker announces its virtio-mmio devices on the kernel command line, which
        # needs CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES; Debian's modular cloud kernel lacks it.
        raise BackendUnavailable(
            f"Firecracker needs a guest kernel with virtio-mmio built in (command-line "
            f"devices); {kernel.release} ({kernel.source}) loads it as a module: build the "
            "minimal kernel (python -m agentkernel.vm.build_minimal_kernel) and set "
            "[microvm] kernel")
    initrd = ensure_initramfs(kernel)
    accel, why = choose_accel(settings, kernel=Path(kernel.vmlinux), initrd=initrd,
                              modules=kernel.modules)
    if accel != "kvm":
        raise BackendUnavailable(f"Firecracker needs a working KVM (it has no software "
                                 f"emulation): {why}")
    if spec.persistent:
        raise BackendUnavailable("kept (--keep) microVMs run under QEMU only so far (their "
                                 "agent reconnects over virtio-serial): set [microvm] vmm = "
                                 "qemu")
    p = spec.profile
    scratch = make_scratch(spec.name)
    cleanups: list[Callable[[], None]] = []
    helpers: list[subprocess.Popen[bytes]] = []
    notes: list[str] = []
    process: subprocess.Popen[bytes] | None = None
    prefix: list[str] = []
    life_w = -1
    try:
        root_image, root_desc = disk.ensure_root_image(spec.rootfs)
        drives = [Drive(root_image, ROOT_SERIAL, readonly=True)]
        tap: str | None = None
        net_arg = "lo"
        if p.network == "egress":
            # Firecracker speaks only TAP: a TAP in a private namespace whose only way out
            # is slirp4netns (--disable-host-loopback), NATed there. Firecracker holds the
            # lifeline, so the holder and slirp4netns exit with it.
            holder, life_w = egress_netns(scratch / "slirp.log", helpers)
            tap = tap_egress(holder)
            net_arg = f"{TAP_EGRESS_GUEST}/{TAP_EGRESS_PREFIX},{TAP_EGRESS_HOST}"
            prefix = enter_netns(holder)
        elif p.network == "host":
            tap = tap_name(spec.name)
            cleanups.append(make_tap(tap))
            host, guest = tap_addresses(tap)
            net_arg = f"{guest}/30,{host}"
            notes.append(f"microvm/firecracker: eth0 {guest} on TAP {tap}; the host is "
                         f"{host} (no NAT is set up for the internet)")
        args = fc.agent_args(module_args(kernel.modules, net=tap is not None, vsock=True),
                             root_serial=ROOT_SERIAL,
                             rw="tmpfs" if p.root_writable else None, hostname=spec.hostname)
        args[args.index("--net") + 1] = net_arg
        if spec.workspace is not None and p.workspace != "none":
            writable = p.workspace in ("rw", "cow")
            ws_image = scratch / "workspace.ext4"
            disk.make_workspace_image(spec.workspace, ws_image, writable=writable)
            drives.append(Drive(ws_image, WORKSPACE_SERIAL, readonly=not writable))
            at = args.index("--hostname")
            args[at:at] = ["--disk", f"{WORKSPACE_SERIAL}:/workspace:"
                                     f"{'rw' if writable else 'ro'}"]
        memory_mb = max(GUEST_MIN_MEMORY_MB, p.memory_mb or DEFAULT_MEMORY_MB)
        vm = fc.FirecrackerVm(kernel=Path(kernel.vmlinux), initrd=initrd, agent_args=args,
                              vcpus=max(1, math.ceil(p.cpus)) if p.cpus else 1,
                              memory_mb=memory_mb, vsock_uds=scratch / "vsock.sock",
                              drives=drives, tap=tap, serial_log=scratch / "console.log")
        config = fc.write_config(vm, scratch / "vm.json")
        argv = vm.argv(firecracker, config, scratch / "api.sock")
        if p.network == "none":
            argv = empty_netns_prefix() + argv
        argv = prefix + argv
        cgroup = Cgroup.create(spec.name, Limits(
            memory_bytes=(memory_mb + VMM_MEMORY_OVERHEAD_MB) * 1024 * 1024, pids=None,
            cpus=p.cpus))
        if cgroup is not None:
            cleanups.append(cgroup.destroy)
        with open(scratch / "console.log", "wb") as log:
            # Firecracker's serial console is its stdout.
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, close_fds=True,
                                       start_new_session=True,
                                       pass_fds=(life_w,) if life_w >= 0 else (),
                                       preexec_fn=cgroup.join_fn() if cgroup else None,
                                       env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        close_fds(life_w)
        life_w = -1
        try:
            sock = fc.connect_vsock(vm.vsock_uds, fc.AGENT_VSOCK_PORT, settings.boot_timeout,
                                    proc=process)
        except (TimeoutError, ConnectionError) as exc:
            raise SandboxError(f"the Firecracker guest did not start: {exc}") from None
        client = AgentClient.from_socket(sock)
        sandbox = Sandbox(spec=spec, backend=backend_name,
                          isolation="microVM with its own guest kernel (Firecracker, KVM)",
                          client=client, process=process, scratch=scratch, notes=notes,
                          cleanups=cleanups, helpers=helpers, memory_floor=False)
        try:
            client.hello(timeout=15)
        except Exception:
            sandbox.destroy()
            raise
        if p.network == "egress" and p.root_writable:
            with contextlib.suppress(Exception):  # slirp4netns's DNS forwarder
                client.write_file("/etc/resolv.conf", b"nameserver 10.0.2.3\n")
        if spec.rootfs.name == "host":
            notes.append(f"microvm: this VM runs a {root_desc}")
        return sandbox
    except BaseException:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        for helper in helpers:
            helper.kill()
            helper.wait()
        for cleanup in reversed(cleanups):
            with contextlib.suppress(Exception):
                cleanup()
        shutil.rmtree(scratch, ignore_errors=True)
        raise
