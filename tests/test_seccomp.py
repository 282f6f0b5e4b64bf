"""Seccomp policy: the deny lists, and the BPF compiled by ak-seccomp, under real bwrap."""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agentkernel import seccomp
from agentkernel.errors import AgentKernelError, UsageError

X86_64 = platform.machine() == "x86_64"
SIGSYS_EXIT = 128 + 31  # bwrap reports a child killed by SIGSYS like a shell does


def _tool() -> Path:
    try:
        from agentkernel import paths

        return paths.native_binary("ak-seccomp")
    except AgentKernelError as exc:
        pytest.skip(f"ak-seccomp not built ({exc.message})")


@pytest.fixture(scope="module")
def bpf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    _tool()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AGENTKERNEL_HOME", str(tmp_path_factory.mktemp("akhome")))
        yield {p: seccomp.compile_bpf(p) for p in seccomp.PROFILES}


def _bwrap(argv: list[str], bpf_path: Path | None,
           preexec_fn: Callable[[], object] | None = None) -> subprocess.CompletedProcess[str]:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap not installed")
    cmd = ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/",
           "--proc", "/proc", "--dev", "/dev"]  # fmt: skip
    if bpf_path is None:
        return subprocess.run([*cmd, "--", *argv], capture_output=True, text=True, timeout=60,
                              preexec_fn=preexec_fn)  # fmt: skip
    fd = os.open(bpf_path, os.O_RDONLY)
    try:
        return subprocess.run([*cmd, "--seccomp", str(fd), "--", *argv], pass_fds=(fd,),
                              capture_output=True, text=True, timeout=60,
                              preexec_fn=preexec_fn)  # fmt: skip
    finally:
        os.close(fd)


# Runs inside the sandbox: raw syscalls by x86_64 number, printing errno (0 = success).
PROBE = r"""
import ctypes, json, os, threading
libc = ctypes.CDLL(None, use_errno=True)
L = ctypes.c_long
def sc(nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(L(nr), *[L(a) for a in args])
    return ctypes.get_errno() if r == -1 else 0
keep = []  # C strings must outlive the call
def cstr(b):
    keep.append(ctypes.create_string_buffer(b))
    return ctypes.addressof(keep[-1])
buf = ctypes.create_string_buffer(8)
out = {
    "mount": sc(165, cstr(b"none"), cstr(b"/tmp"), cstr(b"tmpfs"), 0, 0),
    "keyctl": sc(250, 0, -3, 0),
    "add_key": sc(248, 0, 0, 0, 0, 0),
    "bpf": sc(321, 0, 0, 0),
    "setns": sc(308, -1, 0),
    "chroot": sc(161, cstr(b"/")),
    "perf_event_open": sc(298, 0, 0, -1, -1, 0),
    "unshare_user": sc(272, 0x10000000),
    "unshare_net": sc(272, 0x40000000),
    "unshare_files": sc(272, 0x400),
    "clone3": sc(435, 0, 0),
    "ptrace": sc(101, 7, 0, 0, 0),
    "io_uring_setup": sc(425, 1, 0),
    "personality": sc(135, 0xFFFFFFFF),
    "tiocsti": sc(16, -1, 0x5412, ctypes.addressof(buf)),
    "tiocsti_high_bits": sc(16, -1, 0x1_0000_5412, ctypes.addressof(buf)),
    "getpid": sc(39),
    "vsock": sc(41, 40, 1, 0),
    "vsock_high_bits": sc(41, 0x1_0000_0028, 1, 0),
    "inet": sc(41, 2, 1, 0),
}
t = threading.Thread(target=lambda: None); t.start(); t.join()  # clone3 -> clone fallback
pid = os.fork()
if pid == 0:
    os._exit(7)
out["fork"] = os.waitpid(pid, 0)[1] >> 8
print(json.dumps(out))
"""

EPERM, ENOSYS, EAFNOSUPPORT = 1, 38, 97
ALWAYS_EPERM = ("mount", "keyctl", "add_key", "bpf", "setns", "chroot", "perf_event_open",
                "unshare_user", "unshare_net", "tiocsti", "tiocsti_high_bits")  # fmt: skip


def test_deny_lists() -> None:
    for profile in seccomp.PROFILES:
        deny = seccomp.deny_list(profile)
        assert len(deny) == len(set(deny))
        for name in ("mount", "pivot_root", "chroot", "kexec_load", "init_module", "bpf",
                     "keyctl", "setns", "userfaultfd", "open_by_handle_at", "fsopen"):  # fmt: skip
            assert name in deny
        assert "unshare" not in deny  # only its namespace flags are denied
    assert "ptrace" not in seccomp.deny_list("permissive")
    for profile in ("moderate", "restrictive"):
        deny = seccomp.deny_list(profile)
        assert {"ptrace", "process_vm_writev", "io_uring_setup"} <= set(deny)
    assert set(seccomp.deny_list("moderate")) < set(seccomp.deny_list("restrictive"))
    with pytest.raises(UsageError):
        seccomp.deny_list("bogus")


def test_compile_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tool()
    monkeypatch.setenv("AGENTKERNEL_HOME", str(tmp_path))
    first = seccomp.compile_bpf("moderate")
    assert first.parent == tmp_path / "cache" / "seccomp"
    assert first.stat().st_size > 0 and first.stat().st_size % 8 == 0
    mtime = first.stat().st_mtime_ns
    assert seccomp.compile_bpf("moderate") == first
    assert first.stat().st_mtime_ns == mtime  # served from cache, not rebuilt
    assert seccomp.compile_bpf("permissive") != first
    assert not list(first.parent.glob(".*.tmp"))


def test_tool_skips_unknown_names(tmp_path: Path) -> None:
    out = tmp_path / "x.bpf"
    argv = [str(_tool()), "--default", "allow", "--errno", "mount", "no_such_syscall"]
    res = subprocess.run([*argv, "-o", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "no_such_syscall" in res.stderr
    assert out.stat().st_size > 0
    bad = subprocess.run([str(_tool()), "--default", "deny", "-o", str(out)], capture_output=True)
    assert bad.returncode == 2


@pytest.mark.skipif(not X86_64, reason="probe uses x86_64 syscall numbers")
@pytest.mark.parametrize("profile", seccomp.PROFILES)
def test_bwrap_enforces_profile(profile: str, bpf: dict[str, Path]) -> None:
    res = _bwrap([sys.executable, "-S", "-c", PROBE], bpf[profile])
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    for name in ALWAYS_EPERM:
        assert got[name] == EPERM, (name, got)
    assert got["clone3"] == ENOSYS
    assert got["unshare_files"] == 0  # unshare without namespace flags stays allowed
    assert got["getpid"] == 0 and got["fork"] == 7
    # AF_VSOCK in every profile (a netns does not confine it), the kernel's int only
    assert got["vsock"] == got["vsock_high_bits"] == EAFNOSUPPORT and got["inet"] == 0
    strict = profile != "permissive"
    assert (got["ptrace"] == EPERM) is strict
    assert (got["io_uring_setup"] == EPERM) is strict
    assert (got["personality"] == EPERM) is (profile == "restrictive")


@pytest.mark.skipif(not X86_64, reason="probe uses x86_64 syscall numbers")
def test_probe_differs_without_filter() -> None:
    """Control: without the filter the same calls don't all fail with EPERM/ENOSYS."""
    res = _bwrap([sys.executable, "-S", "-c", PROBE], None)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["clone3"] != ENOSYS
    for name in ("tiocsti", "setns", "bpf", "ptrace"):
        assert got[name] != EPERM, (name, got)


@pytest.mark.parametrize("argv", [["true"], ["ls", "/"], ["python3", "-c", "print(1)"],
                                  ["sh", "-c", "echo hi | cat"]])  # fmt: skip
def test_normal_commands_work(argv: list[str], bpf: dict[str, Path]) -> None:
    for profile in seccomp.PROFILES:
        res = _bwrap(argv, bpf[profile])
        assert res.returncode == 0, (profile, res.stderr)


def test_unshare_command_fails(bpf: dict[str, Path]) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("util-linux unshare missing")
    res = _bwrap(["unshare", "-U", "true"], bpf["permissive"])
    assert res.returncode != 0
    assert "Operation not permitted" in res.stderr


INT80 = r"""
import ctypes, mmap
m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
m.write(bytes.fromhex("b814000000cd80c3"))  # mov eax, 20 (i386 getpid); int 0x80; ret
fn = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(m)))
print(fn())
"""
X32 = r"""
import ctypes
print(ctypes.CDLL(None).syscall(ctypes.c_long(0x40000000 | 39)))  # x32 getpid
"""


@pytest.mark.skipif(not X86_64, reason="foreign-ABI check is x86_64-specific")
def test_int80_kills_process(bpf: dict[str, Path]) -> None:
    control = _bwrap([sys.executable, "-S", "-c", INT80], None)
    if control.returncode != 0:
        pytest.skip(f"int 0x80 unavailable here (no IA32 emulation?): rc={control.returncode}")
    res = _bwrap([sys.executable, "-S", "-c", INT80], bpf["permissive"])
    assert res.returncode == SIGSYS_EXIT, (res.returncode, res.stdout, res.stderr)


@pytest.mark.skipif(not X86_64, reason="x32 exists on x86_64 only")
def test_x32_syscall_kills_process(bpf: dict[str, Path]) -> None:
    res = _bwrap([sys.executable, "-S", "-c", X32], bpf["permissive"])
    assert res.returncode == SIGSYS_EXIT, (res.returncode, res.stdout, res.stderr)


# Runs inside the sandbox, started with RLIMIT_CORE 1 (as the agent leaves it): each way
# to change it, by x86_64 number, with its errno (0 = success) and the limit after it.
CORE_PROBE = r"""
import ctypes, json, resource
libc = ctypes.CDLL(None, use_errno=True)
L = ctypes.c_long
def sc(nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(L(nr), *[L(a) for a in args])
    return ctypes.get_errno() if r == -1 else 0
zero, old = (ctypes.c_ulong * 2)(0, 0), (ctypes.c_ulong * 2)(7, 7)
out = {}
def step(name, errno):
    out[name] = [errno, list(resource.getrlimit(resource.RLIMIT_CORE))]
step("setrlimit", sc(160, 4, ctypes.addressof(zero)))
step("setrlimit_high_bits", sc(160, 0x1_0000_0004, ctypes.addressof(zero)))
step("prlimit_new", sc(302, 0, 4, ctypes.addressof(zero), 0))
step("prlimit_new_old", sc(302, 0, 4, ctypes.addressof(zero), ctypes.addressof(old)))
step("prlimit_read", sc(302, 0, 4, 0, ctypes.addressof(old)))
out["read"] = list(old)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))  # other limits stay the command's own
out["nofile"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
print(json.dumps(out))
"""


def _core_one() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (1, 1))


@pytest.mark.skipif(not X86_64, reason="probe uses x86_64 syscall numbers")
@pytest.mark.parametrize("profile", seccomp.PROFILES)
def test_core_limit_stays_one(profile: str, bpf: dict[str, Path]) -> None:
    """RLIMIT_CORE 1 is the one value that keeps a pipe core_pattern (apport,
    systemd-coredump: host root) from running on a crash: no command changes it. A change
    succeeds without effect (ssh-agent exits where turning cores off fails); a prlimit
    that also reads the old limit is refused, as success would leave that unwritten."""
    res = _bwrap([sys.executable, "-S", "-c", CORE_PROBE], bpf[profile], _core_one)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    for name in ("setrlimit", "setrlimit_high_bits", "prlimit_new"):
        assert got[name] == [0, [1, 1]], (name, got)
    assert got["prlimit_new_old"] == [EPERM, [1, 1]]
    assert got["prlimit_read"] == [0, [1, 1]] and got["read"] == [1, 1]
    assert got["nofile"] == [64, 64]
    control = _bwrap([sys.executable, "-S", "-c", CORE_PROBE], None, _core_one)
    assert json.loads(control.stdout)["setrlimit"] == [0, [0, 0]], control.stderr
