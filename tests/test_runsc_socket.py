"""runsc's control socket is reachable by nobody: every runsc sits in a netns of its own.

runsc binds its control socket in the abstract namespace (`@runsc-sandbox.<id>`), which is
scoped by network namespace, and admits uid 0 and the sentry's uid (65534). In the host's
namespace, any local user of that uid could exec as root inside root's sandboxes. Each test
starts real gVisor sandboxes as root (each profile, a persistent one, a daemon's warm pool)
and attacks them as the host user `nobody` and from inside the sandboxes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel.backends.gvisor import GVisorBackend
from agentkernel.profiles import get_profile
from agentkernel.rootfs import host_rootfs
from agentkernel.sandbox import Sandbox, SandboxSpec
from sandbox_helpers import SYSTEM_PYTHON, ak, ak_as_user

NOBODY = 65534
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("runsc") is None or shutil.which("setpriv") is None
    or not os.access(SYSTEM_PYTHON, os.X_OK),
    reason="needs root (to start root's sandboxes and become nobody), runsc, setpriv, python3")

# Run as nobody (or inside a sandbox): connect to each abstract socket named on the command
# line, with and without the trailing NUL runsc binds with, with each socket type runsc's
# urpc could use; print what happened to each.
CONNECT_ABSTRACT = (
    "import socket,sys\n"
    "for name in sys.argv[1:]:\n"
    "    for addr in ('\\0'+name, '\\0'+name+'\\0'):\n"
    "        for kind in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET):\n"
    "            s=socket.socket(socket.AF_UNIX, kind)\n"
    "            try:\n"
    "                s.connect(addr); print('CONNECTED', name)\n"
    "            except OSError as e:\n"
    "                print('refused', name, e.errno)\n"
    "            s.close()\n"
)
# Inside a sandbox: every abstract socket it can see that looks like runsc's.
LIST_RUNSC = (
    "import sys\n"
    "try:\n"
    "    lines=open('/proc/net/unix').read().splitlines()\n"
    "except OSError as e:\n"
    "    lines=[]\n"
    "print('SEEN', [l.split()[-1] for l in lines if 'runsc' in l])\n"
)


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", *argv],
        capture_output=True, text=True, timeout=60, check=False, cwd="/")


def host_abstract_sockets() -> set[str]:
    """Abstract unix socket names bound in the host's (our) network namespace, as
    /proc/net/unix shows them: '@' for each NUL byte (runsc's end with one)."""
    names = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 8 and parts[7].startswith("@"):
            names.add(parts[7][1:])
    return names


def visible(cids: set[str]) -> set[str]:
    return {n for n in host_abstract_sockets() for c in cids if f"runsc-sandbox.{c}" in n}


def _all_runsc() -> dict[int, tuple[int, list[str]]]:
    """Every runsc, runsc-gofer and runsc-sandbox process: pid -> (ppid, argv)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode().split("\0")
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if argv and "runsc" in os.path.basename(argv[0]):
            found[int(entry)] = (int(stat[stat.rfind(")") + 2:].split()[1]), argv)
    return found


def runsc_processes(cids: set[str]) -> dict[int, list[str]]:
    """The runsc processes of these containers: those naming one of them (`runsc run`, the
    sentry's `boot`) and their runsc children (the gofer). Their paths may be the staged
    ones of their own mount namespace, so the container id is what identifies them."""
    every = _all_runsc()
    ours = {pid for pid, (_, argv) in every.items() if cids & set(argv)}
    ours |= {pid for pid, (ppid, _) in every.items() if ppid in ours}
    return {pid: every[pid][1] for pid in ours}


def started_under(root: Path) -> set[str]:
    """Container ids of the gVisor sandboxes whose scratch dirs are under `root`'s
    runtime dir (their names: runtime dir / sandboxes / <name>)."""
    base = root / "run" / "sandboxes"
    return {f"ak-{d.name}" for d in base.iterdir()} if base.is_dir() else set()


def assert_unreachable(ids: set[str], procs: dict[int, list[str]], state: Path) -> None:
    """No runsc of these sandboxes is in the host's network namespace; their control
    sockets are invisible and unreachable from it, for nobody and for root alike."""
    assert ids and procs
    sockets = {f"runsc-sandbox.{cid}" for cid in ids}
    assert not visible(ids)
    out = as_nobody(SYSTEM_PYTHON, "-c", CONNECT_ABSTRACT, *sorted(sockets)).stdout
    assert "CONNECTED" not in out and out.count("refused") == 4 * len(sockets), out
    out = subprocess.run([SYSTEM_PYTHON, "-c", CONNECT_ABSTRACT, *sorted(sockets)],
                         capture_output=True, text=True, timeout=30, check=False).stdout
    assert "CONNECTED" not in out, out
    # What the review ran: runsc's own client, as nobody, against root's sandbox.
    runsc = shutil.which("runsc")
    assert runsc is not None
    for cid in ids:
        r = as_nobody(runsc, f"--root={state}", "exec", cid, "/bin/true")
        assert r.returncode != 0, r
    host_ns = os.readlink("/proc/self/ns/net")
    for pid, argv in procs.items():
        with contextlib.suppress(FileNotFoundError):
            assert os.readlink(f"/proc/{pid}/ns/net") != host_ns, argv[:3]


@contextlib.contextmanager
def gvisor_sandbox(profile: str, tmp_path: Path, persistent: bool = False
                   ) -> Iterator[Sandbox]:
    proj = tmp_path / "project"
    proj.mkdir(exist_ok=True)
    spec = SandboxSpec(name=f"rsock-{profile[:4]}-{os.getpid()}", profile=get_profile(profile),
                       rootfs=host_rootfs(), image="host", workspace=proj,
                       persistent=persistent)
    sandbox = GVisorBackend().start(spec)
    try:
        yield sandbox
    finally:
        sandbox.destroy()


def sh(sandbox: Sandbox, *argv: str) -> str:
    out, err, _ = sandbox.client.exec(list(argv)).wait(60)
    return (out + err).decode(errors="replace")


@pytest.mark.parametrize("persistent", [False, True], ids=["run", "persistent"])
@pytest.mark.parametrize("profile", ["permissive", "moderate", "restrictive"])
def test_runsc_control_socket_is_out_of_reach(profile: str, persistent: bool,
                                              tmp_path: Path) -> None:
    with gvisor_sandbox(profile, tmp_path, persistent) as sandbox:
        state = sandbox.scratch / "state"
        ids = {f"ak-{sandbox.spec.name}"}
        procs = runsc_processes(ids)
        assert len(procs) >= 3, procs  # runsc, its gofer, its sentry
        assert_unreachable(ids, procs, state)
        # From inside: no runsc socket to see, none to connect to.
        seen = sh(sandbox, "python3", "-c", LIST_RUNSC)
        assert "SEEN []" in seen, seen
        out = sh(sandbox, "python3", "-c", CONNECT_ABSTRACT, *(f"runsc-sandbox.{c}" for c in ids))
        assert "CONNECTED" not in out and "refused" in out, out
        assert sh(sandbox, "echo", "alive").strip() == "alive"  # the attacks changed nothing
        if not persistent and shutil.which("bwrap"):
            # A namespaces sandbox of the same profile (permissive shares the host's
            # network namespace, abstract sockets included) cannot reach it either.
            r = ak("run", "-B", "namespaces", "-p", profile, "-i", "host", "--", "python3",
                   "-c", CONNECT_ABSTRACT, *(f"runsc-sandbox.{c}" for c in ids), cwd=tmp_path)
            assert r.returncode == 0 and "refused" in r.stdout, r
            assert "CONNECTED" not in r.stdout, r.stdout


POOL_TOML = """
[daemon]
pool_min = 1
pool_max = 1
adhoc_min = 0
reaper_interval = 0.2
pools = [{image = "host", profile = "permissive", backend = "gvisor"},
         {image = "host", profile = "moderate", backend = "gvisor"},
         {image = "host", profile = "restrictive", backend = "gvisor"}]
"""


def test_warm_pool_runsc_is_out_of_reach(tmp_path: Path) -> None:
    """A private daemon keeps one warm gVisor sandbox per profile: none of them is
    reachable from the host's network namespace either."""
    (tmp_path / "daemon.toml").write_text(POOL_TOML)
    (tmp_path / "run").mkdir(mode=0o700)
    env = {"AGENTKERNEL_HOME": str(tmp_path / "home"),
           "AGENTKERNEL_RUNTIME_DIR": str(tmp_path / "run"),
           "AGENTKERNEL_DAEMON_CONFIG": str(tmp_path / "daemon.toml")}
    r = ak("daemon", "start", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    try:
        deadline = time.monotonic() + 90
        ids: set[str] = set()
        procs: dict[int, list[str]] = {}
        while time.monotonic() < deadline:
            ids = started_under(tmp_path)
            procs = runsc_processes(ids)
            sentries = [a for a in procs.values() if os.path.basename(a[0]) == "runsc-sandbox"]
            if len(ids) == 3 and len(sentries) == 3:
                break
            time.sleep(0.5)
        assert len(ids) == 3, f"the pool did not fill: {ids}"
        assert all(cid.startswith("ak-pool-") for cid in ids), ids
        for cid in ids:
            assert_unreachable({cid}, runsc_processes({cid}),
                               tmp_path / "run" / "sandboxes" / cid[3:] / "state")
    finally:
        ak("daemon", "stop", env=env, cwd=tmp_path, timeout=60)


@pytest.mark.parametrize("profile", ["permissive", "moderate", "restrictive"])
def test_an_ordinary_users_runsc_is_out_of_reach(profile: str) -> None:
    """agentkernel run by an ordinary user (uid 4242 here): its runsc is in a namespace of
    its own too, so nobody else (nobody, or root from the host's namespace) reaches it."""
    owner = 4242
    home = Path(tempfile.mkdtemp(prefix="ak-user-", dir="/tmp"))
    (home / "project").mkdir()
    for path in (home, home / "project"):
        os.chown(path, owner, owner)
        path.chmod(0o755)
    proc = ak_as_user(owner, home, "run", "-B", "gvisor", "-p", profile, "-i", "host", "--",
                      "sleep", "60", cwd=home / "project")
    try:
        deadline = time.monotonic() + 60
        ids: set[str] = set()
        procs: dict[int, list[str]] = {}
        while time.monotonic() < deadline and proc.poll() is None:
            ids = started_under(home)
            procs = runsc_processes(ids)
            if any(os.path.basename(a[0]) == "runsc-sandbox" for a in procs.values()):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        assert len(ids) == 1, ids
        assert_unreachable(ids, procs, home / "run" / "sandboxes" / ids.copy().pop()[3:] /
                           "state")
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            # What still runs as the user, and where each task waits: to tell a stuck
            # cleanup from a leftover holding the pipes.
            left = subprocess.run(["ps", "-u", str(owner), "-L", "-o",
                                   "pid,lwp,stat,wchan:24,args"],
                                  capture_output=True, text=True).stdout
            subprocess.run(["pkill", "-KILL", "-u", str(owner)], check=False)
            proc.kill()
            proc.communicate(timeout=30)
            pytest.fail(f"the run did not end after SIGTERM; the user's tasks:\n{left}")
        finally:
            shutil.rmtree(home, ignore_errors=True)
