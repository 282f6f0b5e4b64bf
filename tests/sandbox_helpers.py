"""Helpers shared by the sandbox tests: run the real CLI, probe the network from inside."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BACKENDS = ["namespaces", "gvisor"]


def backend_available(name: str) -> bool:
    return shutil.which({"namespaces": "bwrap", "gvisor": "runsc"}[name]) is not None


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def ak(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    input: bytes | None = None,
    timeout: float = 120,
) -> Result:
    """Run the real `agentkernel` CLI in a subprocess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "agentkernel", *args],
        cwd=cwd,
        env=full_env,
        input=input,
        capture_output=True,
        timeout=timeout,
        check=False,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    return Result(
        proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    )


@dataclass
class NetnsHost:
    """A test host living in a network namespace the suite created."""

    ns: str
    addr: str
    port: int


# A probe run inside the sandbox: connect to host:port, print what came back or 'blocked'.
CONNECT_PROBE = (
    "import socket,sys\n"
    "try:\n"
    "    s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)\n"
    "    print('reached', s.recv(100).decode().strip())\n"
    "except OSError as e:\n"
    "    print('blocked', type(e).__name__)\n"
)
