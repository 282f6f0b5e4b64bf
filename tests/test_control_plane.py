"""Attacks on the host's control plane from inside sandboxes (issue 9, S2).

A daemon runs with a kept sandbox; then `agentkernel run` starts sandboxes whose project
dir (or home) contains the daemon's runtime and data dirs: from `/`, from `/tmp`, from
their parent, with $HOME there. From inside, every view of the daemon's socket, its API
socket, the kept sandbox's agent socket and the state files must be absent or refuse.
And a sandboxed process that does reach the daemon's socket (handed to it on purpose
through a low-level spec) is refused, as is one in fresh user/pid namespaces on the host.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sandbox_helpers import SYSTEM_PYTHON, ak, backend_available, public_pythonpath

PROFILES = ("restrictive", "moderate", "permissive")
DAEMON_TOML = """
[daemon]
adhoc_min = 0
pools = []
"""

# Run inside the sandbox: argv[1] a JSON list of paths that are views of the host's
# control files; argv[2:] dirs to walk for any socket or state file.
PROBE = r"""
import json, os, socket, stat, sys
for path in json.loads(sys.argv[1]):
    try:
        st = os.lstat(path)
    except OSError:
        continue
    print("VISIBLE", path)
    if stat.S_ISSOCK(st.st_mode):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        try:
            s.connect(path)
            s.sendall(b'{"op":"list_sandboxes"}\n')
            print("CONNECTED", path, s.recv(300)[:120])
        except OSError as e:
            print("refused", path, e)
for root in sys.argv[2:]:
    for d, _dirs, files in os.walk(root):
        for n in files:
            p = os.path.join(d, n)
            try:
                sock = stat.S_ISSOCK(os.lstat(p).st_mode)
            except OSError:
                continue
            if sock or n in ("state.db", "daemon.pid", "daemon.log"):
                print("FOUND", p)
print("probe-done")
"""


@dataclass
class Env:
    root: Path  # holds home/ (data dir) and run/ (runtime dir)
    env: dict[str, str]

    def ak(self, *args: str, cwd: Path, env: dict[str, str] | None = None,
           timeout: float = 180) -> tuple[int, str, str]:
        r = ak(*args, cwd=cwd, env={**self.env, **(env or {})}, timeout=timeout)
        return r.returncode, r.stdout, r.stderr

    def control_files(self) -> list[Path]:
        run, home = self.root / "run", self.root / "home"
        files = [run / "daemon.sock", run / "api.sock", home / "state.db", home / "daemon.log",
                 run / "sandboxes" / "victim" / "ctl" / "agent.sock"]
        for f in files:
            assert f.exists(), f"the test needs {f} to exist"
        return files


@pytest.fixture(scope="module")
def ctl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if not backend_available("namespaces"):
        pytest.skip("needs bubblewrap")
    root = tmp_path_factory.mktemp("akctl")
    (root / "daemon.toml").write_text(DAEMON_TOML)
    e = Env(root, {"AGENTKERNEL_HOME": str(root / "home"),
                   "AGENTKERNEL_RUNTIME_DIR": str(root / "run"),
                   "AGENTKERNEL_DAEMON_CONFIG": str(root / "daemon.toml")})
    code, _, err = e.ak("daemon", "start", cwd=root)
    assert code == 0, err
    code, _, err = e.ak("create", "victim", "-i", "host", "-B", "namespaces", cwd=root)
    assert code == 0, err
    for _ in range(200):  # the API socket comes up on a thread of its own
        if (root / "run" / "api.sock").exists():
            break
        subprocess.run(["sleep", "0.05"], check=True)
    try:
        yield e
    finally:
        e.ak("remove", "victim", cwd=root)
        e.ak("daemon", "stop", cwd=root)


def _seen_at(path: Path, host: Path | None, inside: str) -> list[str]:
    """Where `path` would show inside a sandbox that mounts `host` at `inside`."""
    if host is None or not path.is_relative_to(host):
        return []
    rel = str(path.relative_to(host))
    return [inside if rel == "." else f"{inside}/{rel}"]


def _views(files: list[Path], cwd: Path, home: Path | None) -> list[str]:
    """Every in-sandbox path under which a host file would show through a mount."""
    return [v for f in files for host, inside in (
        (cwd, "/workspace"), (cwd, "/run/ak/lower/workspace"), (home, "/home/user"))
        for v in _seen_at(f, host, inside)]


def _attack(ctl: Env, backend: str, profile: str, cwd: Path, *, home: Path | None = None,
            in_process: bool = False) -> None:
    if not backend_available(backend):
        pytest.skip(f"{backend} backend not installed")
    files = ctl.control_files()
    views = _views(files, cwd, home if profile == "permissive" else None)
    assert views
    walk = _seen_at(ctl.root, cwd, "/workspace") + _seen_at(ctl.root, home, "/home/user")
    env = {"AGENTKERNEL_NO_DAEMON": "1"} if in_process else {}
    if home is not None:
        env["HOME"] = str(home)
    # --no-network: unix sockets are reached through the filesystem, whatever the network
    # (and slirp4netns sometimes fails to start on this busy host).
    code, out, err = ctl.ak("run", "-q", "-i", "host", "-B", backend, "-p", profile,
                            "--no-network", "--", "python3", "-c", PROBE, json.dumps(views),
                            *walk, cwd=cwd, env=env)
    if code == 125 and "overlay on /workspace" in err and cwd == Path("/"):
        # Not ours: a copy-on-write overlay of the host's whole / fails here (main too).
        pytest.skip("moderate cannot overlay / on this host")
    assert code == 0 and "probe-done" in out, (code, out, err)
    assert "CONNECTED" not in out, out
    assert "VISIBLE" not in out and "FOUND" not in out, out


@pytest.mark.parametrize("backend", ["namespaces", "gvisor"])
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("where", ["parent", "tmp", "slash"])
def test_run_from_a_dir_holding_the_control_plane(ctl: Env, backend: str, profile: str,
                                                  where: str) -> None:
    cwd = {"parent": ctl.root, "tmp": Path("/tmp"), "slash": Path("/")}[where]
    if not ctl.root.is_relative_to(cwd):
        pytest.skip(f"the test's dirs are not under {cwd}")
    _attack(ctl, backend, profile, cwd)


@pytest.mark.parametrize("backend", ["namespaces", "gvisor"])
@pytest.mark.parametrize("profile", PROFILES)
def test_run_in_process_from_the_parent(ctl: Env, backend: str, profile: str) -> None:
    """The same without the daemon: `run` plans and starts the sandbox itself."""
    _attack(ctl, backend, profile, ctl.root, in_process=True)


@pytest.mark.parametrize("backend", ["namespaces", "gvisor"])
def test_home_holding_the_control_plane(ctl: Env, backend: str, tmp_path: Path) -> None:
    """permissive mounts $HOME: a home that holds the data and runtime dirs is masked too."""
    _attack(ctl, backend, "permissive", tmp_path, home=ctl.root)


def test_project_dir_inside_the_control_plane_is_refused(ctl: Env) -> None:
    for cwd in (ctl.root / "run", ctl.root / "home", ctl.root / "run" / "sandboxes"):
        for extra in ({}, {"AGENTKERNEL_NO_DAEMON": "1"}):
            code, out, err = ctl.ak("run", "-q", "-i", "host", "-B", "namespaces", "--",
                                    "echo", "ran", cwd=cwd, env=extra)
            assert code != 0 and "ran" not in out
            assert "control plane" in err, err
    code, _, err = ctl.ak("create", "inside", "-i", "host", "-B", "namespaces", "--dir",
                          str(ctl.root / "home"), cwd=ctl.root)
    assert code != 0 and "control plane" in err, err


def _connect_probe(paths: list[str]) -> str:
    return (
        "import socket,sys\n"
        f"for path, req in zip({paths!r}, [b'{{\"op\":\"list_sandboxes\"}}\\n', "
        "b'GET /sandboxes HTTP/1.1\\r\\nHost: localhost\\r\\n\\r\\n']):\n"
        "    s = socket.socket(socket.AF_UNIX); s.settimeout(5)\n"
        "    try:\n"
        "        s.connect(path); s.sendall(req)\n"
        "        print('ANSWER', path, s.recv(400))\n"
        "    except OSError as e:\n"
        "        print('ERROR', path, e)\n"
    )


def _assert_refused(out: str) -> None:
    lines = [line for line in out.splitlines() if line.startswith(("ANSWER", "ERROR"))]
    assert len(lines) == 2, out
    daemon_line, api_line = lines
    # Root's sandboxes fail the uid check first (their host uid is never root's); an
    # ordinary user's, and the unshared peers, the namespace check.
    reason = ("namespace", "peer uid")
    assert "PermissionDenied" in daemon_line and any(r in daemon_line for r in reason), out
    assert "403 Forbidden" in api_line and any(r in api_line for r in reason), out
    assert "victim" not in out, out


def test_peer_in_other_namespaces_on_the_host_is_refused(ctl: Env) -> None:
    """A process of the same uid in fresh user and pid namespaces (what every sandbox is)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare")
    run = ctl.root / "run"
    probe = _connect_probe([str(run / "daemon.sock"), str(run / "api.sock")])
    for ns in (["--user", "--map-root-user"], ["--pid", "--fork"],
               ["--user", "--map-root-user", "--pid", "--fork"]):
        out = subprocess.run(["unshare", *ns, sys.executable, "-c", probe],
                             capture_output=True, text=True, timeout=60, check=False).stdout
        _assert_refused(out)
    # The host's own processes are still served.
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, check=False).stdout
    assert '"ok":true' in out and "victim" in out and "200 OK" in out, out


def test_sandbox_handed_the_daemon_socket_is_refused(ctl: Env) -> None:
    """A real sandbox that can connect() to the sockets (its spec binds the runtime dir in,
    read-write, with no masks: something planning never builds) gets a refusal."""
    from agentkernel.backends.namespaces import NamespacesBackend
    from agentkernel.profiles import get_profile
    from agentkernel.rootfs import host_rootfs
    from agentkernel.sandbox import SandboxSpec

    spec = SandboxSpec(name="handed-socket", profile=get_profile("permissive"),
                       rootfs=host_rootfs(), image="host", workspace=ctl.root / "run")
    assert spec.masks == ()
    sandbox = NamespacesBackend().start(spec)
    try:
        probe = _connect_probe(["/workspace/daemon.sock", "/workspace/api.sock"])
        out, _err, _status = sandbox.client.exec(["python3", "-c", probe]).wait(60)
        # The agent's unix-socket guard refuses the connect() itself now (the project is a
        # host bind): the daemon's peer check behind it is the next test's, on the host.
        lines = [ln for ln in out.decode().splitlines() if ln.startswith(("ANSWER", "ERROR"))]
        assert len(lines) == 2 and all("[Errno 13]" in ln for ln in lines), out
        assert b"victim" not in out, out
    finally:
        sandbox.destroy()


def test_peer_check_unit() -> None:
    """refusal(): None for a peer in our namespaces, a reason for a child in others."""
    from agentkernel.peer import refusal

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert refusal(a) is None
    if shutil.which("unshare") is None:
        return
    path = Path(os.environ["AGENTKERNEL_RUNTIME_DIR"]) / "peer-unit.sock"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)
    child = subprocess.Popen(
        ["unshare", "--user", "--map-root-user", sys.executable, "-c",
         f"import socket,time; s=socket.socket(socket.AF_UNIX); s.connect({str(path)!r}); "
         "time.sleep(5)"])
    try:
        srv.settimeout(30)
        conn, _ = srv.accept()
        with conn:
            why = refusal(conn)
        assert why is not None and "user namespace" in why
    finally:
        child.kill()
        child.wait()
        srv.close()
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("profile", PROFILES)
def test_as_an_ordinary_user(profile: str) -> None:
    """The same masks for a user's in-process run (bwrap unprivileged) from a dir that
    holds that user's runtime and data dirs (a listening daemon socket in there)."""
    import tempfile

    nobody = 65534
    if os.geteuid() != 0 or not shutil.which("setpriv") or not backend_available("namespaces"):
        pytest.skip("needs root (to become nobody), setpriv and bwrap")
    root = Path(tempfile.mkdtemp(prefix="ak-ctl-user-", dir="/tmp"))
    try:
        root.chmod(0o755)
        for sub in ("run", "data"):
            (root / sub).mkdir(mode=0o700)
        (root / "data" / "state.db").write_text("state")
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(str(root / "run" / "daemon.sock"))
        srv.listen(4)
        for path in (root, root / "run", root / "data", root / "run" / "daemon.sock",
                     root / "data" / "state.db"):
            os.chown(path, nobody, nobody)
        views = _views([root / "run" / "daemon.sock", root / "data" / "state.db"], root, None)
        env = {k: os.environ[k] for k in ("PATH", "LANG") if k in os.environ}
        env.update(HOME=str(root), AGENTKERNEL_HOME=str(root / "data"),
                   AGENTKERNEL_RUNTIME_DIR=str(root / "run"), AGENTKERNEL_NO_DAEMON="1",
                   PYTHONPATH=public_pythonpath())  # nobody cannot read the suite's own
        setpriv = ["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups", "--"]
        r = subprocess.run([*setpriv, SYSTEM_PYTHON, "-m", "agentkernel", "run", "-q", "-i",
                            "host", "-B", "namespaces", "-p", profile, "--no-network", "--",
                            "python3", "-c", PROBE, json.dumps(views), "/workspace"],
                           cwd=root, env=env, capture_output=True, text=True, timeout=120,
                           check=False)
        srv.close()
        assert r.returncode == 0 and "probe-done" in r.stdout, (r.stdout, r.stderr)
        assert "VISIBLE" not in r.stdout and "FOUND" not in r.stdout, r.stdout
        assert "CONNECTED" not in r.stdout, r.stdout
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_masks_unit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """control_masks: the dirs in use and the user's default ones are masked where they show;
    a planted default (a symlink to the project) neither refuses the project nor masks it."""
    from agentkernel.controlplane import control_masks
    from agentkernel.errors import UsageError
    from agentkernel.profiles import get_profile

    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    monkeypatch.setenv("AGENTKERNEL_HOME", str(project / "sub" / "data"))
    monkeypatch.setenv("AGENTKERNEL_RUNTIME_DIR", str(tmp_path / "elsewhere" / "run"))
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    (xdg / "agentkernel").symlink_to(project)  # "planted": must count for nothing
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    moderate, permissive = get_profile("moderate"), get_profile("permissive")
    assert control_masks(moderate, project, None) == ("/workspace/sub/data",)
    assert control_masks(get_profile("moderate")._replace(workspace="none"), project,
                         None) == ()
    home_masks = control_masks(permissive, tmp_path / "elsewhere", tmp_path)
    assert set(home_masks) == {"/workspace/run", "/home/user/elsewhere/run",
                               "/home/user/project/sub/data"}
    for inside in (project / "sub" / "data", tmp_path / "elsewhere" / "run" / "x"):
        inside.mkdir(parents=True, exist_ok=True)
        with pytest.raises(UsageError, match="control plane"):
            control_masks(moderate, inside, None)


def test_microvm_refuses_a_project_holding_the_control_plane(tmp_path: Path) -> None:
    """The microvm backend copies the project onto a disk: no mask could apply, so it
    refuses before anything is built (checked first thing in start)."""
    from agentkernel.backends.microvm import MicrovmBackend
    from agentkernel.errors import UsageError
    from agentkernel.profiles import get_profile
    from agentkernel.rootfs import host_rootfs
    from agentkernel.sandbox import SandboxSpec

    spec = SandboxSpec(name="vm-ctl", profile=get_profile("moderate"), rootfs=host_rootfs(),
                       image="host", workspace=tmp_path, masks=("/workspace/home",))
    with pytest.raises(UsageError, match="copies the project dir"):
        MicrovmBackend().start(spec)
