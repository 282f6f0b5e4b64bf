"""The `microvm` backend: every sandbox is a QEMU microvm with its own guest kernel."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BackendUnavailable, SandboxError, UsageError
from ..network import empty_netns_prefix, enter_netns
from ..paths import which
from ..sandbox import Sandbox, SandboxSpec, close_fds
from ..vm import qemu as q
from ..vm.settings import MicrovmSettings, current
from .base import Backend, CallerOptions, Probe, control_dir, make_scratch
from .microvm_guest import (  # noqa: F401 - names other modules import from here
    DEFAULT_MEMORY_MB,
    GUEST_MIN_MEMORY_MB,
    LAYER_SERIAL,
    NET_MODULES,
    ROOT_SERIAL,
    VMM_MEMORY_OVERHEAD_MB,
    VSOCK_MODULES,
    WORKSPACE_SERIAL,
    choose_accel,
    module_args,
)

if TYPE_CHECKING:
    from ..agent.client import AgentClient

SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # secrets_store's trust variables


class MicrovmBackend(Backend):
    name = "microvm"
    strength = 30
    stoppable = True  # its writable layers are on disk images of its own
    snapshot_refusal = "not supported for microVMs yet"
    shares_host_dirs = False  # the project dir is copied into the guest
    sized_disks = True
    memory_floor = False  # the VM's own size bounds its memory
    # A microVM's agent notices a hang-up by polling its port: a reconnect may need retries.
    adopt_hello_timeouts = (2.0, 2.0, 5.0)

    def __init__(self, settings: MicrovmSettings | None = None) -> None:
        self._accel_note = ""
        self._settings = settings  # a caller's (planner.py); None: this process's

    def settings(self) -> MicrovmSettings:
        return self._settings if self._settings is not None else current()

    def for_caller(self, options: CallerOptions) -> Backend:
        return MicrovmBackend(options.microvm) if options.microvm is not None else self

    @property
    def isolation(self) -> str:  # type: ignore[override]
        accel = self._accel_note or "KVM or TCG"
        return f"microVM with its own guest kernel (QEMU microvm, {accel})"

    def probe(self, deep: bool = False) -> Probe:
        from ..vm.kernel import current_kernel

        settings = self.settings()
        qemu = q.qemu_binary()
        if qemu is None:
            return Probe(False, "QEMU is not installed: apt install qemu-system-x86")
        from ..vm.disk import mkfs_binary

        if mkfs_binary() is None:
            return Probe(False, "mkfs.ext4 is missing: apt install e2fsprogs")
        kernel = current_kernel(settings.kernel)
        if kernel is None:
            return Probe(False, "no guest kernel prepared: run `agentkernel setup --microvm`")
        initrd = None
        if deep:
            from ..vm.initramfs import ensure_initramfs

            with contextlib.suppress(Exception):
                initrd = ensure_initramfs(kernel)
        accel, why = choose_accel(settings, deep=deep, kernel=Path(kernel.vmlinux),
                                  initrd=initrd, modules=kernel.modules)
        if accel is None:
            return Probe(False, why)
        self._accel_note = "KVM" if accel == "kvm" else "TCG emulation"
        return Probe(True, f"{qemu}; guest kernel {kernel.release} ({kernel.source}); "
                           f"accelerator {accel}: {why}")

    def start(self, spec: SandboxSpec) -> Sandbox:
        from ..agent.client import AgentClient
        from ..cgroups import Cgroup, Limits
        from ..controlplane import refuse_copied
        from ..vm import disk
        from ..vm import snapshot as vmsnap
        from ..vm.initramfs import ensure_initramfs
        from ..vm.kernel import current_kernel

        refuse_copied(spec, self.name)  # its project dir is a copy: nothing can be masked
        settings = self.settings()
        if settings.vmm == "firecracker":
            from ..egress_policy import require_default
            from ..vm.firecracker import firecracker_binary

            # Its TAP egress has no gate yet (slirp4netns and the fence): fail closed.
            require_default(spec.egress, f"{self.name} (vmm = firecracker)")
            from .microvm_fc import start_firecracker

            binary = firecracker_binary()
            if binary is None:
                raise BackendUnavailable("[microvm] vmm = firecracker: firecracker is not on "
                                         "PATH (Debian has no package); use vmm = qemu")
            return start_firecracker(self.name, spec, settings, binary)
        qemu = q.qemu_binary()
        kernel = current_kernel(settings.kernel)
        if qemu is None or kernel is None:
            raise BackendUnavailable(self.probe().detail)
        initrd = ensure_initramfs(kernel)
        accel, why = choose_accel(settings, kernel=Path(kernel.vmlinux), initrd=initrd,
                                  modules=kernel.modules)
        if accel is None:
            raise BackendUnavailable(f"the microvm backend cannot run here: {why}")
        self._accel_note = "KVM" if accel == "kvm" else "TCG emulation"
        keep = persistent_disks(spec)
        p = spec.profile
        net = p.network  # none | egress | host
        secrets = net == "egress" and spec.egress is not None and bool(spec.egress.secrets)
        if secrets and not p.root_writable:
            raise UsageError("--secret on a microVM needs a writable root: the sandbox's CA "
                             "goes into the guest's system trust bundle (drop --read-only)")
        # Start from a saved template VM (vm/snapshot.py); a kept VM boots cold: its
        # writable layer is a disk of its own that a template's memory knows nothing of.
        snap = settings.snapshot and not spec.persistent
        clone_disks: list[tuple[str, str, bool]] = []  # mounted by CLONE after a restore
        scratch = make_scratch(spec.name)
        sandbox: Sandbox | None = None
        helpers: list[subprocess.Popen[bytes]] = []
        notes: list[str] = []
        cleanups: list[Callable[[], None]] = []
        vmm_lock = [-1]  # the lock of QEMU's id range until QEMU has it
        try:
            if accel == "tcg":
                notes.append(f"microvm: {why}")
            root_image, root_desc = disk.ensure_root_image(spec.rootfs)
            if spec.rootfs.name == "host":
                notes.append("microvm: the host's userland is not copied into guests; this VM "
                             f"runs a {root_desc} (pull an image for a full userland)")
            drives = [q.Drive(root_image, ROOT_SERIAL, readonly=True)]
            agent_args = ["--mount-basics", *module_args(kernel.modules, net=net != "none"),
                          "--root", ROOT_SERIAL]
            if p.root_writable and keep is not None:
                # A kept VM's writable layer is a disk of its own that stop/start keeps.
                layer = keep / "layer.ext4"
                if not layer.is_file():
                    _make_atomically(layer, disk.make_layer_image)
                drives.append(q.Drive(layer, LAYER_SERIAL, readonly=False))
                agent_args += ["--rw", LAYER_SERIAL]
            elif p.root_writable:
                agent_args += ["--rw", "tmpfs"]  # per VM, in guest memory
            if spec.workspace is not None and p.workspace != "none":
                writable = p.workspace in ("rw", "cow")
                # A kept VM's writable project copy is made once and kept with the VM; a
                # read-only one is copied afresh at every boot.
                ws_image = (keep if keep is not None and writable else scratch) / \
                    "workspace.ext4"
                if not ws_image.is_file():
                    source = spec.workspace
                    _make_atomically(ws_image, lambda out: disk.make_workspace_image(
                        source, out, writable=writable))
                drives.append(q.Drive(ws_image, WORKSPACE_SERIAL, readonly=not writable))
                if snap and vmsnap.fit_slot(ws_image):
                    clone_disks.append((WORKSPACE_SERIAL, "/workspace", not writable))
                else:
                    snap = False  # a project larger than the template's disk slot boots cold
                    agent_args += ["--disk", f"{WORKSPACE_SERIAL}:/workspace:"
                                             f"{'rw' if writable else 'ro'}"]
                if p.workspace == "rw":
                    notes.append("microvm: /workspace is a copy of the project (this guest "
                                 "kernel has no virtio-9p); changes stay in the VM")
            agent_args += ["--net", "lo" if net == "none"
                           else f"{q.GUEST_ADDR}/{q.GUEST_PREFIX},{q.GATEWAY}"]
            hostname = vmsnap.TEMPLATE_HOSTNAME if snap else spec.hostname
            agent_args += ["--hostname", hostname, "--vport", q.AGENT_PORT, "--poweroff"]
            if spec.persistent:
                # The VM outlives this process: its agent waits for the next host (a
                # restarted daemon) instead of ending the VM when the channel closes.
                agent_args.append("--reconnect")
            memory_mb = max(GUEST_MIN_MEMORY_MB, p.memory_mb or DEFAULT_MEMORY_MB)
            vcpus = max(1, math.ceil(p.cpus)) if p.cpus else 1
            cfg = q.VmConfig(
                kernel=Path(kernel.vmlinux), initrd=initrd, agent_args=agent_args,
                accel=accel, vcpus=vcpus, memory_mb=memory_mb,
                serial_log=scratch / "console.log",
                agent_socket=agent_socket_path(scratch, persistent=spec.persistent),
                drives=drives, net="none" if net == "none" else "user",
            )
            # As root, QEMU runs as the nobody of an id range of its own, which it holds
            # (vmm_lock), and gets every file and socket as a descriptor.
            vmm_ids, vmm_lock[0] = _vmm_ids()
            uid = vmm_ids[0] if vmm_ids is not None else None
            # The guest console goes through a pipe whose reader keeps a bounded prefix
            # (run as QEMU's ids: it needs nothing of root's).
            console, console_reader = q.console_pipe(cfg.serial_log, uid, vmm_ids)
            helpers.append(console_reader)
            try:
                handles = (q.Handles.open(cfg, uid, {"qmp": scratch / "qmp.sock"} if snap
                                          else None, console=console)
                           if uid is not None else None)
            except BaseException:
                close_fds(console)
                raise
            if handles is not None:
                cleanups.append(handles.close)  # if the start fails before QEMU has them
            else:
                os.set_inheritable(console, True)
                held = [console]  # closed once: by the cleanup, or once QEMU has it
                cleanups.append(lambda: _close_held(held))
            argv = q.build_argv(qemu, cfg, handles, console=console)
            state: Path | None = None
            if snap:
                state = vmsnap.ensure_template(
                    qemu, cfg, frozenset(d for d, _, _ in clone_disks),
                    # Under this VM's ids too: a template QEMU another user could trace
                    # would hand every later clone a guest memory of its choosing.
                    prefix=lambda: [*empty_netns_prefix(), *vmm_confinement(accel, vmm_ids)],
                    timeout=settings.boot_timeout, uid=uid)
                notes.append("microvm: restored from a saved template VM (snapshot); fresh "
                             "entropy, host name and clock were sent to its agent")
            life_w = lock = -1
            argv = vmm_confinement(accel, vmm_ids) + argv
            if net == "none":
                # The VMM itself needs no network: give it an empty network namespace.
                argv = empty_netns_prefix() + argv
            elif net == "egress":
                # QEMU's user-mode stack makes the guest's connections and DNS queries with
                # sockets of its own: it runs in a namespace whose only way out is the
                # egress gate (egress_gate), as a namespaces sandbox does. QEMU holds the
                # lifeline, so the holder and the gate exit with it.
                if secrets:
                    from ..egress_gate import write_tls

                    assert spec.egress is not None
                    write_tls(scratch, spec.egress)  # the sandbox's CA: its key is gone after
                holder, life_w, lock = _gated_netns(scratch, helpers, spec)
                argv = enter_netns(holder) + argv
            cgroup = Cgroup.create(spec.name, Limits(
                memory_bytes=(memory_mb + VMM_MEMORY_OVERHEAD_MB) * 1024 * 1024,
                pids=None, cpus=p.cpus))
            log = scratch / "qemu.log"
            state_fd = -1
            if state is not None:
                state_fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
                argv += vmsnap.clone_args(state_fd, scratch / "qmp.sock", handles)
            try:
                with open(log, "wb") as logf:
                    process = subprocess.Popen(
                        argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                        close_fds=True, start_new_session=True,
                        pass_fds=tuple(fd for fd in (life_w, lock, state_fd, vmm_lock[0])
                                       if fd >= 0)
                        + (handles.pass_fds if handles is not None else (console,)),
                        preexec_fn=cgroup.join_fn() if cgroup else None,
                        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                    )
            finally:
                close_fds(life_w, lock, state_fd, vmm_lock[0])
                vmm_lock[0] = -1  # QEMU holds it now
                if handles is not None:
                    handles.close()  # QEMU has its own copies now
                else:
                    _close_held(held)
            try:
                if snap:
                    sock = vmsnap.resume_clone(process, cfg.agent_socket,
                                               scratch / "qmp.sock", settings.boot_timeout)
                else:
                    sock = q.connect_agent_socket(cfg.agent_socket, process,
                                                  settings.boot_timeout)
            except (ConnectionError, TimeoutError, SandboxError) as exc:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait()
                if state is not None and isinstance(exc, vmsnap.SnapshotError):
                    vmsnap.discard(state)  # e.g. a state this QEMU cannot load: rebuild
                if cgroup is not None:
                    cgroup.destroy()
                raise SandboxError(f"the microVM did not start: {exc}; "
                                   f"{_boot_failure(scratch)}") from None
            client = AgentClient.from_socket(sock)
            sandbox = Sandbox(spec=spec, backend=self.name, isolation=self.isolation,
                              client=client, process=process, scratch=scratch,
                              cgroup=cgroup, helpers=helpers, notes=notes,
                              cleanups=cleanups, memory_floor=self.memory_floor)
            try:
                if snap:
                    # A clone is a copy of the template: give it its own entropy, name
                    # and clock before anything runs in it.
                    client.clone_init(hostname=spec.hostname, wallclock_ns=time.time_ns(),
                                      disks=clone_disks)
                else:
                    client.hello(timeout=15)
            except Exception as exc:
                what = "take its identity" if snap else "say hello"
                raise SandboxError(f"the microVM's agent did not {what}: {exc}; "
                                   f"{_boot_failure(scratch)}") from None
            if net != "none" and p.root_writable:
                with contextlib.suppress(Exception):
                    client.write_file("/etc/resolv.conf", f"nameserver {q.DNS}\n".encode())
            if secrets:
                _install_trust(client, scratch)
            return sandbox
        except BaseException:
            if sandbox is not None:
                sandbox.destroy()
            else:
                for helper in helpers:
                    with contextlib.suppress(ProcessLookupError):
                        helper.kill()
                    helper.wait()
                for cleanup in cleanups:
                    cleanup()
                shutil.rmtree(scratch, ignore_errors=True)
            if vmm_lock[0] >= 0:
                close_fds(vmm_lock[0])
            raise


def _close_held(held: list[int]) -> None:
    if held[0] >= 0:
        close_fds(held[0])
        held[0] = -1


def _vmm_ids() -> tuple[tuple[int, int] | None, int]:
    """QEMU's host ids and the lock of their range: as root, the nobody of an id range
    allocated for this VM alone (idmap); otherwise (None, -1): QEMU runs as us."""
    if os.geteuid() != 0:
        return None, -1
    from ..idmap import allocate

    rng, lock = allocate()
    return (rng.uid + q.VMM_IN_RANGE, rng.gid + q.VMM_IN_RANGE), lock


def _gated_netns(scratch: Path, helpers: list[subprocess.Popen[bytes]],
                 spec: SandboxSpec) -> tuple[int, int, int]:
    """The VMM's network namespace, whose one way out is the sandbox's egress gate:
    (its holder's pid, the lifeline's write end, the gate's id range lock or -1).

    QEMU's user-mode stack turns each guest connection into a connect() of its own and
    each guest DNS query into one to the host's resolv.conf servers: the gate's rules
    redirect both, loopback resolvers included; the guest's 10.0.2.2 (QEMU's view of its
    namespace's loopback) reaches only the gate's listeners, which refuse what was not
    redirected. Started by root, the gate runs as the `nobody` of an id range of its own
    (idmap), not as the host's nobody that QEMU runs as; QEMU holds that range's lock."""
    from ..egress_gate import GateStart
    from ..egress_policy import Policy
    from ..network import lifeline, netns_holder

    ids: tuple[int, int] | None = None
    lock = -1
    if os.geteuid() == 0:
        from ..idmap import allocate

        rng, lock = allocate()
        ids = (rng.uid + 65534, rng.gid + 65534)
    life_r, life_w = lifeline()
    try:
        gate = GateStart(scratch, exit_fd=life_r)
        if gate.gate is not None:  # None: on demand, from the fork server
            helpers.append(gate.gate)
        holder = netns_holder(life_r)
        helpers.append(holder)
        gate.attach(holder.pid, spec.egress or Policy(), ids=ids, loopback_dns=True,
                    instance=spec.instance)
        gate.wait()
    except BaseException:
        close_fds(life_w, lock)
        raise
    finally:
        os.close(life_r)
    return holder.pid, life_w, lock


def _install_trust(client: AgentClient, scratch: Path) -> None:
    """The system bundle plus the sandbox's CA (egress_gate.write_tls) as the guest's
    system bundle, where the trust variables the planner set point (secrets_store), before
    anything runs in the guest. Its root is writable (start checked): a copy-on-write layer
    of this VM's own."""
    from ..egress_gate import TRUST_NAME

    try:
        client.write_file(SYSTEM_BUNDLE, (scratch / TRUST_NAME).read_bytes(), mode=0o644,
                          mkdirs=True)
    except Exception as exc:
        raise SandboxError(f"could not install the sandbox's egress CA in the guest: {exc}") \
            from None


def persistent_disks(spec: SandboxSpec) -> Path | None:
    """Where a kept VM's own disks (writable layer, project copy) live across stop/start."""
    if not spec.persistent:
        return None
    if spec.state_dir is None:
        raise SandboxError("a kept microVM needs a state dir for its disks")
    path = spec.state_dir / "vm"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _make_atomically(image: Path, build: Callable[[Path], None]) -> None:
    """Build a disk under a temporary name: a crash never leaves a half-made one behind."""
    tmp = image.with_name(f".{image.name}.tmp")
    try:
        build(tmp)
        tmp.replace(image)
    finally:
        tmp.unlink(missing_ok=True)


def agent_socket_path(scratch: Path, *, persistent: bool) -> Path:
    """QEMU's chardev socket for the agent's port; a kept VM's is where a restarted daemon
    looks for it (`<scratch>/ctl/agent.sock`, like the other backends' control socket)."""
    return control_dir(scratch) / "agent.sock" if persistent else scratch / "agent.sock"


def vmm_confinement(accel: q.Accel, ids: tuple[int, int] | None = None) -> list[str]:
    """argv prefix: the VMM unprivileged, as pid 1 of its own pid, IPC and UTS namespaces.

    As root, QEMU first drops to `ids` (default: the host's nobody; a sandbox's VM: its
    own range's nobody) (`setpriv`, no capabilities), then enters a user
    namespace of its own with the others, under the same uid: a compromised QEMU owns no
    host file, holds no capability anywhere, sees no host process to signal or trace, and
    dies with the `unshare` that forked it (--kill-child; the drop comes first because a
    uid change would cancel that parent-death signal). Comes after any network-namespace
    prefix (entering one needs our privileges).
    """
    unshare = which("unshare")
    if unshare is None:
        return []
    drop = q.privilege_drop(accel, ids)
    uid, gid = (ids or (q.VMM_UID, q.VMM_UID)) if drop else (os.geteuid(), os.getegid())
    # The same ids inside the user namespace, not root: exec'ing QEMU there leaves it
    # without capabilities, even in its own namespaces.
    return [*drop, unshare, f"--map-user={uid}", f"--map-group={gid}", "--pid", "--fork",
            "--kill-child", "--ipc", "--uts", "--"]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _boot_failure(scratch: Path) -> str:
    """The most telling line of the VMM's stderr or the guest console."""
    for name in ("qemu.log", "console.log"):
        text = _read(scratch / name).decode(errors="replace")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if lines:
            return f"{name}: {lines[-1][:300]}"
    return "no output from the VMM or the guest"


__all__ = ["MicrovmBackend", "agent_socket_path", "choose_accel", "module_args",
           "persistent_disks"]
