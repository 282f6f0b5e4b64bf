"""`auto`'s functional probe: a real sandbox stats, reads and writes; verdicts cached per version.

A backend that starts is not yet a backend that works: Debian 12's runsc (2022-12) starts
fine, then answers EINVAL to `statx`/`newfstatat` with AT_NO_AUTOMOUNT, so coreutils' `ls /`
fails inside it. Before `auto` picks a backend, that backend has run a real command on the
host's userland: `ls /` and `stat /` (the calls that break), a read of a file, a write and
read back under /tmp. The verdict is stored in the data dir's cache under a key made of the
backend's binaries (path, size, mtime), so a run reads one small file, and a changed binary
(an upgrade) is probed again. `agentkernel doctor` always probes afresh and stores what it saw.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from pathlib import Path

    from .base import Backend

# Each step is a command a real workload runs first; the first one to fail names the cause.
PROBE_SCRIPT = (
    "ls / >/dev/null && stat / >/dev/null && head -c 1 /bin/sh >/dev/null "
    "&& echo agentkernel-probe >/tmp/.ak-probe && cat /tmp/.ak-probe"
)
PROBE_OUTPUT = b"agentkernel-probe\n"
PROBE_TIMEOUT = 60.0  # gVisor's ptrace platform under load takes seconds, never minutes
CACHE_PREFIX = "probe-"


class Verdict(NamedTuple):
    """Whether a backend ran the probe command correctly, and if not, why (one line)."""

    ok: bool
    detail: str
    # The probe command ran and showed it: kept until the binaries change. A sandbox that
    # did not start at all may have met something passing (a full disk, a bad runtime dir,
    # a busy host): that verdict is kept only RETRY_AFTER seconds.
    conclusive: bool = True


RETRY_AFTER = 60.0


def version_key(backend: Backend) -> str:
    """What identifies this build of the backend: each of its binaries' path, size, mtime."""
    parts = []
    for path in backend.version_files():
        try:
            st = os.stat(path)
        except OSError:
            parts.append(f"{path}:missing")
            continue
        parts.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def _cache_file(backend: Backend) -> Path:
    from ..paths import data_dir

    return data_dir() / "cache" / f"{CACHE_PREFIX}{backend.name}"


def cached(backend: Backend) -> Verdict | None:
    """The stored verdict for this very build of the backend, or None (never probed, or
    its binaries changed since)."""
    import time

    try:
        key, state, detail, until = (_cache_file(backend).read_text() + "\n").split("\n")[:4]
    except (OSError, ValueError):
        return None
    if key != version_key(backend) or state not in ("ok", "fail"):
        return None
    if until and not (until.replace(".", "", 1).isdigit() and time.time() < float(until)):
        return None
    return Verdict(state == "ok", detail.strip(), not until)


def store(backend: Backend, verdict: Verdict, key: str) -> None:
    """Write the verdict atomically (concurrent first runs may both probe; either wins)."""
    import time

    from ..paths import write_cache

    until = "" if verdict.conclusive else f"{time.time() + RETRY_AFTER:.0f}"
    write_cache(_cache_file(backend),
                f"{key}\n{'ok' if verdict.ok else 'fail'}\n{verdict.detail}\n{until}\n")


def verdict(backend: Backend, *, fresh: bool = False) -> Verdict:
    """The cached verdict, else (or with `fresh`) a probe run now and stored."""
    if not fresh:
        hit = cached(backend)
        if hit is not None:
            return hit
    key = version_key(backend)  # before the run: a binary swapped meanwhile is probed again
    result = run_probe(backend)
    store(backend, result, key)
    return result


def run_probe(backend: Backend) -> Verdict:
    """Start a real sandbox of `backend` on the host's userland and run PROBE_SCRIPT in it."""
    from ..errors import AgentKernelError
    from ..profiles import get_profile
    from ..rootfs import host_rootfs
    from ..sandbox import SandboxSpec

    # The default profile's policy, without a network (nothing to reach; no slirp to start).
    profile = get_profile("moderate").with_overrides(network=False)
    spec = SandboxSpec(name=f"probe-{os.urandom(4).hex()}", profile=profile,
                       rootfs=host_rootfs(), image="host")
    try:
        sandbox = backend.start(spec)
    except AgentKernelError as exc:
        return Verdict(False, f"a sandbox did not start: {exc.message}", conclusive=False)
    except OSError as exc:
        return Verdict(False, f"a sandbox did not start: {exc}", conclusive=False)
    try:
        execution = sandbox.client.exec(
            ["/bin/sh", "-c", PROBE_SCRIPT], cwd="/",
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C"},
            timeout=PROBE_TIMEOUT, rlimits=sandbox.command_rlimits())
        out, err, status = execution.wait(PROBE_TIMEOUT + 10)
    except (AgentKernelError, TimeoutError, OSError) as exc:
        return Verdict(False, f"the probe command could not run: {exc}", conclusive=False)
    finally:
        sandbox.destroy()
    if status.shell_code == 0 and out == PROBE_OUTPUT:
        return Verdict(True, "stat, read and /tmp write work")
    return Verdict(False, _explain(backend, err, status.shell_code))


def _explain(backend: Backend, err: bytes, code: int) -> str:
    """The probe's first error line, with the known cause where there is one."""
    lines = [ln.strip() for ln in err.decode(errors="replace").splitlines() if ln.strip()]
    first = lines[0][:160] if lines else f"exit status {code}"
    hint = backend.probe_failure_hint(first)
    return f"{first} ({hint})" if hint else first
