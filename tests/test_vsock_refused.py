"""AF_VSOCK is refused in every profile: a network namespace does not confine it.

A sandbox on a VM guest (this machine is a Firecracker guest) reached the hypervisor's
host (CID 2) and the guest's own vsock services through socket(AF_VSOCK), whatever its
network setting: an outside review opened one from a restrictive sandbox with no network.
Docker's default profile refuses that family; ours (the agent's filter, and the container
profile that replaces the engine's) now does too, with EAFNOSUPPORT. These open one from
real sandboxes: plainly, and with junk in the family argument's upper half (the kernel
reads an int). The container profile is attacked in tests/test_container_seccomp.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox_helpers import backend_available

pytestmark = pytest.mark.skipif(not backend_available("namespaces"), reason="needs bwrap")

PROBE = r"""
import ctypes, errno, socket
libc = ctypes.CDLL(None, use_errno=True)
def sock(label, family):
    fd = libc.syscall(ctypes.c_long(41), ctypes.c_long(family), ctypes.c_long(1),
                      ctypes.c_long(0))  # socket(family, SOCK_STREAM, 0), x86_64
    print(label, "open" if fd >= 0 else errno.errorcode[ctypes.get_errno()], flush=True)
sock("vsock", socket.AF_VSOCK)
sock("vsock-high-bits", (1 << 32) | socket.AF_VSOCK)
sock("inet", socket.AF_INET)
sock("unix", socket.AF_UNIX)
"""


def _host_has_vsock() -> bool:
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the probe uses x86_64 numbers")
@pytest.mark.skipif(os.geteuid() != 0, reason="a root-started sandbox")
@pytest.mark.parametrize("profile", ["permissive", "restrictive"])
def test_no_profile_opens_a_vsock(tmp_path: Path, profile: str) -> None:
    r = subprocess.run([sys.executable, "-P", "-m", "agentkernel", "run", "-q", "--backend",
                        "namespaces", "--profile", profile, "--", "python3", "-c", PROBE],
                       cwd=tmp_path, env={**os.environ, "AGENTKERNEL_NO_DAEMON": "1"},
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                       check=False)
    got = dict(ln.split() for ln in r.stdout.splitlines() if len(ln.split()) == 2)
    assert got == {"vsock": "EAFNOSUPPORT", "vsock-high-bits": "EAFNOSUPPORT",
                   "inet": "open", "unix": "open"}, (_host_has_vsock(), r)
    assert r.returncode == 0, r
