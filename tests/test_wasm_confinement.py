"""Attacks on the wasm backend's worker: what a wasmtime escape would get.

From the host: the worker of a real run (CLI in-process, through a daemon, and as an
ordinary user) is not host root, has no capability, no_new_privs and a seccomp filter, its
own user/mount/net/pid namespaces, no network interface but lo, and no view of /etc, the
data dir (with the compiled-module cache) or the runtime dir (with the daemon's socket).
From inside: Python code run in a worker's sandbox, with the worker's uid, namespaces,
seccomp filter and limits (what an escape from wasmtime would be), cannot write outside
/workspace (nor there unless the profile says `rw`), cannot reach a network or the
daemon, and cannot plant a compiled module in the cache the next run trusts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox_helpers import ak, ak_as_user
from wasm_modules import write_modules

pytest.importorskip("wasmtime")
if shutil.which("bwrap") is None:
    pytest.skip("the wasm worker runs in a namespaces sandbox: needs bwrap",
                allow_module_level=True)

NOBODY = 65534


def _worker_script() -> str:
    from agentkernel.backends.wasm import WORKER_SCRIPT

    return WORKER_SCRIPT


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _under(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        pid = _ppid(pid) or 0
    return False


def _workers_under(ancestor: int) -> list[int]:
    """The pids of the wasm worker processes (at any depth) under `ancestor`."""
    script = _worker_script().encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[1:4] == [b"-I", b"-S", script] and _under(int(entry), ancestor):
            found.append(int(entry))
    return found


def _find_worker(ancestor: int, timeout: float = 60) -> int:
    """The pid of the wasm worker process started (at any depth) under `ancestor`."""
    script = _worker_script()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (len(argv) >= 4 and argv[1:4] == [b"-I", b"-S", script.encode()]
                    and _under(int(entry), ancestor)):
                return int(entry)
        time.sleep(0.05)
    raise AssertionError("no wasm worker process appeared")


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _check_worker(pid: int, host_uid: int, hidden: list[Path], project: Path) -> None:
    """What the host sees of a running worker."""
    st = _status(pid)
    uids = {int(x) for x in st["Uid"].split()}
    gids = {int(x) for x in st["Gid"].split()}
    if host_uid == 0:
        assert 0 not in uids and min(uids) >= 65536, st["Uid"]  # an unprivileged range
        assert 0 not in gids and min(gids) >= 65536, st["Gid"]
    else:
        assert uids == {host_uid}, st["Uid"]
    assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"  # a filter
    for ns in ("user", "mnt", "net", "pid", "ipc", "uts"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    # Its network namespace has nothing but loopback.
    lines = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    assert [ln.split(":")[0].strip() for ln in lines] == ["lo"]
    # Its root: no /etc, none of our dirs; the project at /workspace.
    root = Path(f"/proc/{pid}/root")
    assert not (root / "etc").exists()
    for path in hidden:
        assert not (root / str(path).lstrip("/")).exists(), path
    if host_uid == 0:  # root can look inside; the project is there
        assert (root / "workspace" / "hello.wat").read_text() == \
            (project / "hello.wat").read_text()


def _make_root(prefix: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    root.chmod(0o755)
    (root / "run").mkdir(mode=0o700)
    (root / "proj").mkdir(mode=0o755)
    write_modules(root / "proj")
    return root


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    path = _make_root("ak-wasmc-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _env(root: Path, daemon: bool) -> dict[str, str]:
    env = {"AGENTKERNEL_HOME": str(root / "home"), "AGENTKERNEL_RUNTIME_DIR": str(root / "run"),
           "AGENTKERNEL_DAEMON_AUTOSTART": "0"}
    if not daemon:
        env["AGENTKERNEL_NO_DAEMON"] = "1"
    return env


def _start_loop(env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "agentkernel", "run", "--timeout", "60",
                             "loop.wat"], cwd=cwd, env={**os.environ, **env},
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


@pytest.mark.parametrize("daemon", [False, True], ids=["in-process", "daemon"])
def test_the_running_worker_from_the_host(root: Path, daemon: bool) -> None:
    env = _env(root, daemon)
    daemon_pid = None
    if daemon:
        r = ak("daemon", "start", env=env)
        assert r.returncode == 0, r.stderr
        daemon_pid = int((root / "run" / "daemon.pid").read_text().split()[0])
    proc = _start_loop(env, root / "proj")
    try:
        pid = _find_worker(daemon_pid or proc.pid)
        assert pid not in (proc.pid, daemon_pid)  # never the CLI or the daemon itself
        hidden = [root / "home", root / "run", root / "run" / "daemon.sock",
                  root / "home" / "wasm-cache", Path("/etc/passwd")]
        _check_worker(pid, os.geteuid(), hidden, root / "proj")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        if daemon:
            ak("daemon", "stop", env=env)


def _run_in(root: Path, env: dict[str, str], *args: str,
            input: bytes | None = None) -> tuple[int, str, str]:
    """A run through the daemon: its exit code, stdout, and the sandbox (worker) it ran in."""
    r = ak("run", "-v", *args, cwd=root / "proj", env=env, input=input)
    said = [ln for ln in r.stderr.splitlines() if "via daemon" in ln]
    assert said, r.stderr
    return r.returncode, r.stdout, said[0].rsplit("sandbox ", 1)[1]


def _warm_worker(status: Any, timeout: float = 120) -> None:
    """Until the daemon keeps a wasm worker warm (`status()`: its `daemon status --json`).
    The run before started its worker itself (that one serves once); the pool's own worker
    starts after it, and a run that came before it was ready would start one more itself."""
    deadline = time.monotonic() + timeout
    while not any(p["backend"] == "wasm" and p["warm"] >= 1 for p in status()["pools"]):
        assert time.monotonic() < deadline, f"no warm wasm worker: {status()}"
        time.sleep(0.1)


def test_runs_share_a_worker_never_an_instance(root: Path) -> None:
    """A daemon's worker serves the next run of its key (the warm path), and each run is a
    new instance: no memory, global, table, environment or stdin of one run is there for
    the next. A run that timed out takes its worker with it."""
    env = _env(root, daemon=True)
    assert ak("daemon", "start", env=env).returncode == 0
    try:
        # The first run starts its worker in the request's thread: that one serves once.
        assert _run_in(root, env, "hello.wat")[0] == 0
        _warm_worker(lambda: json.loads(ak("daemon", "status", "--json", env=env).stdout))
        runs = [_run_in(root, env, "counter.wat") for _ in range(3)]
        assert [(code, out) for code, out, _ in runs] == [(0, "1111\n")] * 3, runs
        workers = {worker for _, _, worker in runs}
        assert len(workers) == 1, runs  # one worker: the counts above were tested on it

        secret = f"SECRET={os.urandom(8).hex()}"
        _, out, worker = _run_in(root, env, "-e", secret, "env.wat")
        assert secret in out.split("\0") and worker in workers
        _, out, worker = _run_in(root, env, "env.wat")
        assert secret not in out and worker in workers

        # cat echoes its own run's stdin only; a run whose stdin is empty reads nothing.
        assert _run_in(root, env, "cat.wat", input=b"first")[1] == "first"
        assert _run_in(root, env, "cat.wat", input=b"")[1] == ""
        _, out, worker = _run_in(root, env, "cat.wat", input=b"second")
        assert out == "second" and worker in workers

        code, _, stuck = _run_in(root, env, "--timeout", "0.5", "loop.wat")
        assert code == 124
        code, out, worker = _run_in(root, env, "counter.wat")
        assert (code, out) == (0, "1111\n") and worker != stuck

        # Interrupted by its caller: that worker goes too.
        proc = subprocess.Popen([sys.executable, "-m", "agentkernel", "run", "-v", "loop.wat"],
                                cwd=root / "proj", env={**os.environ, **env},
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        said = proc.stderr.readline()
        while "via daemon" not in said:
            said = proc.stderr.readline()
            assert said, "the run never started"
        interrupted = said.rsplit("sandbox ", 1)[1].strip()
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
        assert proc.returncode != 0
        code, out, worker = _run_in(root, env, "counter.wat")
        assert (code, out) == (0, "1111\n") and worker != interrupted

        # Workers that die while they wait (here: killed from the host) serve no run.
        daemon_pid = int((root / "run" / "daemon.pid").read_text().split()[0])
        idle = _workers_under(daemon_pid)
        assert idle
        for pid in idle:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() for pid in idle):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert _run_in(root, env, "counter.wat")[:2] == (0, "1111\n")
    finally:
        ak("daemon", "stop", env=env)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root (to become nobody) and setpriv")
def test_the_worker_of_an_ordinary_user() -> None:
    top = _make_root("ak-wasmc-nobody-")
    try:
        home = top / "nobody"
        home.mkdir()
        os.chown(home, NOBODY, NOBODY)
        proc = ak_as_user(NOBODY, home, "run", "--timeout", "60", "loop.wat",
                          cwd=top / "proj", timeout=90)
        pid = 0
        try:
            pid = _find_worker(proc.pid)
            hidden = [home / "data", home / "run", home / "data" / "wasm-cache"]
            _check_worker(pid, NOBODY, hidden, top / "proj")
        finally:
            if pid:  # the run then ends (killed), and the CLI with it
                os.kill(pid, signal.SIGKILL)
            else:
                proc.kill()
            _out, err = proc.communicate(timeout=60)
        assert pid and proc.returncode != 0, err
    finally:
        subprocess.run(["rm", "-rf", str(top)], check=False)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root (to become nobody) and setpriv")
def test_an_ordinary_users_daemon_reuses_workers_never_instances() -> None:
    top = _make_root("ak-wasmc-nobody-d-")
    home = top / "nobody"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)

    def run(*args: str) -> tuple[int, str, str]:
        proc = ak_as_user(NOBODY, home, *args, cwd=top / "proj", timeout=60)
        out, err = proc.communicate(timeout=90)
        return proc.returncode, out, err

    try:
        code, _out, err = run("daemon", "start")
        assert code == 0, err
        assert run("run", "hello.wat")[0] == 0  # the cold one: its worker serves once
        _warm_worker(lambda: json.loads(run("daemon", "status", "--json")[1]))
        secret = f"SECRET={os.urandom(8).hex()}"
        workers = set()
        for args in (("counter.wat",), ("-e", secret, "env.wat"), ("counter.wat",),
                     ("env.wat",)):
            code, out, err = run("run", "-v", *args)
            assert code == 0, err
            workers.add(err.split("sandbox ", 1)[1].split()[0])
            if args[-1] == "counter.wat":
                assert out == "1111\n"
            else:
                assert (secret in out.split("\0")) == (secret in args)
        assert len(workers) == 1, workers
    finally:
        run("daemon", "stop")
        subprocess.run(["rm", "-rf", str(top)], check=False)


# ---------------------------------------------------------------- code inside a worker

# Run in the worker's sandbox: argv[1] a JSON object {"hidden": [...], "write": [...]}.
PROBE = r"""
import json, os, socket, sys
req = json.loads(sys.argv[1])
out = {"uid": os.getuid(), "root": sorted(os.listdir("/")), "visible": [], "wrote": [],
       "fds": []}
for p in req["hidden"]:
    if os.path.lexists(p):
        out["visible"].append(p)
for p in req["write"]:
    try:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(b"planted")
        out["wrote"].append(p)
    except OSError:
        pass
for fd in os.listdir("/proc/self/fd"):
    try:
        out["fds"].append(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        pass
nets = []
for family, kind, addr in ((socket.AF_INET, socket.SOCK_STREAM, ("1.1.1.1", 53)),
                           (socket.AF_INET, socket.SOCK_DGRAM, ("8.8.8.8", 53)),
                           (socket.AF_INET6, socket.SOCK_STREAM, ("2606:4700::1111", 53))):
    s = socket.socket(family, kind)
    s.settimeout(3)
    try:
        s.connect(addr)
        if kind == socket.SOCK_DGRAM:
            s.send(b"x")
        nets.append("reached")
    except OSError as e:
        nets.append(e.errno)
out["net"] = nets
out["ifaces"] = [l.split(":")[0].strip() for l in open("/proc/net/dev").read().splitlines()[2:]]
print(json.dumps(out))
"""


def _inside(sandbox: object, code: str, arg: str) -> dict[str, object]:
    """Run Python in the worker's sandbox as the worker runs (its uid, filter, limits)."""
    from agentkernel.sandbox import command_rlimits

    agent = sandbox.client._agent  # type: ignore[attr-defined]
    worker_spec = sandbox.worker_spec  # type: ignore[attr-defined]
    rlimits = command_rlimits(worker_spec.profile, sandbox.cgroup)  # type: ignore[attr-defined]
    execution = agent.exec([os.path.realpath(sys.executable), "-I", "-S", "-c", code, arg],
                           env={}, cwd="/", rlimits=rlimits)
    out, err, status = execution.wait(timeout=60)
    assert status.code == 0, err
    result: dict[str, object] = json.loads(out)
    return result


def _check_limits(sandbox: object, module_mb: int | None) -> None:
    """The worker's cgroup: the module's memory plus the interpreter's room, 64 pids."""
    from agentkernel.backends.wasm import WORKER_OVERHEAD_MB, WORKER_PIDS

    cgroup = sandbox.cgroup  # type: ignore[attr-defined]
    if cgroup is None:  # no writable cgroup here: the worker has rlimits only
        return
    enforced = cgroup.enforced()
    if "memory" in enforced and module_mb:
        path = cgroup._file("memory", "memory.max") or cgroup._file(
            "memory", "memory.limit_in_bytes")
        assert int(path.read_text()) == (module_mb + WORKER_OVERHEAD_MB) << 20, path
    if "pids" in enforced:
        assert int(cgroup._file("pids", "pids.max").read_text()) == WORKER_PIDS


@pytest.mark.parametrize("profile", ["moderate", "permissive"])
def test_code_in_the_worker_reaches_nothing(root: Path, profile: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from agentkernel.backends.wasm import WasmBackend, compiler
    from agentkernel.backends.wasm_cache import cache_dir
    from agentkernel.controlplane import control_masks
    from agentkernel.paths import data_dir, runtime_dir
    from agentkernel.profiles import get_profile
    from agentkernel.rootfs import host_rootfs
    from agentkernel.sandbox import SandboxSpec

    for key, value in _env(root, daemon=False).items():
        monkeypatch.setenv(key, value)
    # A cache entry exists, as after any run; the worker tries to replace it and to add one.
    compiler().module(root / "proj" / "hello.wat", "hello.wat")
    cache = cache_dir()
    assert cache is not None
    entries = {p.name: p.read_bytes() for p in cache.iterdir()}
    assert entries
    victim = next(iter(entries))
    proj = root / "proj"
    prof = get_profile(profile)
    spec = SandboxSpec(name=f"wasmc-{os.urandom(3).hex()}", profile=prof, rootfs=host_rootfs(),
                       image="host", workspace=proj, masks=control_masks(prof, proj, None))
    sandbox = WasmBackend().start(spec)
    try:
        hidden = [str(data_dir()), str(runtime_dir()), str(runtime_dir() / "daemon.sock"),
                  str(cache), "/etc", "/home/user", str(Path.home() / ".ssh")]
        writes = [f"/x-{profile}", f"/usr/x-{profile}", f"/ak-wasm/agentkernel/x-{profile}",
                  f"/ak-wasm/wasmtime/x-{profile}", f"{cache}/{victim}",
                  f"{cache}/{'0' * 64}.cwasm", f"/workspace/x-{profile}"]
        out = _inside(sandbox, PROBE, json.dumps({"hidden": hidden, "write": writes}))
        _check_limits(sandbox, prof.memory_mb)
    finally:
        sandbox.destroy()
    assert out["visible"] == [], out
    # The read-only mounts refuse; what lands on the private /tmp or /run tmpfs (where a
    # host path under /tmp leads inside) vanishes with the sandbox: the host is checked.
    wrote = [p for p in out["wrote"] if not p.startswith(("/tmp/", "/run/"))]
    expected = [f"/workspace/x-{profile}"] if profile == "permissive" else []
    assert wrote == expected, out
    assert not Path(f"/usr/x-{profile}").exists()
    assert (proj / f"x-{profile}").exists() == (profile == "permissive")
    assert out["ifaces"] == ["lo"]
    assert "reached" not in out["net"], out
    assert not any(str(data_dir()) in fd or "wasm-cache" in fd for fd in out["fds"]), out
    assert set(out["root"]) <= {"ak-wasm", "usr", "bin", "sbin", "lib", "lib32", "lib64",
                                "libx32", "proc", "dev", "tmp", "run", "root", "home", "var",
                                "workspace"}, out["root"]
    # The cache is exactly what it was: nothing planted, nothing replaced.
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == entries
    assert not (Path(sys.modules["agentkernel"].__file__ or "").parent / f"x-{profile}").exists()


def test_the_worker_is_handed_compiled_code_only_from_us(root: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """The cache is written by this process alone, and a run's output never reaches it:
    a module whose output looks like a compiled module leaves the cache as it was."""
    env = _env(root, daemon=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    r = ak("run", "hello.wat", cwd=root / "proj", env=env)
    assert r.returncode == 0, r.stderr
    cache = root / "home" / "wasm-cache"
    before = {p.name: (p.stat().st_uid, p.stat().st_mode & 0o777, p.read_bytes())
              for p in cache.iterdir()}
    assert all(uid == os.geteuid() and mode == 0o600 for uid, mode, _ in before.values())
    r = ak("run", "-p", "permissive", "cat.wat", cwd=root / "proj", env=env,
           input=b"\x7fELF" + os.urandom(1024))
    assert r.returncode == 0, r.stderr
    after = {p.name: (p.stat().st_uid, p.stat().st_mode & 0o777, p.read_bytes())
             for p in cache.iterdir() if p.name in before}
    assert after == before
