"""Red team, round 6: a crash in a sandbox never runs the host's core-dump helper.

Where `kernel.core_pattern` is a pipe (`|/usr/share/apport/apport …` on Ubuntu,
`|/usr/lib/systemd/systemd-coredump …` wherever systemd-coredump is installed), the kernel
runs that program for every crash on the host, as host root in the host's namespaces, and
feeds it the crashed process's memory. `RLIMIT_CORE` 0 does not stop it: the kernel
ignores the limit for a pipe, but for the one value 1 ("aborting core"). So every command
of a sandbox (any profile; namespaces, docker, podman; started by root or by an ordinary
user) that crashes hands host root's helper a core file it wrote: the helpers' parsers
and their container forwarding (apport's, into the crashed process's own root) have been
the way out of containers before, and a crash loop fills the host's crash store.

Fixed: the agent sets RLIMIT_CORE {1, 1} on itself before `install_seccomp` (its
commands inherit it; `cgroups.rlimit_floor` leaves RLIMIT_CORE out), and its filter
(`ak-seccomp --pin-core-limit`) answers a command's `setrlimit`/`prlimit64` of RLIMIT_CORE
without effect (success; EPERM where prlimit64 also asks for the old limit), so no command
lowers it to 0 again, which any process could. gVisor's sentry handles its commands'
crashes itself (no host core dump).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_helpers import backend_available, give_top, shared_top, top_env, top_run

NOBODY = 65534
CORE_PATTERN = Path("/proc/sys/kernel/core_pattern")
COMM = "akrt6crash"  # the crashing command's name, as the helper is told it (%e)

# A hostile command lowers its limit to 0 first, which brings the pipe helper back: the
# filter answers setrlimit without effect, and refuses a prlimit that asks for the old one.
CRASH = f"""
import ctypes, os, resource, signal
ctypes.CDLL(None).prctl(15, b"{COMM}", 0, 0, 0)  # PR_SET_NAME
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
try:
    resource.prlimit(0, resource.RLIMIT_CORE, (0, 0))
except PermissionError:
    pass
os.kill(os.getpid(), signal.SIGSEGV)
"""


@pytest.fixture
def top() -> Iterator[Path]:
    with shared_top("ak-rt6-core-") as path:
        yield path


@pytest.fixture
def pipe_helper() -> Iterator[Path]:
    """core_pattern a pipe to a helper of ours (as apport and systemd-coredump set it) for
    the test's length; the helper notes who crashed. The old pattern comes back after."""
    if os.geteuid() != 0 or not CORE_PATTERN.exists():
        pytest.skip("needs root to set kernel.core_pattern")
    where = Path(tempfile.mkdtemp(prefix="ak-rt6-corehelper-"))  # 0700, root's
    log = where / "crashes"
    helper = where / "helper"
    helper.write_text(f"#!/bin/sh\necho \"$1 $2\" >> {log}\nexec cat > /dev/null\n")
    helper.chmod(0o700)
    old = CORE_PATTERN.read_text()
    CORE_PATTERN.write_text(f"|{helper} %e %u\n")
    try:
        yield log
    finally:
        CORE_PATTERN.write_text(old)
        shutil.rmtree(where, ignore_errors=True)


@pytest.mark.parametrize(("backend", "user", "profile"), [
    ("namespaces", 0, "restrictive"),
    ("namespaces", NOBODY, "moderate"),
    ("docker", 0, "moderate"),
    ("podman", 0, "permissive"),
    ("gvisor", 0, "moderate"),
], ids=["ns-root-restrictive", "ns-nobody-moderate", "docker", "podman", "gvisor"])
def test_a_crash_in_a_sandbox_never_runs_the_hosts_core_helper(
        top: Path, pipe_helper: Path, backend: str, user: int, profile: str,
        request: pytest.FixtureRequest) -> None:
    if not backend_available(backend):
        pytest.skip(f"needs {backend}")
    if backend == "docker" and request.getfixturevalue("dockerd") == "root":
        pytest.skip("this machine's dockerd runs without userns-remap: refused")
    give_top(top, user)
    r = top_run(top, user, backend, profile, CRASH)
    assert r.returncode == 128 + signal.SIGSEGV, (r.returncode, r.stdout, r.stderr)
    # The helper has run by the time the crashed process is reaped (the kernel execs it
    # and writes the core before the exit completes), so its note is there if it ran.
    seen = pipe_helper.read_text() if pipe_helper.exists() else ""
    assert COMM not in seen, seen


@pytest.fixture
def dumps_after_setuid() -> Iterator[None]:
    """fs.suid_dumpable 2, as apport and systemd-coredump set it, for the test's length: a
    process that changed its ids (the wasm compiler child, started by root) dumps too."""
    knob = Path("/proc/sys/fs/suid_dumpable")
    old = knob.read_text()
    knob.write_text("2\n")
    try:
        yield
    finally:
        knob.write_text(old)


def test_a_wasm_compile_at_its_bounds_never_runs_the_hosts_core_helper(
        top: Path, pipe_helper: Path, dumps_after_setuid: None) -> None:
    """The compiler child (no agent, no filter of ours) dies by SIGABRT past its memory
    bound and by SIGXCPU past its CPU bound, both core-dumping signals, on an untrusted
    module: with RLIMIT_CORE 0 the helper got its memory, the module's bytes with it."""
    pytest.importorskip("wasmtime")
    from wasm_modules import big_function

    (top / "project" / "big.wasm").write_bytes(big_function(1 << 20))
    (top / "project" / "slow.wasm").write_bytes(big_function(3 << 20))
    env = top_env(top)
    for module, bound, said in (("big.wasm", {"AGENTKERNEL_WASM_COMPILE_MEMORY_MB": "160"},
                                 "MiB of memory"),
                                ("slow.wasm", {"AGENTKERNEL_WASM_COMPILE_CPU_SECONDS": "1"},
                                 "s of CPU time")):
        r = subprocess.run([sys.executable, "-P", "-m", "agentkernel", "run", module],
                           cwd=top / "project", env={**env, **bound}, capture_output=True,
                           text=True, timeout=240, stdin=subprocess.DEVNULL, check=False)
        assert r.returncode == 126 and said in r.stderr, (module, r.returncode, r.stderr)
    seen = pipe_helper.read_text() if pipe_helper.exists() else ""
    assert "python" not in seen, seen  # the child is our interpreter: python3.x
