"""Seccomp policy as data: a deny list per profile, compiled to BPF that the agent installs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Final

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

# Refused with ENOSYS (as by a kernel built without them, which their users fall back from)
# in every profile. io_setup: a host-wide count no cgroup bounds; one io_setup(65536) took
# every native AIO context of the host (fs.aio-max-nr), and each later io_setup on the host
# failed with EAGAIN (tests/test_redteam6_host_counts.py). glibc's POSIX aio uses threads.
ABSENT: Final = ("io_setup",)

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

# Socket families refused in every profile (socket() fails with EAFNOSUPPORT, what a kernel
# without them says, so a program probing for one takes it as absent). AF_VSOCK: a network
# namespace does not confine it, so any sandbox on a VM guest reached its hypervisor's
# host (CID 2) and every other vsock service of the guest's; Docker's default profile
# refuses it too (the one family it does). The engines' defaults are replaced by ours
# (container_seccomp), which refuses the same.
DENIED_FAMILIES: Final = {"AF_VSOCK": 40}
EAFNOSUPPORT: Final = 97

_DENY: Final[dict[str, tuple[str, ...]]] = {
    "permissive": _BASE,
    "moderate": _BASE + _MODERATE_EXTRA,
    "restrictive": _BASE + _MODERATE_EXTRA + _RESTRICTIVE_EXTRA,
}



def _check(profile: str) -> None:
    if profile not in _DENY:
        raise UsageError(f"unknown seccomp profile {profile!r} (use one of {', '.join(PROFILES)})")


def deny_list(profile: str) -> tuple[str, ...]:
    """Syscalls that fail with EPERM under `profile`, in a stable order."""
    _check(profile)
    return _DENY[profile]


def _tool_args(profile: str, no_setid: bool = False) -> list[str]:
    families = [a for f in DENIED_FAMILIES.values() for a in ("--deny-family", str(f))]
    return ["--default", "allow", "--errno", *deny_list(profile), "--enosys", *ABSENT,
            "--block-tiocsti", "--block-newns", "--block-socket-filters", "--pin-core-limit",
            *families,
            *(["--block-setid-modes"] if no_setid else [])]  # fmt: skip


def compile_bpf(profile: str, *, no_setid: bool = False) -> Path:
    """Path of the raw BPF program for `profile`, compiled once and cached.

    `no_setid`: also refuse set-uid/set-gid mode bits (a sandbox that writes the host's
    project dir through an id-mapped mount, where its root's files are host root's).

    The cache entry is checked against a key file holding everything that changes the
    output (the policy, the tool build, the arch), compared byte for byte: a run costs one
    small read, and no hash library on the hot path.
    """
    args = _tool_args(profile, no_setid)
    tool = paths.native_binary("ak-seccomp")
    st = tool.stat()
    key = "\0".join([*args, str(tool), str(st.st_mtime_ns), str(st.st_size), os.uname().machine])
    cache = paths.data_dir() / "cache" / "seccomp"
    name = f"{profile}-nosetid" if no_setid else profile
    out, key_file = cache / f"{name}.bpf", cache / f"{name}.key"
    try:
        if key_file.read_text() == key and out.is_file():
            return out
    except OSError:
        pass
    cache.mkdir(parents=True, exist_ok=True)
    # Unique per call, not per process: a daemon's pool refill and a run may compile the
    # same program at once on two threads.
    tmp = cache / f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    try:
        res = subprocess.run([str(tool), *args, "-o", str(tmp)], capture_output=True, text=True,
                             check=False)  # fmt: skip
        if res.returncode != 0:
            raise SandboxError(f"ak-seccomp failed ({res.returncode}): {res.stderr.strip()}")
        size = tmp.stat().st_size
        if size == 0 or size % 8:  # struct sock_filter is 8 bytes
            raise SandboxError(f"ak-seccomp wrote a malformed BPF program ({size} bytes)")
        # The program first, then its key: a reader that sees the new key sees the new program.
        os.replace(tmp, out)
        tmp.write_text(key)
        os.replace(tmp, key_file)
    finally:
        tmp.unlink(missing_ok=True)
    return out
