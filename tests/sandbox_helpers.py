"""Helpers shared by the sandbox tests: run the real CLI, probe the network from inside."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

BACKENDS = ["namespaces", "gvisor"]
# Run by the `backend` fixture too, each on a real engine (tests/engines.py), for the tests
# that do not say otherwise (`@pytest.mark.no_containers("why")`).
CONTAINER_BACKENDS = ["docker", "podman"]
_NEEDS = {"namespaces": "bwrap", "gvisor": "runsc", "docker": "dockerd", "podman": "podman"}


def backend_available(name: str) -> bool:
    if name in CONTAINER_BACKENDS and os.geteuid() != 0:
        return False  # the suite starts dockerd and imports images as root
    return shutil.which(_NEEDS[name], path="/usr/sbin:/usr/bin:/sbin:/bin") is not None


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
    host_addr: str = ""  # the host's own end of the veth: an address of the host
    denied: dict[str, str] = field(default_factory=dict)  # kind -> address it also serves


@dataclass
class HostServers:
    """TCP servers on the host's own (non-loopback) addresses, all on one port."""

    addrs: list[str]
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


SYSTEM_PYTHON = "/usr/bin/python3"  # an ordinary user cannot read the suite's interpreter


@functools.lru_cache(maxsize=1)
def public_pythonpath() -> str:
    """A PYTHONPATH any user can read: this checkout's package and the venv's
    site-packages, hard-linked (copied across filesystems) into a world-readable dir,
    because the checkout and the suite's interpreter may sit in root's private dirs (CI
    clones into one). Use it with SYSTEM_PYTHON; removed when the suite ends."""
    import atexit
    import site
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="ak-public-py-", dir="/tmp"))
    atexit.register(shutil.rmtree, top, True)
    top.chmod(0o755)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    package = Path(__file__).resolve().parent.parent / "src" / "agentkernel"
    shutil.copytree(package, top / "src" / "agentkernel", copy_function=link,
                    ignore=shutil.ignore_patterns("__pycache__"))
    packages = next(p for p in site.getsitepackages() if p.endswith("site-packages"))
    shutil.copytree(packages, top / "site", copy_function=link, symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "__editable__*", "*.pth"))
    for d in (top, top / "src", top / "site"):
        d.chmod(0o755)
    return f"{top / 'src'}:{top / 'site'}"
# Run as root in a private mount namespace: put a 0666 /dev/net/tun (the usual mode; this
# build host's is 0600) over the real one, for this namespace only, then exec argv[2:].
_TUN_SHIM = (
    "import os,subprocess,sys\n"
    "d=sys.argv[1]\n"
    "subprocess.run(['mount','-t','tmpfs','-o','mode=755','tmpfs',d],check=True)\n"
    "os.mknod(d+'/tun',0o20666,os.makedev(10,200)); os.chmod(d+'/tun',0o666)\n"
    "subprocess.run(['mount','--bind',d+'/tun','/dev/net/tun'],check=True)\n"
    "os.execvp(sys.argv[2],sys.argv[2:])\n"
)


def ak_as_user(uid: int, home: Path, *args: str, cwd: Path, timeout: float = 120,
               env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """The real CLI (this checkout's sources, the system's python3) as host user `uid`,
    with its own data and runtime dirs under `home` (which `uid` must own), started in the
    background. Needs root, util-linux and setpriv."""
    src = public_pythonpath()
    tundir = home / "tun"
    tundir.mkdir(exist_ok=True)
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(home),
           "PYTHONPATH": src, "AGENTKERNEL_HOME": str(home / "data"),
           "AGENTKERNEL_RUNTIME_DIR": str(home / "run"), "AGENTKERNEL_DAEMON_AUTOSTART": "0",
           **(env or {})}
    argv = ["unshare", "--mount", "--propagation", "private", "--",
            SYSTEM_PYTHON, "-c", _TUN_SHIM, str(tundir),
            "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--",
            "timeout", str(int(timeout)), SYSTEM_PYTHON, "-m", "agentkernel", *args]
    return subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
