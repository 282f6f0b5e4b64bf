"""Seccomp policy as data: a deny list per profile, compiled to BPF (bwrap) or OCI JSON (runsc)."""

from __future__ import annotations

import errno
import hashlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Final

from . import paths
from .errors import SandboxError, UsageError

PROFILES: Final = ("permissive", "moderate", "restrictive")

# Denied in every profile: ways to reach kernel code that an ordinary program never needs
# (module loading, kexec, BPF, perf, keyrings, userfaultfd), to change host-wide state
# (clock, swap, reboot, quota, syslog) or to get out of the sandbox's view of the system
# (mount API, pivot_root, chroot, setns, file handles). Most of these already need a
# capability, but inside a user namespace the sandbox may hold one, and EPERM up front
# removes the kernel code from reach entirely. chroot is harmless without CAP_SYS_CHROOT,
# but nothing legitimate in a sandbox needs it, so it goes too.
_BASE: Final = (
    # mounts and root switching
    "mount", "umount", "umount2", "pivot_root", "chroot",
    "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    # kernel code loading
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "create_module", "query_module", "get_kernel_syms", "uselib",
    # hardware, machine state, legacy interfaces
    "iopl", "ioperm", "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd",
    "lookup_dcookie", "nfsservctl", "_sysctl", "sysfs", "ustat", "vm86", "vm86old", "syslog",
    # clocks
    "settimeofday", "stime", "clock_settime", "clock_adjtime", "adjtimex",
    # namespaces (unshare/clone with namespace flags are handled by the newns arg rules)
    "setns",
    # large kernel attack surface
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    # escaping through file handles and comparing other processes' kernel objects
    "open_by_handle_at", "name_to_handle_at", "kcmp",
)  # fmt: skip

# moderate: no touching other processes' memory. process_vm_{readv,writev} and pidfd_getfd
# pass the same access check as ptrace, so blocking ptrace alone would leave them open.
# io_uring is a large, frequently exploited kernel surface that common tools don't need.
# modify_ldt only serves 16-bit code (Wine) and has a history of CVEs.
_MODERATE_EXTRA: Final = (
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "modify_ldt",
)  # fmt: skip

# restrictive: personality can switch off ASLR (ADDR_NO_RANDOMIZE) and turn on
# READ_IMPLIES_EXEC for children; NUMA policy calls need CAP_SYS_NICE on Docker too;
# fanotify and vhangup have no use in a batch sandbox.
_RESTRICTIVE_EXTRA: Final = (
    "personality", "mbind", "migrate_pages", "move_pages", "set_mempolicy",
    "fanotify_init", "vhangup",
)  # fmt: skip

_DENY: Final[dict[str, tuple[str, ...]]] = {
    "permissive": _BASE,
    "moderate": _BASE + _MODERATE_EXTRA,
    "restrictive": _BASE + _MODERATE_EXTRA + _RESTRICTIVE_EXTRA,
}

# Argument rules, the same in every profile (a new namespace is where most unprivileged
# kernel exploits start, and TIOCSTI lets a sandbox type into the host's terminal).
CLONE_NS_FLAGS: Final[dict[str, int]] = {
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWNET": 0x40000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWTIME": 0x00000080,  # unshare/clone3 only: in clone() this bit is the exit signal
}
TTY_IOCTLS: Final[dict[str, int]] = {"TIOCSTI": 0x5412, "TIOCLINUX": 0x541C}

_OCI_ARCH: Final = {"x86_64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64"}


def _check(profile: str) -> None:
    if profile not in _DENY:
        raise UsageError(f"unknown seccomp profile {profile!r} (use one of {', '.join(PROFILES)})")


def deny_list(profile: str) -> tuple[str, ...]:
    """Syscalls that fail with EPERM under `profile`, in a stable order."""
    _check(profile)
    return _DENY[profile]


def _tool_args(profile: str) -> list[str]:
    return ["--default", "allow", "--errno", *deny_list(profile), "--block-tiocsti",
            "--block-newns"]  # fmt: skip


def compile_bpf(profile: str) -> Path:
    """Path of the raw BPF program for `profile`, compiled once and cached by content."""
    args = _tool_args(profile)
    tool = paths.native_binary("ak-seccomp")
    st = tool.stat()
    # The key covers everything that changes the output: the policy, the tool build, the arch.
    key = "\0".join([*args, str(tool), str(st.st_mtime_ns), str(st.st_size), platform.machine()])
    digest = hashlib.sha256(key.encode()).hexdigest()
    cache = paths.data_dir() / "cache" / "seccomp"
    out = cache / f"{digest}.bpf"
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{digest}.{os.getpid()}.tmp"
    try:
        res = subprocess.run([str(tool), *args, "-o", str(tmp)], capture_output=True, text=True,
                             check=False)  # fmt: skip
        if res.returncode != 0:
            raise SandboxError(f"ak-seccomp failed ({res.returncode}): {res.stderr.strip()}")
        size = tmp.stat().st_size
        if size == 0 or size % 8:  # struct sock_filter is 8 bytes
            raise SandboxError(f"ak-seccomp wrote a malformed BPF program ({size} bytes)")
        os.replace(tmp, out)  # atomic: concurrent runs see the old state or the whole file
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _masked_eq(index: int, mask: int, value: int) -> dict[str, Any]:
    # OCI (like libseccomp) takes the mask in `value` and the expected result in `valueTwo`.
    return {"index": index, "value": mask, "valueTwo": value, "op": "SCMP_CMP_MASKED_EQ"}


def oci_seccomp(profile: str) -> dict[str, Any]:
    """The same policy as an OCI runtime-spec `linux.seccomp` object (for runsc)."""
    machine = platform.machine()
    arch = _OCI_ARCH.get(machine)
    if arch is None:
        raise SandboxError(f"no OCI seccomp architecture known for {machine}")
    eperm = {"action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM}
    rules: list[dict[str, Any]] = [{"names": list(deny_list(profile)), **eperm}]
    for flag in CLONE_NS_FLAGS.values():
        rules.append({"names": ["unshare"], **eperm, "args": [_masked_eq(0, flag, flag)]})
        if flag != CLONE_NS_FLAGS["CLONE_NEWTIME"]:
            rules.append({"names": ["clone"], **eperm, "args": [_masked_eq(0, flag, flag)]})
    rules.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS})
    for cmd in TTY_IOCTLS.values():
        rules.append({"names": ["ioctl"], **eperm, "args": [_masked_eq(1, 0xFFFFFFFF, cmd)]})
    return {"defaultAction": "SCMP_ACT_ALLOW", "architectures": [arch], "syscalls": rules}
