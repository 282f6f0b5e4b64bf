"""The docker and podman backends against real engines: runs, the escape subset that
applies to containers, persistent sandboxes, and that nothing we create is left behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engines import CLI, ENGINES, RANGE, ensure_image
from sandbox_helpers import ak, container_ready, host_runner

IMAGE = ""  # set by the `engine` fixture: the test image's content-addressed reference


_READY: set[str] = set()


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest, busybox_tar: tuple[Path, str]) -> str:
    global IMAGE
    name: str = request.param
    container_ready(request, name)
    tar, IMAGE = busybox_tar
    if name not in _READY:
        ensure_image([CLI[name]], tar, IMAGE)
        _READY.add(name)
    return name


def ours(engine: str, home: str | None = None) -> list[str]:
    """Containers of this user and of data dir `home` (the suite's by default), any state:
    not another agentkernel user's of this machine (root's are all of uid 0)."""
    from agentkernel.backends.container_engine import LABEL_HOME, LABEL_OWNER, home_label

    out = subprocess.run([CLI[engine], "ps", "-a", "--format", "{{.Names}}",
                          "--filter", f"label={LABEL_OWNER}={os.getuid()}",
                          "--filter", f"label={LABEL_HOME}={home_label(home)}"],
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


def test_private_etc_entry_hidden_after_cached_walk(engine: str, tmp_path: Path) -> None:
    """One process starting sandboxes on the host's userland one after another (as a
    daemon's pool does) keeps the walk for /etc's private entries (rootfs_watch); a file
    made private after that, and readable by the sandbox's root otherwise (it is theirs on
    the host), is hidden in the next sandbox all the same."""
    from agentkernel import rootfs_watch

    rootfs_watch.forget()
    secret = Path("/etc") / f"ak-cache-test-{os.urandom(4).hex()}"
    plan, run = host_runner(engine, tmp_path, f"cat {secret} 2>/dev/null; echo; echo done")

    try:
        run()
        run()  # (the second start keeps its walk)
        assert rootfs_watch._cache, "the walk was not kept"
        secret.write_text("SECRET-OF-THE-SANDBOX-ROOT\n")
        secret.chmod(0o644)
        assert "SECRET-OF-THE-SANDBOX-ROOT" in run()  # world-readable: shown
        owner = _sandbox_root_uid(engine, plan)
        os.chown(secret, owner, owner)
        secret.chmod(0o600)
        out = run()
        assert "SECRET-OF-THE-SANDBOX-ROOT" not in out and "done" in out, out
    finally:
        secret.unlink(missing_ok=True)
        rootfs_watch.forget()


def _sandbox_root_uid(engine: str, plan: Any) -> int:
    """The host uid a new sandbox's root gets: docker's remapped range; for podman each
    sandbox has a range of its own, so the file is left to host root (0600: hidden from
    the sandbox by the mask, as by its mode)."""
    if engine == "docker":
        uid = plan.backend.root_uid()
        assert uid is not None
        return int(uid)
    return 0


# Lazily unmounts the first container layer the engine mounts after it starts (argv[1]:
# "init", the layer Docker mounts while it creates a container; "layer", the container's
# own), as soon as it appears: what Docker 20.10 here sometimes does by itself under load.
_UNMOUNTER = """
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
init = sys.argv[1] == "init"
def layers():
    with open("/proc/self/mountinfo") as f:
        return {l.split()[4] for l in f if l.split()[4].endswith("/merged")
                and ("/overlay2/" in l or "/overlay/" in l)
                and l.split()[4].endswith("-init/merged") == init}
before = layers()
print("ready", flush=True)
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    for path in layers() - before:
        if libc.umount2(path.encode(), 2) == 0:
            print(path, flush=True)
            sys.exit(0)
        before.add(path)
    time.sleep(0.0005)
"""


@pytest.mark.parametrize("target", ["layer", "init"])
def test_container_without_its_image_is_replaced(engine: str, tmp_path: Path,
                                                 target: str) -> None:
    """The engine's fault, made on purpose: a layer is unmounted right after the engine
    mounts it, so that runc sets the container up on the bare mount point (no file of
    the image), or the engine's create fails on it. The sandbox that starts anyway has its
    image: the backend saw its root was not its layer (or the create failed so) and made
    it again; nothing is left behind."""
    if engine == "podman" and target == "init":
        pytest.skip("podman mounts no init layer")
    before = set(ours(engine))
    induced = 0
    for _ in range(6):
        racer = subprocess.Popen([sys.executable, "-c", _UNMOUNTER, target],
                                 stdout=subprocess.PIPE, text=True)
        assert racer.stdout is not None and racer.stdout.readline() == "ready\n"
        try:
            r = ak("run", "-q", "-B", engine, "-i", IMAGE, "-p", "restrictive", "-w", "/tmp",
                   "--", "sh", "-c", "ls /bin/busybox", cwd=tmp_path)
        finally:
            racer.kill()
            out, _ = racer.communicate()
        assert (r.returncode, r.stdout) == (0, "/bin/busybox\n"), r.stderr
        induced += bool(out.strip())
        if induced >= 2:
            break
    assert induced, "the layer was never unmounted before the engine started the container"
    no_leftovers(engine, before)


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


_MOUNT_UPPER = """
import os, signal, sys
from agentkernel.backends.base import make_scratch
from agentkernel.backends.container_upper import mount_upper, release_upper
base = make_scratch(sys.argv[1]) / "ws"
mount_upper(base, 16, None)
if sys.argv[2] == "die":
    os.kill(os.getpid(), signal.SIGKILL)  # (a CLI killed before it detached the upper)
print("mounted", flush=True)
sys.stdin.read()  # (a run still starting its container)
release_upper(base)
"""


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def test_an_upper_a_killed_run_left_mounted_is_swept(engine: str, project: Path) -> None:
    """A CLI killed between mounting a one-shot's copy-on-write upper (a tmpfs in its
    scratch dir) and detaching it: the next one-shot run of that runtime dir detaches it
    (the dead run's lock is free), and leaves a live run's alone."""
    if os.geteuid() != 0:
        pytest.skip("root mounts the upper on the host (rootless: in the engine's namespace)")
    sandboxes = Path(os.environ["AGENTKERNEL_RUNTIME_DIR"]).resolve() / "sandboxes"
    dead, live = (sandboxes / f"{kind}-{os.urandom(3).hex()}" for kind in ("dead", "live"))
    died = subprocess.run([sys.executable, "-c", _MOUNT_UPPER, dead.name, "die"],
                          capture_output=True, text=True, timeout=60, check=False)
    holder = subprocess.Popen([sys.executable, "-c", _MOUNT_UPPER, live.name, "hold"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert died.returncode == -signal.SIGKILL, died.stderr
        assert holder.stdout is not None and holder.stdout.readline() == "mounted\n"
        assert _mounted(dead / "ws") and _mounted(live / "ws")
        r = ak("run", "-q", "-B", engine, "-i", IMAGE, "-p", "moderate", "--", "true",
               cwd=project)  # (a copy-on-write project: an upper of its own)
        assert r.returncode == 0, r.stderr
        assert not _mounted(dead / "ws") and not (dead / "ws.lock").exists()
        assert _mounted(live / "ws")  # (its run holds the lock)
        holder.communicate(input="", timeout=60)
        assert holder.returncode == 0 and not _mounted(live / "ws")
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        for scratch in (dead, live):
            subprocess.run(["umount", "-l", str(scratch / "ws")], capture_output=True,
                           check=False, timeout=30)
            shutil.rmtree(scratch, ignore_errors=True)


def test_lifecycle(engine: str, tmp_path: Path) -> None:
    """create / exec / stop / start (the container layer is kept) / rm (nothing left)."""
    before = set(ours(engine))
    name = f"ct-{engine}"
    r = ak("create", name, "-B", engine, "-i", IMAGE, "-p", "moderate", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    try:
        # (`ours` sees the suite's containers: `no_leftovers` below is no empty check)
        assert f"agentkernel-{os.getuid()}-{name}" in ours(engine), ours(engine)
        cmd = ("exec", "-w", "/tmp", name, "--", "sh", "-c", "echo kept > /root/f; exit 3")
        r = ak(*cmd, cwd=tmp_path)
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

    probe = get_backend(engine).probe(deep=True)
    assert probe.ok, probe.detail
    if engine == "docker":
        assert "userns-remap: the sandbox's root is host uid" in probe.detail
        assert "every container of this engine shares" in probe.detail
    else:
        assert "never host root, no two sandboxes share one" in probe.detail


# --- never host root ------------------------------------------------------------------------
def _pid_of(marker: str) -> int:
    """The host pid of the sandboxed process whose command line contains `marker` (in
    another pid namespace: not the CLI that was given it)."""
    own = os.readlink("/proc/self/ns/pid")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            with contextlib.suppress(OSError):
                if (entry.isdigit() and os.readlink(f"/proc/{entry}/ns/pid") != own
                        and marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes()):
                    return int(entry)
        time.sleep(0.1)
    raise AssertionError(f"no process with {marker} on the host")


def _container_procs(pid: int) -> list[int]:
    """Every host process in the pid namespace of `pid` (the container's processes)."""
    ns = os.readlink(f"/proc/{pid}/ns/pid")
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/ns/pid") == ns:
                    out.append(int(entry))
    return out


def _host_ids(pid: int) -> set[int]:
    """Every uid and gid (real, effective, saved, fs; supplementary groups) of `pid`."""
    ids: set[int] = set()
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            ids.update(int(v) for v in value.split())
    return ids


def _uid_base(pid: int) -> int:
    first = Path(f"/proc/{pid}/uid_map").read_text().split()
    assert first[0] == "0", first
    return int(first[1])


@contextlib.contextmanager
def _running(engine: str, cwd: Path, marker: str) -> Iterator[int]:
    """A one-off sandbox running `sleep` (with a few more processes); the host pid of its
    shell."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentkernel", "run", "-q", "-B", engine, "-i", IMAGE, "-w",
         "/tmp", "--", "sh", "-c", f"sleep 60 & sleep 60 & echo up; wait; : {marker}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == b"up\n", (proc.stderr.read() if proc.stderr else b"")[-500:]
        yield _pid_of(marker)
    finally:
        proc.kill()
        proc.wait()


def test_container_processes_never_host_root(engine: str, tmp_path: Path) -> None:
    """Read from the host: no process of a container sandbox has host id 0; on podman every
    id lies in the sandbox's own range of our block, locked while it runs, and two
    sandboxes at once share no host id; on docker they are the remapped range."""
    import fcntl

    from agentkernel.idmap import SLOTS_DIR, host_range

    tag = os.urandom(4).hex()
    with _running(engine, tmp_path, f"ak-ids-a-{tag}") as a, \
            _running(engine, tmp_path, f"ak-ids-b-{tag}") as b:
        ranges = []
        for shell in (a, b):
            procs = _container_procs(shell)
            assert len(procs) >= 4, procs  # the agent, the shell, two sleeps
            ids = set().union(*(_host_ids(p) for p in procs))
            assert 0 not in ids, ids
            base = _uid_base(shell)
            assert all(base <= i < base + RANGE for i in ids), (base, ids)
            ranges.append((base, ids))
        if engine == "podman":
            block = host_range()
            for base, _ in ranges:
                slot, rest = divmod(base - block.uid, RANGE)
                assert rest == 0 and 0 <= slot < block.size // RANGE
                fd = os.open(f"{SLOTS_DIR}/{slot}", os.O_RDONLY)
                try:  # the range is locked for as long as the container lives
                    with pytest.raises(BlockingIOError):
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                finally:
                    os.close(fd)
            (base_a, ids_a), (base_b, ids_b) = ranges
            assert abs(base_a - base_b) >= RANGE and not ids_a & ids_b
        else:  # one remapped range for every container of the engine: said by doctor
            assert ranges[0][0] == ranges[1][0]


@pytest.mark.parametrize("profile", ["permissive", "moderate"])
def test_private_root_project(engine: str, tmp_path: Path, profile: str) -> None:
    """A 0700 project owned by host root (the caller) with a 0600 file: the sandbox's root,
    an unprivileged host uid, reads it (id-mapped mount); what it writes (permissive: the
    project itself) lands on the host as the caller's uid."""
    proj = tmp_path / "proj"
    proj.mkdir(mode=0o700)
    (proj / "secret.txt").write_text("only root\n")
    (proj / "secret.txt").chmod(0o600)
    cmd = ("run", "-B", engine, "-i", IMAGE, "-p", profile, "--",
           "sh", "-c", "cat /workspace/secret.txt; echo made > /workspace/new.txt; "
           "cat /workspace/new.txt")
    r = ak(*cmd, cwd=proj)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "only root\nmade\n"
    if profile == "permissive":
        st = (proj / "new.txt").stat()
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    else:  # copy-on-write or read-only: the project is untouched
        assert not (proj / "new.txt").exists()


def test_podman_range_kept_while_persistent(engine: str, tmp_path: Path) -> None:
    """A persistent podman sandbox keeps its range locked across a daemon restart, frees it
    when stopped and takes the same one again when started (its map is fixed)."""
    import fcntl

    from agentkernel.idmap import SLOTS_DIR, host_range

    if engine != "podman":
        pytest.skip("docker's range is the engine's own")
    name = f"ids-{os.urandom(3).hex()}"

    def base() -> int:
        out = subprocess.run([CLI["podman"], "inspect", "-f", "{{.State.Pid}}",
                              f"agentkernel-{os.getuid()}-{name}"], capture_output=True,
                             text=True, check=True, timeout=60).stdout
        return _uid_base(int(out))

    def locked(slot: int) -> bool:
        fd = os.open(f"{SLOTS_DIR}/{slot}", os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    assert ak("create", name, "-B", engine, "-i", IMAGE, cwd=tmp_path).returncode == 0
    try:
        first = base()
        slot = (first - host_range().uid) // RANGE
        assert locked(slot)
        assert ak("daemon", "stop", cwd=tmp_path).returncode == 0
        assert locked(slot)
        r = ak("exec", "-w", "/tmp", name, "--", "id", "-u", cwd=tmp_path)  # a new daemon
        assert (r.returncode, r.stdout) == (0, "0\n"), r.stderr
        assert locked(slot) and base() == first
        assert ak("stop", name, cwd=tmp_path).returncode == 0
        deadline = time.monotonic() + 5
        while locked(slot) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not locked(slot)
        assert ak("start", name, cwd=tmp_path).returncode == 0
        assert base() == first and locked(slot)
    finally:
        ak("rm", name, cwd=tmp_path)


def test_docker_refused_without_userns(plain_dockerd: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A Docker engine whose containers' root is host root is refused, said how to fix;
    nothing is created in it; doctor says so."""
    from agentkernel.backends import get_backend

    # Dirs of its own: a daemon the other tests started would answer with its engine.
    env = {"DOCKER_HOST": f"unix://{plain_dockerd}", "AGENTKERNEL_HOME": str(tmp_path / "h"),
           "AGENTKERNEL_RUNTIME_DIR": str(tmp_path / "r")}
    r = ak("run", "-q", "-B", "docker", "-i", "host", "-w", "/tmp", "--", "true",
           cwd=tmp_path, env=env)
    assert r.returncode == 125, r.stderr
    assert "runs containers as host root" in r.stderr and "userns-remap" in r.stderr
    ps = subprocess.run([CLI["docker"], "-H", f"unix://{plain_dockerd}", "ps", "-aq"],
                        capture_output=True, text=True, check=True, timeout=60)
    assert ps.stdout.strip() == ""
    monkeypatch.setenv("DOCKER_HOST", f"unix://{plain_dockerd}")
    probe = get_backend("docker").probe(deep=True)
    assert not probe.ok and "would be host root" in probe.detail
    assert "userns-remap" in probe.detail


def test_docker_stale_mode_never_host_root(plain_dockerd: str, tmp_path: Path) -> None:
    """What a CLI remembers of the engine's mode (runtime dir, keyed by its socket file) is
    planted to say "userns-remap" for an engine that runs containers as host root: no
    command runs, no container stays, and the lie is forgotten (the next run asks the
    engine and is refused as it should be)."""
    from agentkernel.backends.docker import MODE_FILE, _mode_key

    run_dir = tmp_path / "r"
    run_dir.mkdir(mode=0o700)
    env = {"DOCKER_HOST": f"unix://{plain_dockerd}", "AGENTKERNEL_HOME": str(tmp_path / "h"),
           "AGENTKERNEL_RUNTIME_DIR": str(run_dir)}
    (run_dir / MODE_FILE).write_text(json.dumps(
        {"key": list(_mode_key(plain_dockerd)), "mode": ["remap", 100000, 100000, 65536]}))
    r = ak("run", "-q", "-B", "docker", "-i", "host", "-p", "restrictive", "-w", "/tmp", "--",
           "sh", "-c", "echo RAN-AS-$(id -u)", cwd=tmp_path, env=env)
    assert r.returncode != 0 and "RAN-AS" not in r.stdout, (r.stdout, r.stderr)
    assert not (run_dir / MODE_FILE).exists()
    r = ak("run", "-q", "-B", "docker", "-i", "host", "-w", "/tmp", "--", "true",
           cwd=tmp_path, env=env)
    assert r.returncode == 125 and "runs containers as host root" in r.stderr, r.stderr
    deadline = time.monotonic() + 20  # (the engine removes an ended one-off container)
    while time.monotonic() < deadline:
        ps = subprocess.run([CLI["docker"], "-H", f"unix://{plain_dockerd}", "ps", "-aq"],
                            capture_output=True, text=True, check=True, timeout=60)
        if not ps.stdout.strip():
            break
        time.sleep(0.2)
    assert ps.stdout.strip() == ""


# --- rootless podman, as an ordinary user -------------------------------------------------------
PODMAN_USER = "akpodman"


def _free_subid_start(path: str) -> int:
    """A start for 65536 subordinate ids above every entry already in `path`."""
    top = 100000
    for line in Path(path).read_text().splitlines() if os.path.exists(path) else []:
        parts = line.split(":")
        # (entries above our own block for root's sandboxes are not in the way)
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit() \
                and int(parts[1]) < 0x6F000000:
            top = max(top, int(parts[1]) + int(parts[2]))
    return top


@pytest.fixture(scope="session")
def podman_user(tmp_path_factory: pytest.TempPathFactory,
                busybox_tar: tuple[Path, str]) -> Iterator[tuple[int, dict[str, str], Path]]:
    """A real unprivileged user with a home and /etc/subuid and /etc/subgid entries
    (created once, idempotently), the environment the CLI runs with as that user, and a
    dir of theirs; the test image imported into their own (rootless) store."""
    import pwd

    from sandbox_helpers import public_pythonpath

    if os.geteuid() != 0 or shutil.which("podman") is None or shutil.which("useradd") is None:
        pytest.skip("needs root, podman and useradd")
    try:
        pw = pwd.getpwnam(PODMAN_USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", PODMAN_USER],
                       check=True, capture_output=True, timeout=60)
        pw = pwd.getpwnam(PODMAN_USER)
    for f in ("/etc/subuid", "/etc/subgid"):
        text = Path(f).read_text() if os.path.exists(f) else ""
        if not any(line.startswith(f"{PODMAN_USER}:") for line in text.splitlines()):
            with open(f, "a") as out:
                out.write(f"{PODMAN_USER}:{_free_subid_start(f)}:65536\n")
    base = Path(tempfile.mkdtemp(prefix="ak-rootless-podman-", dir="/tmp"))
    base.chmod(0o755)
    for d in ("xdg", "data", "run", "proj", "share", "config"):
        (base / d).mkdir(mode=0o700)
        os.chown(base / d, pw.pw_uid, pw.pw_gid)
    tar, ref = busybox_tar
    shutil.copy(tar, base / "image.tar")
    (base / "image.tar").chmod(0o644)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": pw.pw_dir,
           "XDG_RUNTIME_DIR": str(base / "xdg"), "PYTHONPATH": public_pythonpath(),
           # Podman's storage and config of this session only: a store left by an earlier
           # run remembers that run's runtime dir and refuses another ("configuration
           # mismatch").
           "XDG_DATA_HOME": str(base / "share"), "XDG_CONFIG_HOME": str(base / "config"),
           "AGENTKERNEL_HOME": str(base / "data"), "AGENTKERNEL_RUNTIME_DIR": str(base / "run"),
           "AGENTKERNEL_DAEMON_AUTOSTART": "0", "IMAGE": ref}
    as_user = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups",
               "env", "-i", *[f"{k}={v}" for k, v in env.items()]]
    ensure_image([*as_user, CLI["podman"]], base / "image.tar", ref)
    try:
        yield pw.pw_uid, env, base
    finally:
        for pidfile in (base / "run" / "podman.pid",):
            if pidfile.exists():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pidfile.read_text()), signal.SIGTERM)
        subprocess.run([*as_user, CLI["podman"], "rm", "-af"], capture_output=True,
                       timeout=120, check=False, cwd="/")
        shutil.rmtree(base, ignore_errors=True)


def ak_user(user: tuple[int, dict[str, str], Path], *args: str,
            background: bool = False) -> Any:
    """The real CLI (the system's python3, this checkout's sources) as the podman user."""
    from sandbox_helpers import SYSTEM_PYTHON

    uid, env, base = user
    argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--init-groups", "--",
            SYSTEM_PYTHON, "-m", "agentkernel", *args]
    if background:
        return subprocess.Popen(argv, env=env, cwd=base / "proj", stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(argv, env=env, cwd=base / "proj", capture_output=True, text=True,
                          timeout=120, check=False, stdin=subprocess.DEVNULL)


def rootless_run(user: tuple[int, dict[str, str], Path], profile: str,
                 argv: list[str]) -> Any:
    """`agentkernel run` of `argv` as the podman user (ak_user) in a rootless Podman
    container of the test image with `profile`, no network."""
    return ak_user(user, "run", "-q", "-B", "podman", "-i", user[1]["IMAGE"], "-p", profile,
                   "--no-network", "--", *argv)


def test_rootless_podman_run(podman_user: tuple[int, dict[str, str], Path]) -> None:
    """As an ordinary user: exit codes, output, stdin-less runs, the project theirs; every
    process of the sandbox is that user (or their subordinate ids) on the host."""
    uid, env, base = podman_user
    image = env["IMAGE"]
    (base / "proj" / "f.txt").write_text("mine\n")
    os.chown(base / "proj" / "f.txt", uid, uid)
    r = ak_user(podman_user, "run", "-B", "podman", "-i", image, "-p", "permissive",
                "--no-network", "--",  # (slirp4netns needs /dev/net/tun: 0600 here)
                "sh", "-c", "cat /workspace/f.txt; echo w > /workspace/w.txt; id -u; exit 7")
    assert r.returncode == 7, r.stderr
    assert r.stdout == "mine\n0\n"
    assert "rootless" not in r.stderr or "error" not in r.stderr.lower()
    assert (base / "proj" / "w.txt").stat().st_uid == uid  # the user's, on the host
    marker = f"ak-rootless-{os.urandom(3).hex()}"
    proc = ak_user(podman_user, "run", "-q", "-B", "podman", "-i", image, "-w", "/tmp", "--",
                   "sh", "-c", f"sleep 60 & echo up; wait; : {marker}", background=True)
    try:
        assert proc.stdout.readline() == b"up\n", proc.stderr.read()[-500:]
        procs = _container_procs(_pid_of(marker))
        ids = set().union(*(_host_ids(p) for p in procs))
        assert 0 not in ids and uid in ids, ids
    finally:
        proc.kill()
        proc.wait()


def test_rootless_podman_lifecycle(podman_user: tuple[int, dict[str, str], Path]) -> None:
    """As an ordinary user: create / exec (exit code, output) / rm, nothing left."""
    image = podman_user[1]["IMAGE"]
    name = f"rl-{os.urandom(3).hex()}"
    r = ak_user(podman_user, "create", name, "-B", "podman", "-i", image)
    assert r.returncode == 0, r.stderr
    try:
        r = ak_user(podman_user, "exec", "-w", "/tmp", name, "--", "sh", "-c",
                    "echo hi > /root/f; cat /root/f; exit 4")
        assert (r.returncode, r.stdout) == (4, "hi\n"), r.stderr
    finally:
        r = ak_user(podman_user, "rm", name)
        ak_user(podman_user, "daemon", "stop")
    assert r.returncode == 0, r.stderr


def test_snapshot_commit_restore(engine: str, tmp_path: Path) -> None:
    """A snapshot is the engine's `commit`: a file written in the sandbox is there in the
    sandbox restored from it (on the host's userland, bound on the committed image again;
    on an image, the committed image alone); deleting the snapshot removes its image."""
    from agentkernel.ipc import client

    image = "host" if engine == "docker" else IMAGE  # one engine each way
    name = f"snap-{os.urandom(3).hex()}"
    assert ak("daemon", "start", cwd=tmp_path).returncode == 0
    client.call("create", {"name": name, "image": image, "backend": engine,
                           "profile": "moderate"})
    try:
        client.call("write_file", {"name": name, "path": "/root/w.txt", "data": "written"})
        snap = client.call("snapshot", {"name": name, "snapshot_name": f"{name}-s"})
        assert snap["backend"] == engine
        client.call("remove", {"name": name})
        restored = client.call("restore_snapshot", {"snapshot_name": f"{name}-s"})
        assert restored["name"] == name
        assert client.call("read_file", {"name": name, "path": "/root/w.txt"}) == "written"
        r = ak("exec", "-w", "/tmp", name, "--", "sh", "-c", "cat /root/w.txt; id -u",
               cwd=tmp_path)
        assert (r.returncode, r.stdout) == (0, "written0\n"), r.stderr
        backends = {b["backend"]: b for b in client.call("backends")}
        assert backends[engine]["capabilities"]["snapshots"]
    finally:
        with contextlib.suppress(Exception):
            client.call("remove", {"name": name})
    ref = f"localhost/agentkernel-snapshot:{os.getuid()}-{name}-s"

    def images() -> str:
        return subprocess.run([CLI[engine], "images", "-q", "--filter", f"reference={ref}"],
                              capture_output=True, text=True, check=True, timeout=60).stdout

    assert images().strip()
    client.call("delete_snapshot", {"snapshot_name": f"{name}-s"})
    assert f"{name}-s" not in [s["name"] for s in client.call("snapshots")]
    assert images().strip() == ""


# The escape battery's probes that matter for a container, in one run per profile (each a
# line the test reads): who and what the sandbox's root may be and do, seen from inside.
ROOTLESS_PROBES = r"""
import ctypes, os, glob, socket
libc = ctypes.CDLL(None, use_errno=True)
st = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
print("caps", *(st[k].strip() for k in ("CapEff", "CapPrm", "CapBnd")))
print("nnp", st["NoNewPrivs"].strip(), "seccomp", st["Seccomp"].strip())
def writable(p):
    try:
        os.close(os.open(p, os.O_WRONLY)); return True
    except OSError:
        return False
for p in ("/proc/sys/kernel/core_pattern", "/proc/sys/vm/drop_caches", "/proc/sysrq-trigger",
          "/proc/pressure/cpu", "/sys/kernel/uevent_helper"):
    if writable(p): print("WRITABLE", p)
for p in ["/dev/kvm", "/dev/mem", "/dev/kmsg", "/dev/net/tun", "/dev/fuse",
          *glob.glob("/dev/[sv]d*")]:
    try:
        os.close(os.open(p, os.O_RDONLY)); print("OPENED", p)
    except OSError: pass
for p in ("/proc/kallsyms", "/proc/kcore", "/proc/keys"):
    try:
        if open(p, "rb").read(64): print("READ", p)
    except OSError: pass
for root, dirs, files in os.walk("/"):
    if root.startswith(("/proc", "/sys", "/.ak/ctl")): dirs[:] = []; continue  # (ctl: ours)
    for f in files:
        try:
            import stat
            if stat.S_ISSOCK(os.lstat(os.path.join(root, f)).st_mode): print("SOCKET", root, f)
        except OSError: pass
print("unshare", libc.unshare(0x10000000), "mount", libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))
try:
    if os.listdir("/root"): print("ROOT-LISTED", os.listdir("/root"))
except OSError: pass
print("done")
"""


@pytest.mark.parametrize("profile", ["permissive", "moderate", "restrictive"])
def test_rootless_podman_escape_probes(podman_user: tuple[int, dict[str, str], Path],
                                       profile: str) -> None:
    """As an ordinary user, every profile on the host's userland: no capabilities,
    no_new_privs and seccomp, no global sysctl or PSI knob writable, no device but the
    harmless, no kernel secrets, no socket (the user's podman service's included), no new
    user namespace or mount, not root's home."""
    r = ak_user(podman_user, "run", "-q", "-B", "podman", "-i", "host", "-p", profile,
                "--no-network", "--", "python3", "-c", ROOTLESS_PROBES)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "caps 0000000000000000 0000000000000000 0000000000000000" in out, out
    assert "nnp 1 seccomp 2" in out and "unshare -1 mount -1" in out, out
    for bad in ("WRITABLE", "OPENED", "READ ", "SOCKET", "ROOT-LISTED"):
        assert bad not in out, out
    assert out.endswith("done\n"), out


def test_rootless_podman_copy_on_write_project(
        podman_user: tuple[int, dict[str, str], Path]) -> None:
    """moderate, as an ordinary user: the sandbox writes its project (Podman's overlay
    volume, the upper dir ours) and the user's files stay as they were."""
    uid, _env, base = podman_user
    proj = base / "proj"
    (proj / "cow.txt").write_text("original\n")
    os.chown(proj / "cow.txt", uid, uid)
    r = ak_user(podman_user, "run", "-q", "-B", "podman", "-i", podman_user[1]["IMAGE"],
                "-p", "moderate", "--", "sh", "-c",
                "echo changed > /workspace/cow.txt; echo new > /workspace/made.txt; "
                "cat /workspace/cow.txt /workspace/made.txt")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "changed\nnew\n"
    assert (proj / "cow.txt").read_text() == "original\n"
    assert not (proj / "made.txt").exists()


_NOT_THE_ENGINE = """
import sys
from pathlib import Path
from agentkernel.backends.container_upper import _in_ns, engine_ns_pid, mount_upper
from agentkernel.errors import SandboxError
pid = int(sys.argv[1])
assert engine_ns_pid([pid]) is None, "a sandbox's process taken for the engine"
for attempt in (lambda: mount_upper(Path(sys.argv[2]), 1, pid),
                lambda: _in_ns(pid, ["true"], "probe")):
    try:
        attempt()
    except SandboxError as exc:
        assert "not the container engine" in str(exc), exc
    else:
        raise AssertionError("ran in a sandbox's namespaces")
print("refused")
"""


def test_rootless_engine_namespace_is_never_a_sandboxs(
        podman_user: tuple[int, dict[str, str], Path]) -> None:
    """Review, round 6: the engine's pid comes from pid files and the API socket's peer; a
    stale one, its pid reused, may name a namespaces sandbox's process of the same user.
    nsenter --target into it ran `mount` resolved in the sandbox's mount namespace (its
    own binary) as the user, outside its confinement. Such a process is refused: not the
    host's root, not an engine binary; nothing is run or mounted there."""
    from sandbox_helpers import SYSTEM_PYTHON

    uid, env, base = podman_user
    tag = str(60000 + int.from_bytes(os.urandom(2), "big") % 5000)
    box = ak_user(podman_user, "run", "-q", "-B", "namespaces", "-p", "moderate", "--",
                  "sleep", tag, background=True)
    try:
        pid = 0
        deadline = time.monotonic() + 60
        while not pid:
            assert box.poll() is None, box.communicate(timeout=10)
            assert time.monotonic() < deadline, "the sandbox's sleep never showed"
            for d in os.listdir("/proc"):
                with contextlib.suppress(OSError):
                    if d.isdigit() and os.stat(f"/proc/{d}").st_uid == uid and \
                            Path(f"/proc/{d}/cmdline").read_bytes() == f"sleep\0{tag}\0".encode():
                        pid = int(d)
            time.sleep(0.1)
        assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        target = base / "xdg" / f"upper-{tag}"
        r = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--init-groups",
                            "--", SYSTEM_PYTHON, "-c", _NOT_THE_ENGINE, str(pid), str(target)],
                           env=env, capture_output=True, text=True, timeout=60, check=False)
        assert (r.returncode, r.stdout) == (0, "refused\n"), r.stderr
        assert str(target) not in Path(f"/proc/{pid}/mountinfo").read_text()
    finally:
        if pid:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        box.kill()
        box.communicate(timeout=30)


def test_rootless_podman_workspace_writes_stop_at_the_cap(
        podman_user: tuple[int, dict[str, str], Path]) -> None:
    """moderate, as an ordinary user: the copy-on-write project's upper is a tmpfs of the
    cap in Podman's own namespace (container_upper), not a host dir of unbounded size;
    writes past it fail, and nothing of ours stays mounted there afterwards."""
    _uid, env, base = podman_user
    r = ak_user(podman_user, "run", "-B", "podman", "-i", env["IMAGE"], "-p", "moderate",
                "-m", "64m", "--", "sh", "-c",
                "dd if=/dev/zero of=/workspace/fill bs=1048576 count=100 2>&1; echo ws=$?")
    assert "ws=" in r.stdout or "out of memory" in r.stderr, (r.stdout, r.stderr)
    assert "ws=0" not in r.stdout, (r.stdout, r.stderr)
    assert not (base / "proj" / "fill").exists()
    pause = (base / "xdg" / "libpod" / "tmp" / "pause.pid").read_text().strip()
    mounts = Path(f"/proc/{pause}/mountinfo").read_text()
    assert f"{base}/run/sandboxes/" not in mounts, mounts


_MASKS_AS_USER = """
import io, sys
from pathlib import Path
from agentkernel import planner
from agentkernel.backends import container_engine
from agentkernel.engine import execute
from agentkernel.errors import SandboxError
from agentkernel.rootfs import Mask
walk = container_engine._host_masks
extra = [Mask(p, False) for p in sys.argv[1:]]
container_engine._host_masks = lambda rootfs: (*walk(rootfs), *extra)
plan = planner.plan(planner.RunRequest(argv=["cat", "/etc/hostname"], cwd=Path.cwd(),
    image="host", backend="podman", profile="restrictive", workdir="/tmp"),
    planner.CallerContext.here(), quiet=True)
try:
    out = io.BytesIO()
    sandbox, result = execute(plan, timeout=60, stdout=out, stderr=io.BytesIO())
    sandbox.destroy()
    print("ran", result.exit_code, out.getvalue().decode().strip() == "")
except SandboxError as exc:
    print("refused:", exc)
"""


def test_rootless_podman_vanished_masks(
        podman_user: tuple[int, dict[str, str], Path]) -> None:
    """As an ordinary user: a mask whose host entry is gone is left out (the start does not
    fail), and the started container is looked at through its init's root for it (here a
    path the host lacks but the container's /etc shows cannot be made; an entry the host
    has is masked: tests/test_container_masks_race.py does the races as root)."""
    from sandbox_helpers import SYSTEM_PYTHON

    uid, env, base = podman_user
    argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--init-groups", "--",
            SYSTEM_PYTHON, "-c", _MASKS_AS_USER]
    gone = f"/etc/ak-gone-{os.urandom(3).hex()}"
    r = subprocess.run([*argv, gone, "/etc/hostname"], env=env, cwd=base / "proj",
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.stdout.strip() == "ran 0 True", (r.stdout, r.stderr)  # /etc/hostname masked
    # /.ak/agent: not on the host, there in every container: found by the look (the user
    # can see into the container), so each container made is refused.
    r = subprocess.run([*argv, "/.ak/agent"], env=env, cwd=base / "proj",
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.stdout.startswith("refused:") and "came back" in r.stdout, (r.stdout, r.stderr)


def test_rootless_podman_limits_hold(podman_user: tuple[int, dict[str, str], Path]) -> None:
    """As an ordinary user (where Podman may not set cgroup limits: cgroup v1): the pids
    cap and the memory limit still hold (the rlimit floor)."""
    fork = ("import os,time\nn=0\nfor i in range(200):\n try:\n  pid=os.fork()\n"
            " except OSError: break\n if pid==0: time.sleep(3); os._exit(0)\n n+=1\n"
            "print('forked', n)\n")
    r = ak_user(podman_user, "run", "-q", "-B", "podman", "-i", "host", "-p", "restrictive",
                "--pids", "16", "--", "python3", "-c", fork)
    assert r.stdout.startswith("forked"), r.stderr
    assert int(r.stdout.split()[1]) < 16, r.stdout
    r = ak_user(podman_user, "run", "-q", "-B", "podman", "-i", "host", "-p", "restrictive",
                "--memory", "64m", "--", "python3", "-c",
                "b=bytearray(512*1024*1024); print('allocated', len(b))")
    assert "allocated" not in r.stdout and r.returncode != 0, (r.stdout, r.stderr)


def test_sweep_spares_another_data_dirs_containers(engine: str, tmp_path: Path) -> None:
    """One user, two data dirs (two daemons: CI jobs, a bench, tests side by side): a
    daemon starting up removes what a dead daemon of its own data dir left, never the
    other's sandboxes."""
    if engine == "podman":
        pytest.skip("a daemon sweeps podman only where its own API service runs already")
    other = {"AGENTKERNEL_HOME": str(tmp_path / "b-home"),
             "AGENTKERNEL_RUNTIME_DIR": str(tmp_path / "b-run")}
    mine = {"AGENTKERNEL_HOME": str(tmp_path / "a-home"),
            "AGENTKERNEL_RUNTIME_DIR": str(tmp_path / "a-run")}
    name = f"sw-{os.urandom(3).hex()}"
    r = ak("create", name, "-B", engine, "-i", IMAGE, cwd=tmp_path, env=other)
    assert r.returncode == 0, r.stderr
    try:
        assert ak("daemon", "start", cwd=tmp_path, env=mine).returncode == 0  # sweeps
        # (Another session's daemon on this machine, of a version without the data-dir
        # label, would sweep it too: that is the bug this checks.)
        kept = ours(engine, other["AGENTKERNEL_HOME"])
        assert f"agentkernel-{os.getuid()}-{name}" in kept, kept
        r = ak("exec", "-w", "/tmp", name, "--", "echo", "alive", cwd=tmp_path, env=other)
        assert (r.returncode, r.stdout) == (0, "alive\n"), r.stderr
    finally:
        ak("daemon", "stop", cwd=tmp_path, env=mine)
        ak("rm", name, cwd=tmp_path, env=other)
        ak("daemon", "stop", cwd=tmp_path, env=other)


def test_a_planted_agent_socket_link_is_not_followed(engine: str, tmp_path: Path) -> None:
    """A persistent container's control dir is bound into it writable (its agent binds its
    socket there); once it listens, the dir is no longer the container's: its root tries
    to swap agent.sock for a symlink to a host socket, the lure, and to fill the dir (on
    the host's runtime dir, a tmpfs), and cannot. A restarted daemon adopting the
    sandbox, and later commands, never connect to the lure (the daemon would, as root,
    wherever the link points: `paths.connect_socket_file` refuses it too)."""
    lure_path = tmp_path / "lure.sock"
    lure = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lure.bind(str(lure_path))
    lure.listen(8)
    lure.setblocking(False)
    name = f"lure-{engine}"
    r = ak("create", name, "-B", engine, "-i", IMAGE, "-p", "moderate", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    try:
        plant = (f"rm -f /.ak/ctl/agent.sock; ln -sf {lure_path} /.ak/ctl/agent.sock; "
                 "head -c 1048576 /dev/zero > /.ak/ctl/fill; mkdir /.ak/ctl/d; "
                 "chmod 777 /.ak/ctl; ls -la /.ak/ctl")
        ak("exec", name, "--", "sh", "-c", plant, cwd=tmp_path)
        ctl = Path(os.environ["AGENTKERNEL_RUNTIME_DIR"]) / "sandboxes" / name / "ctl"
        assert sorted(p.name for p in ctl.iterdir()) == ["agent.sock"]
        assert stat.S_ISSOCK(os.lstat(ctl / "agent.sock").st_mode)
        assert ak("daemon", "stop", cwd=tmp_path).returncode == 0
        ak("list", cwd=tmp_path)  # a new daemon adopts the sandbox
        r = ak("exec", name, "--", "echo", "adopted", cwd=tmp_path)
        assert (r.returncode, r.stdout) == (0, "adopted\n"), r.stderr
        assert ak("stop", name, cwd=tmp_path).returncode == 0
        assert ak("start", name, cwd=tmp_path).returncode == 0  # the agent binds again
        r = ak("exec", name, "--", "echo", "again", cwd=tmp_path)
        assert (r.returncode, r.stdout) == (0, "again\n"), r.stderr
        with pytest.raises(BlockingIOError):
            lure.accept()  # nothing ever connected to the lure
    finally:
        ak("rm", name, cwd=tmp_path)
        lure.close()
