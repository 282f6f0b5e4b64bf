"""User-mode egress networking (slirp4netns) for sandboxes in their own network namespace."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
from pathlib import Path

from .errors import BackendUnavailable, SandboxError

SLIRP_DNS = "10.0.2.3"
RESOLV_CONF = f"nameserver {SLIRP_DNS}\noptions edns0 trust-ad\n"


def slirp_available() -> str | None:
    return shutil.which("slirp4netns")


def write_resolv_conf(scratch: Path) -> Path:
    """The sandbox's resolv.conf: slirp's DNS forwarder, never the host's loopback resolver."""
    path = scratch / "resolv.conf"
    path.write_text(RESOLV_CONF)
    return path


def start_slirp(target_pid: int, log: Path, *, timeout: float = 10.0) -> subprocess.Popen[bytes]:
    """Attach slirp4netns to the network namespace of `target_pid` and wait until it is up.

    `--disable-host-loopback` is what keeps the host's 127.0.0.1 out of reach; the
    sandbox gets 10.0.2.100/24 with 10.0.2.2 as gateway.
    """
    binary = slirp_available()
    if binary is None:
        raise BackendUnavailable(
            "egress networking needs slirp4netns (apt install slirp4netns), "
            "or use --no-network"
        )
    ready_r, ready_w = os.pipe()
    logf = open(log, "wb")  # noqa: SIM115 - handed to the child, closed below
    try:
        proc = subprocess.Popen(
            [binary, "--configure", "--mtu=65520", "--disable-host-loopback",
             "--enable-seccomp", f"--ready-fd={ready_w}", str(target_pid), "tap0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logf,
            pass_fds=(ready_w,), close_fds=True,
            start_new_session=True,  # the terminal's Ctrl-C is for the command, not for us
        )
        os.close(ready_w)
        ready_w = -1
        readable, _, _ = select.select([ready_r], [], [], timeout)
        if not readable or os.read(ready_r, 1) != b"1":
            proc.kill()
            proc.wait()
            lines = log.read_text(errors="replace").strip().splitlines() or ["timed out"]
            raise SandboxError(f"slirp4netns failed to set up the sandbox network: {lines[-1]}")
        return proc
    finally:
        logf.close()
        os.close(ready_r)
        if ready_w >= 0:
            with contextlib.suppress(OSError):
                os.close(ready_w)
