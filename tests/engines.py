"""The container engines the suite drives (Debian's docker.io and podman): a Docker engine
with userns-remap started when none runs, Podman rootful, and the test image (a busybox
rootfs imported once per machine). Shared by test_containers.py and by the `backend`
fixture of conftest.py, which runs the escape battery and the core run tests on them too."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ENGINES = ["docker", "podman"]
DOCKERD = "/usr/sbin/dockerd"
DOCKER_SOCK = "/var/run/docker.sock"
CLI = {"docker": "/usr/bin/docker", "podman": "/usr/bin/podman"}  # Debian's, not /usr/local
PODMAN_ULIMITS = ["--ulimit", "nofile=1024:20000", "--ulimit", "nproc=1024:1024"]
IMAGE_LOCK = "/run/lock/agentkernel-test-images.lock"  # machine-wide: sessions run in parallel
RANGE = 65536  # the ids of one sandbox's user namespace


def skip_for_ordinary_users(backend: str) -> None:
    """Docker's engine is root's here (no docker group, no rootless dockerd): a test of an
    ordinary user's run has nothing to run on docker."""
    if backend == "docker":
        pytest.skip("docker's engine is root's: an ordinary user here cannot reach it")


def _answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _start_dockerd(args: list[str], sock: str, log: Path,
                   prefix: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        proc = subprocess.Popen([*prefix, DOCKERD, *args], stdout=f, stderr=f,
                                start_new_session=True)
    deadline = time.monotonic() + 60
    while not _answers(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"dockerd did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    return proc


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None:
        proc.terminate()
        proc.wait(timeout=60)


def docker_mode(sock: str = DOCKER_SOCK) -> str:
    """"remap", "rootless" or "root": what the engine at `sock` says of itself."""
    from agentkernel.backends.docker import engine_mode
    from agentkernel.backends.engine_http import EngineAPI

    return engine_mode(EngineAPI(sock, what="docker")).kind


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A running Docker engine and its mode: the machine's own if one runs (whatever its
    setting), else one we start with userns-remap (and stop afterwards)."""
    if os.geteuid() != 0 or not os.path.exists(DOCKERD):
        pytest.skip("needs root and Debian's docker.io")
    proc = None
    if not _answers(DOCKER_SOCK):
        log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
        proc = _start_dockerd(["--userns-remap=default"], DOCKER_SOCK, log)
    yield docker_mode()
    _stop(proc)


@pytest.fixture(scope="session")
def plain_dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The socket of a Docker engine without userns-remap: the machine's own when it runs
    like that, else a second one of ours (own data, exec root and socket, and a network
    namespace of its own: two engines in one fight over the host's bridges)."""
    if os.geteuid() != 0 or not os.path.exists(DOCKERD):
        pytest.skip("needs root and Debian's docker.io")
    if _answers(DOCKER_SOCK) and docker_mode() == "root":
        yield DOCKER_SOCK
        return
    base = tmp_path_factory.mktemp("plain-dockerd")
    sock = str(base / "docker.sock")
    proc = _start_dockerd([f"--data-root={base / 'data'}", f"--exec-root={base / 'exec'}",
                           f"--host=unix://{sock}", f"--pidfile={base / 'docker.pid'}",
                           "--bridge=none", "--iptables=false", "--ip-masq=false"],
                          sock, base / "dockerd.log", ("unshare", "--net", "--"))
    try:
        yield sock
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def podman_ready() -> Iterator[None]:
    """Podman rootful (no /etc/subuid entry needed: our own id ranges); the API service
    our backend starts is stopped at the end."""
    if os.geteuid() != 0 or shutil.which("podman") is None:
        pytest.skip("needs root and podman")
    run_dir = os.environ.get("AGENTKERNEL_RUNTIME_DIR")  # the suite's own (tests/conftest.py)
    yield
    pidfile = Path(run_dir or os.environ.get("AGENTKERNEL_RUNTIME_DIR", "/nonexistent"))
    pidfile = pidfile / "podman.pid"
    if pidfile.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pidfile.read_text()), signal.SIGTERM)


@pytest.fixture(scope="session")
def busybox_tar(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A busybox rootfs tarball, byte-for-byte the same in every session on this machine
    (fixed times and owners), and its reference: tagged by its content, so that sessions
    never move one another's tag to another image (see `ensure_image`)."""
    import hashlib

    root = tmp_path_factory.mktemp("bbroot")
    (root / "bin").mkdir()
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    for tool in ("sh", "cat", "echo", "ls", "id", "sleep", "grep", "wc", "touch", "true"):
        (root / "bin" / tool).symlink_to("busybox")
    for d in ("etc", "tmp", "root", "workspace"):
        (root / d).mkdir()

    def fixed(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        return info

    tar = root.parent / "busybox.tar"
    with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT) as t:
        for entry in sorted(os.listdir(root)):
            t.add(str(root / entry), arcname=entry, filter=fixed)
    digest = hashlib.sha256(tar.read_bytes()).hexdigest()[:12]
    return tar, f"agentkernel-test/busybox:{digest}"


def _image_works(cli: list[str], ref: str) -> bool:
    extra = PODMAN_ULIMITS if cli[0] == CLI["podman"] and os.geteuid() == 0 else []
    r = subprocess.run([*cli, "run", "--rm", "--network", "none", *extra, "--entrypoint",
                        "/bin/busybox", ref, "test", "-x", "/bin/sh"],
                       capture_output=True, timeout=120, check=False, cwd="/")
    return r.returncode == 0


def ensure_image(cli: list[str], tar: Path, ref: str) -> None:
    """`ref` in the engine, imported once per machine and checked to work.

    The flake this replaces: every test imported the same tag again (a new image each
    time, the tag moved) while other sessions did the same concurrently, and a run then
    found an image without /bin/busybox. Now: a tag per content, imported under a
    machine-wide lock, an image that fails the check removed and imported again."""
    import fcntl

    with open(IMAGE_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _image_works(cli, ref):
            return
        # cwd "/": as another user, the engine cannot enter CI's checkout (a 0700 dir).
        subprocess.run([*cli, "rmi", "-f", ref], capture_output=True, timeout=120,
                       check=False, cwd="/")
        r = subprocess.run([*cli, "import", str(tar), ref], capture_output=True, timeout=120,
                           check=False, cwd="/")
        assert r.returncode == 0, f"{' '.join(cli[-2:])} import: {r.stderr[-800:]!r}"
        assert _image_works(cli, ref), f"{ref} imported into {cli[0]} does not work"
