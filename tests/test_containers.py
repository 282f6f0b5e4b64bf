"""The docker and podman backends against real engines: runs, the escape subset that
applies to containers, persistent sandboxes, and that nothing we create is left behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_helpers import ak

ENGINES = ["docker", "podman"]
IMAGE = "agentkernel-test/busybox:containers"
DOCKERD = "/usr/sbin/dockerd"
DOCKER_SOCK = "/var/run/docker.sock"
CLI = {"docker": "/usr/bin/docker", "podman": "/usr/bin/podman"}  # Debian's, not /usr/local


def _answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A running Docker engine: the one there is, or one we start (and stop afterwards)."""
    if os.geteuid() != 0 or not os.path.exists(DOCKERD):
        pytest.skip("needs root and Debian's docker.io")
    proc = None
    if not _answers(DOCKER_SOCK):
        log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen([DOCKERD], stdout=f, stderr=f, start_new_session=True)
        deadline = time.monotonic() + 60
        while not _answers(DOCKER_SOCK):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dockerd did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
    yield
    if proc is not None:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture(scope="session")
def podman_ready() -> Iterator[None]:
    """Podman rootful, with /etc/subuid entries for --userns=auto (as a fresh CI machine
    needs them); the API service our backend starts is stopped at the end."""
    if os.geteuid() != 0 or shutil.which("podman") is None:
        pytest.skip("needs root and podman")
    for f in ("/etc/subuid", "/etc/subgid"):
        text = Path(f).read_text() if os.path.exists(f) else ""
        if not any(line.startswith("containers:") for line in text.splitlines()):
            with open(f, "a") as out:
                out.write("containers:2147483647:2147483648\n")
    yield
    pidfile = Path(os.environ["AGENTKERNEL_RUNTIME_DIR"]) / "podman.pid"
    if pidfile.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pidfile.read_text()), signal.SIGTERM)


@pytest.fixture(scope="session")
def busybox_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bbroot")
    (root / "bin").mkdir()
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    for tool in ("sh", "cat", "echo", "ls", "id", "sleep", "grep", "wc", "touch", "true"):
        (root / "bin" / tool).symlink_to("busybox")
    for d in ("etc", "tmp", "root", "workspace"):
        (root / d).mkdir()
    tar = root.parent / "busybox.tar"
    with tarfile.open(tar, "w") as t:
        for entry in sorted(os.listdir(root)):
            t.add(str(root / entry), arcname=entry)
    return tar


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest, busybox_tar: Path) -> str:
    name: str = request.param
    request.getfixturevalue("dockerd" if name == "docker" else "podman_ready")
    subprocess.run([CLI[name], "import", str(busybox_tar), IMAGE], check=True,
                   capture_output=True, timeout=120)
    return name


def ours(engine: str) -> list[str]:
    """Containers of this user labelled as ours, any state."""
    out = subprocess.run([CLI[engine], "ps", "-a", "--format", "{{.Names}}", "--filter",
                          f"label=agentkernel.owner={os.getuid()}"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return [n for n in out.split() if n]


def no_leftovers(engine: str, before: set[str]) -> None:
    deadline = time.monotonic() + 20  # the engine removes one-off containers as they end
    while set(ours(engine)) - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert set(ours(engine)) - before == set()


def test_run_core(engine: str, tmp_path: Path) -> None:
    """Exit code, stdout/stderr apart, stdin, env, workdir, through the agent."""
    before = set(ours(engine))
    r = ak("run", "-q", "-B", engine, "-i", IMAGE, "-e", "FOO=bar", "--workdir", "/tmp", "--",
           "sh", "-c", "echo out; echo err >&2; cat; echo $FOO; pwd; exit 7",
           cwd=tmp_path, input=b"from-stdin\n")
    assert r.returncode == 7, r.stderr
    assert r.stdout == "out\nfrom-stdin\nbar\n/tmp\n"
    assert "err\n" in r.stderr
    r = ak("run", "-q", "-B", engine, "-i", IMAGE, "--workdir", "/tmp", "--timeout", "1", "--",
           "sleep", "30", cwd=tmp_path)
    assert r.returncode == 124, r.stderr
    no_leftovers(engine, before)


def test_escape_subset(engine: str, tmp_path: Path) -> None:
    """restrictive on the host's userland: no capabilities, no_new_privs, seccomp, read-only
    root and project, no engine or host control socket, secrets masked, pids capped."""
    script = (
        "grep -E '^(CapEff|CapBnd|CapPrm|NoNewPrivs|Seccomp):' /proc/self/status;"
        "touch /usr/x 2>/dev/null && echo ROOT-WRITABLE;"
        "touch /workspace/x 2>/dev/null && echo WS-WRITABLE;"
        "for s in /var/run/docker.sock /run/docker.sock /run/podman/podman.sock"
        " /run/containerd/containerd.sock; do [ -e $s ] && echo SOCKET $s; done;"
        "find / -xdev -type s 2>/dev/null | grep -v '^/proc' | sed 's/^/SOCKET /';"
        "echo shadow=$(cat /etc/shadow 2>/dev/null | wc -c);"
        "python3 -c \"import os\nn=0\ntry:\n for i in range(64):\n  if os.fork()==0:\n"
        "   import time; time.sleep(3); os._exit(0)\n  n+=1\nexcept OSError: pass\n"
        "print('forked', n)\";"
    )
    r = ak("run", "-q", "-B", engine, "-i", "host", "-p", "restrictive", "--pids", "16",
           "-w", "/tmp", "--",
           "sh", "-c", script, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for cap in ("CapEff", "CapBnd", "CapPrm"):
        assert f"{cap}:\t0000000000000000" in out
    assert "NoNewPrivs:\t1" in out and "Seccomp:\t2" in out
    assert "WRITABLE" not in out and "SOCKET" not in out, out
    assert "shadow=0" in out
    forked = int(out.split("forked ")[1].split()[0])
    assert forked < 16, out


def test_kill_cli_leaves_nothing(engine: str, tmp_path: Path) -> None:
    """A CLI killed mid-run: the agent sees its channel close, exits, the engine removes the
    container."""
    before = set(ours(engine))
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-m", "agentkernel", "run", "-q", "-B", engine,
                             "-i", IMAGE, "-w", "/tmp", "--", "sh", "-c", "echo up; sleep 60"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                            cwd=tmp_path)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"up\n"
    proc.kill()
    proc.wait()
    no_leftovers(engine, before)


def test_lifecycle(engine: str, tmp_path: Path) -> None:
    """create / exec / stop / start (the container layer is kept) / rm (nothing left)."""
    before = set(ours(engine))
    name = f"ct-{engine}"
    r = ak("create", name, "-B", engine, "-i", IMAGE, "-p", "moderate", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    try:
        r = ak("exec", "-w", "/tmp", name, "--", "sh", "-c", "echo kept > /root/f; exit 3",
               cwd=tmp_path)
        assert r.returncode == 3, r.stderr
        assert ak("stop", name, cwd=tmp_path).returncode == 0
        assert ak("start", name, cwd=tmp_path).returncode == 0
        r = ak("exec", "-w", "/tmp", name, "--", "cat", "/root/f", cwd=tmp_path)
        assert (r.returncode, r.stdout) == (0, "kept\n"), r.stderr
    finally:
        r = ak("rm", name, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    no_leftovers(engine, before)


def test_doctor_says_who_root_is(engine: str) -> None:
    from agentkernel.backends import get_backend

    detail = get_backend(engine).probe(deep=True).detail
    assert "the sandbox's root is" in detail
    if engine == "docker":
        info = json.loads(subprocess.run([CLI["docker"], "info", "--format", "{{json .}}"],
                                         capture_output=True, text=True, check=True).stdout)
        remapped = any("userns" in o for o in info.get("SecurityOptions") or [])
        assert ("host root" in detail) != remapped
