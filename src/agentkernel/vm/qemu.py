"""QEMU microvm: the command line for one guest, the accelerator choice and the KVM probe."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..paths import connect_unix, data_dir, listen_unix

Accel = Literal["kvm", "tcg"]
NetMode = Literal["none", "user"]
Arch = Literal["x86_64", "aarch64"]

GUEST_ADDR = "10.0.2.15"
GUEST_PREFIX = 24
GATEWAY = "10.0.2.2"
DNS = "10.0.2.3"
AGENT_PORT = "agent"

# Hardening that costs nothing at boot: no legacy vsyscall page, no debugfs, no slab
# merging, randomised kernel stack offsets, an oops is fatal and a panic ends the VM.
HARDENED = ("vsyscall=none", "debugfs=off", "slab_nomerge", "randomize_kstack_offset=on",
            "page_alloc.shuffle=1", "oops=panic", "panic=-1")
QUIET = ("quiet", "loglevel=1")
# Boot-time savers: crypto self-tests and loop devices cost a second under emulation.
FAST = ("cryptomgr.notests", "max_loop=0", "8250.nr_uarts=1", "i8042.noaux", "i8042.nomux",
        "i8042.nopnp", "i8042.dumbkbd")
X86_ONLY = ("vsyscall=", "8250.", "i8042.")
# What the host keeps of a guest's console: its first MiB (boot messages, a panic). The
# guest's root writes the serial port as fast as it likes: a file of QEMU's own grew
# without end in the runtime dir (RAM, where /run is a tmpfs) while the VM lived.
CONSOLE_MAX_BYTES = 1 << 20  # backends.base.LOG_MAX_BYTES


def host_arch() -> Arch:
    """The guest architecture: the host's (QEMU runs same-architecture guests only)."""
    return "aarch64" if platform.machine() in ("aarch64", "arm64") else "x86_64"


def qemu_binary() -> str | None:
    name = {"x86_64": "qemu-system-x86_64", "aarch64": "qemu-system-aarch64"}.get(
        platform.machine(), "qemu-system-x86_64")
    return shutil.which(name)


def host_tsc_khz() -> int | None:
    """The host TSC frequency in kHz (the guest skips its flaky calibration under TCG)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError, IndexError):
        pass
    return None


def console_pipe(path: Path, uid: int | None = None, reader: tuple[int, int] | None = None
                 ) -> tuple[int, subprocess.Popen[bytes]]:
    """The write end of a pipe for QEMU's serial port, and its reader (run as `reader`),
    which keeps the first CONSOLE_MAX_BYTES in `path` and drops the guest's further
    output (backends.base.bounded_log)."""
    from ..backends.base import bounded_log

    return bounded_log(path, uid, reader)


@dataclass
class Drive:
    path: Path
    serial: str
    readonly: bool


@dataclass
class VmConfig:
    """Everything that shapes one guest; turned into argv by `build_argv` (pure)."""

    kernel: Path
    initrd: Path
    agent_args: list[str]
    accel: Accel
    vcpus: int
    memory_mb: int
    serial_log: Path
    agent_socket: Path
    drives: list[Drive] = field(default_factory=list)
    net: NetMode = "none"
    sandbox: bool = True
    extra_cmdline: list[str] = field(default_factory=list)
    # x86_64: -M microvm, an ELF vmlinux booted through PVH, virtio-mmio, ttyS0.
    # aarch64: -M virt, the kernel's `Image`, virtio-pci, the PL011 console ttyAMA0.
    arch: Arch = field(default_factory=host_arch)

    def cmdline(self) -> str:
        if self.arch == "aarch64":
            # Resets go through PSCI (-no-reboot still makes QEMU exit); no PC legacy bits.
            parts = ["console=ttyAMA0", *QUIET,
                     *(p for p in (*HARDENED, *FAST) if not p.startswith(X86_ONLY))]
            return " ".join([*parts, *self.extra_cmdline, "--", *self.agent_args])
        parts = ["console=ttyS0", "reboot=t", *QUIET, *HARDENED, *FAST]
        if self.accel == "tcg":
            khz = host_tsc_khz()
            if khz:
                parts.append(f"tsc_early_khz={khz}")
            parts.append("tsc=reliable")
        parts += self.extra_cmdline
        return " ".join([*parts, "--", *self.agent_args])


# The host's nobody: a root-started QEMU's ids only where no range of its own is given
# (the KVM probe's boot). A sandbox's VM (and the template it is cloned from) runs as the
# nobody of an id range allocated for it (idmap): host nobody owns QEMU's user namespace,
# so it could trace QEMU and open its disks and sockets through /proc, and every VM
# sharing it could do so to the others.
VMM_UID = 65534
VMM_IN_RANGE = 65534  # QEMU's uid and gid within its VM's id range


def vmm_uid() -> int | None:
    """The uid QEMU drops to without a range: nobody when we are root, None (keep ours)
    otherwise."""
    return VMM_UID if os.geteuid() == 0 else None


def privilege_drop(accel: Accel, ids: tuple[int, int] | None = None) -> list[str]:
    """argv prefix that runs QEMU as `ids` (default: `vmm_uid()`), with no capabilities and
    no groups but /dev/kvm's (under KVM). Empty when we are not root: QEMU then runs as us."""
    uid = vmm_uid()
    setpriv = shutil.which("setpriv")
    if uid is None or setpriv is None:
        return []
    uid, gid = ids or (uid, uid)
    groups = ["--clear-groups"]
    if accel == "kvm":
        with contextlib.suppress(OSError):
            groups = [f"--groups={os.stat('/dev/kvm').st_gid}"]
    return [setpriv, f"--reuid={uid}", f"--regid={gid}", *groups, "--inh-caps=-all",
            "--bounding-set=-all", "--no-new-privs", "--"]


class Handles:
    """Everything QEMU would open by path, opened by us and handed over as descriptors.

    An unprivileged QEMU (`privilege_drop`) can reach none of our private dirs; with these
    it gets its own kernel, initramfs, disks, console log and listening sockets, and no
    other file of ours. Disks go through QEMU's fd sets (no permission check on reopen);
    the kernel and initramfs are world-readable files reopened via /proc/self/fd.
    """

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}

    @classmethod
    def open(cls, cfg: VmConfig, uid: int, sockets: dict[str, Path] | None = None,
             console: int | None = None) -> Handles:
        """`console`: the serial port's descriptor (console_pipe's, handed over: closed with
        the others); without it, `cfg.serial_log` is opened as a plain file."""
        h = cls()
        if console is not None:
            h.fds["serial"] = console
        try:
            h.fds["kernel"] = os.open(cfg.kernel, os.O_RDONLY)
            h.fds["initrd"] = os.open(cfg.initrd, os.O_RDONLY)
            for i, d in enumerate(cfg.drives):
                # QEMU also opens a writable image read-only (probing, locking): its fd set
                # holds one descriptor of each access mode.
                h.fds[f"drive{i}"] = os.open(d.path, os.O_RDONLY)
                if not d.readonly:
                    h.fds[f"drive{i}rw"] = os.open(d.path, os.O_RDWR)
            if console is None:
                serial = os.open(cfg.serial_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                h.fds["serial"] = serial
                os.fchown(serial, uid, uid)
            for name, path in {"agent": cfg.agent_socket, **(sockets or {})}.items():
                h.fds[name] = listen_unix(path, 4).detach()
        except BaseException:
            h.close()
            raise
        for fd in h.fds.values():
            os.set_inheritable(fd, True)
        return h

    def proc_path(self, name: str) -> str:
        return f"/proc/self/fd/{self.fds[name]}"

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return tuple(self.fds.values())

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


def socket_chardev(name: str, path: Path, handles: Handles | None) -> str:
    """A listening socket chardev: QEMU binds `path` itself, or is handed our socket."""
    if handles is not None:
        return f"socket,id={name},fd={handles.fds[name]},server=on,wait=off"
    return f"socket,id={name},path={path},server=on,wait=off"


def build_argv(qemu: str, cfg: VmConfig, handles: Handles | None = None,
               console: int | None = None) -> list[str]:
    """The QEMU command line for `cfg`: -M microvm (x86_64) or -M virt (aarch64), no default
    devices, serial to a file. With `handles`, every file and socket is a descriptor; else
    `console` (a descriptor QEMU inherits, console_pipe's) stands for `cfg.serial_log`."""
    if handles is not None:
        serial = handles.proc_path("serial")
    else:
        serial = str(cfg.serial_log) if console is None else f"/proc/self/fd/{console}"
    if cfg.arch == "aarch64":
        # GICv3 under TCG; under KVM the host's own GIC version.
        machine = f"virt,gic-version={'host' if cfg.accel == 'kvm' else '3'}"
        bus = "pci"  # virt's PCI host bridge: no virtio-mmio command-line devices needed
    else:
        machine, bus = "microvm", "device"
    argv = [qemu, "-M", machine, "-accel", cfg.accel,
            "-cpu", "max" if cfg.accel == "tcg" else "host",
            "-smp", str(max(1, cfg.vcpus)), "-m", f"{max(64, cfg.memory_mb)}M",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", f"file:{serial}",
            "-kernel", handles.proc_path("kernel") if handles else str(cfg.kernel),
            "-initrd", handles.proc_path("initrd") if handles else str(cfg.initrd),
            "-append", cfg.cmdline()]
    if cfg.sandbox:
        argv += ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,"
                             "resourcecontrol=deny"]
    argv += ["-device", f"virtio-rng-{bus}",
             "-device", f"virtio-serial-{bus}",
             "-chardev", socket_chardev("agent", cfg.agent_socket, handles),
             "-device", f"virtserialport,chardev=agent,name={AGENT_PORT}"]
    for i, drive in enumerate(cfg.drives):
        path = str(drive.path)
        if handles is not None:
            for key in (f"drive{i}", f"drive{i}rw"):
                if key in handles.fds:
                    argv += ["-add-fd", f"fd={handles.fds[key]},set={i + 1}"]
            path = f"/dev/fdset/{i + 1}"
        opts = [f"file={path}", "format=raw", "if=none", f"id=d{i}",
                "cache=unsafe" if not drive.readonly else "cache=none",
                "aio=threads"]
        if drive.readonly:
            opts.append("readonly=on")
        argv += ["-drive", ",".join(opts),
                 "-device", f"virtio-blk-{bus},drive=d{i},serial={drive.serial}"]
    if cfg.net == "user":
        argv += ["-netdev", "user,id=n0", "-device", f"virtio-net-{bus},netdev=n0"]
    return argv


def connect_agent_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float,
                         ) -> socket.socket:
    """Connect to QEMU's chardev socket; the guest is ready once it speaks.

    A connection made before the guest opened its port may just see EOF, so the first
    byte (the agent's HELLO) decides: until then, reconnect.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ConnectionError(f"QEMU exited with status {proc.returncode} during boot")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the guest agent did not answer within {timeout:.0f} s")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connect_unix(sock, path)
        except OSError:
            sock.close()
            time.sleep(0.02)
            continue
        sock.settimeout(0.5)
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except TimeoutError:
            # Nothing yet: keep this connection, the guest may open its port any moment.
            first = None
        except OSError:
            first = b""
        if first is None:
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    first = sock.recv(1, socket.MSG_PEEK)
                    break
                except TimeoutError:
                    continue
                except OSError:
                    first = b""
                    break
        if first:
            sock.settimeout(None)
            return sock
        sock.close()
        time.sleep(0.05)


# ---- accelerator ----


def _kvm_cache_path() -> Path:
    return data_dir() / "microvm" / "kvm-probe.json"


def _probe_key(kernel: Path | None) -> str:
    parts = [platform.release(), qemu_binary() or "-"]
    if kernel is not None:
        try:
            st = kernel.stat()
            parts += [str(kernel), str(st.st_size), str(st.st_mtime_ns)]
        except OSError:
            pass
    try:
        parts.append(str(os.stat("/dev/kvm").st_rdev))
    except OSError:
        parts.append("nokvm")
    return "|".join(parts)


def cached_kvm_probe(kernel: Path | None) -> tuple[bool, str] | None:
    try:
        doc = json.loads(_kvm_cache_path().read_text())
    except (OSError, ValueError):
        return None
    if doc.get("key") != _probe_key(kernel):
        return None
    return bool(doc.get("ok")), str(doc.get("detail", ""))


def probe_kvm_boot(kernel: Path, initrd: Path, module_args: list[str],
                   timeout: float = 20.0) -> tuple[bool, str]:
    """Boot our guest under KVM for real: does its agent say HELLO? Cached per host/kernel.

    A paravirtual KVM (PVM) opens /dev/kvm fine but dies on the first instruction it cannot
    emulate, so only a boot tells.
    """
    qemu = qemu_binary()
    if qemu is None:
        return False, "qemu-system is not installed"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        result = (False, "/dev/kvm is missing or not accessible")
    else:
        result = _boot_once(qemu, kernel, initrd, module_args, timeout)
    path = _kvm_cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": _probe_key(kernel), "ok": result[0],
                                "detail": result[1], "at": time.time()}))
    return result


def _boot_once(qemu: str, kernel: Path, initrd: Path, module_args: list[str],
               timeout: float) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory(prefix="ak-kvm-probe-") as tmp:
        d = Path(tmp)
        cfg = VmConfig(kernel=kernel, initrd=initrd, accel="kvm", vcpus=1, memory_mb=256,
                       serial_log=d / "serial.log", agent_socket=d / "agent.sock",
                       agent_args=["--mount-basics", *module_args, "--vport", AGENT_PORT,
                                   "--poweroff"])
        log = d / "qemu.log"
        start = time.monotonic()
        with open(log, "wb") as logf:
            proc = subprocess.Popen(build_argv(qemu, cfg), stdin=subprocess.DEVNULL,
                                    stdout=logf, stderr=logf, start_new_session=True)
        try:
            sock = connect_agent_socket(cfg.agent_socket, proc, timeout)
            sock.close()
            return True, f"a standard guest booted under KVM in {time.monotonic() - start:.2f} s"
        except (ConnectionError, TimeoutError) as exc:
            text = log.read_text(errors="replace").strip().splitlines()
            reason = next((ln for ln in text if "error" in ln.lower()), text[-1] if text else "")
            return False, f"KVM cannot boot a standard guest here ({exc}; {reason[:160]})"
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
