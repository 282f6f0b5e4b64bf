"""`run` through the warm pool, attach over a real PTY, and the socket API's other calls."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import secrets
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon
from sandbox_helpers import backend_available

# The `agentkernel` command as installed (pip only rewrites its shebang). Not `python -m`:
# runpy alone imports contextlib, functools and collections.
LAUNCHER = Path(__file__).resolve().parents[2] / "bin" / "agentkernel"

HOST = ("-i", "host", "-B", "namespaces")


def _status(daemon: Daemon) -> dict[str, Any]:
    r = daemon.ak("daemon", "status", "--json")
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def _wait_warm(daemon: Daemon, pred: Any, timeout: float = 120) -> dict[str, Any]:
    """Until `pred` holds of the daemon's status (a refill is a sandbox start: seconds on
    a loaded machine); the next run's "warm pool" depends on it."""
    deadline = time.monotonic() + timeout
    while True:
        st = _status(daemon)
        if pred(st):
            return st
        assert time.monotonic() < deadline, f"the pool did not refill: {st}"
        time.sleep(0.1)


def test_run_uses_the_pool_once_per_sandbox_and_refills(daemon: Daemon, tmp_path: Path) -> None:
    daemon.ensure_up()
    seen = set()
    for i in range(4):
        r = daemon.ak("run", "-v", *HOST, "--", "sh", "-c",
                      "echo $AGENTKERNEL_SANDBOX; touch /root/mark; ls /root", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        name, listing = r.stdout.split("\n", 1)
        assert listing == "mark\n"  # a fresh sandbox every time: nothing from the last run
        seen.add(name)
        assert "via daemon" in r.stderr
        if i == 0:
            assert "cold start" in r.stderr  # a project dir nobody used before
        else:
            assert "via daemon (warm pool)" in r.stderr, r.stderr
        key = str(tmp_path)
        _wait_warm(daemon, lambda st, key=key: any(
            p["workspace"] == key and p["warm"] >= 1 for p in st["pools"]))
    assert len(seen) == 4
    st = _status(daemon)
    pool = next(p for p in st["pools"] if p["workspace"] == str(tmp_path))
    assert pool["warm"] >= 1 and pool["in_use"] == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="plants a credential dir in the host's /etc")
def test_a_credential_path_made_while_the_daemon_runs_is_masked(daemon: Daemon,
                                                               tmp_path: Path) -> None:
    """An always-masked path (/etc/credstore: masked whatever its mode) created after the
    daemon started and while its pool holds warm sandboxes: no later run can read it."""
    target = Path("/etc/credstore")
    if os.path.lexists(target):
        pytest.skip("this host has its own /etc/credstore")
    daemon.ensure_up()
    probe = ("cat /etc/credstore/token 2>/dev/null; "
             "ls /etc/credstore 2>/dev/null | wc -l")
    assert daemon.ak("run", *HOST, "--", "sh", "-c", probe, cwd=tmp_path).stdout == "0\n"
    key = str(tmp_path)
    _wait_warm(daemon, lambda st: any(
        p["workspace"] == key and p["warm"] >= 1 for p in st["pools"]))
    target.mkdir(mode=0o755)
    try:
        token = target / "token"
        token.write_text("canary-credstore\n")
        token.chmod(0o644)  # world-readable: only the fixed list hides it
        for _ in range(2):  # the warm sandbox made before, then a fresh one
            r = daemon.ak("run", "-v", *HOST, "--", "sh", "-c", probe, cwd=tmp_path)
            assert r.returncode == 0, r.stderr
            assert "canary" not in r.stdout and r.stdout == "0\n", r.stdout
    finally:
        shutil.rmtree(target)


def test_run_via_daemon_behaves_like_in_process(daemon: Daemon, tmp_path: Path) -> None:
    daemon.ensure_up()
    (tmp_path / "hello.txt").write_text("hi there\n")
    cases = [
        (["sh", "-c", "echo out; echo err >&2; exit 42"], 42, "out\n", "err\n"),
        (["sh", "-c", "kill -TERM $$"], 128 + signal.SIGTERM, "", ""),
        (["cat", "hello.txt"], 0, "hi there\n", ""),
        (["no-such-command-xyz"], 127, "", None),
    ]
    for argv, code, out, err in cases:
        for via in ("daemon", "in-process"):
            env = {"AGENTKERNEL_NO_DAEMON": "1"} if via == "in-process" else {}
            r = daemon.ak("run", *HOST, "--", *argv, cwd=tmp_path, env=env)
            assert (r.returncode, r.stdout) == (code, out), (via, argv, r.stderr)
            if err is not None:
                assert r.stderr == err, (via, argv)
            else:
                assert "command not found" in r.stderr
    r = daemon.ak("run", *HOST, "--timeout", "0.5", "--", "sleep", "5", cwd=tmp_path)
    assert r.returncode == 124 and "timed out" in r.stderr
    r = daemon.ak("run", *HOST, "--json", "--", "sh", "-c", "echo j; exit 3", cwd=tmp_path)
    data = json.loads(r.stdout)
    assert data["exit_code"] == 3 and data["stdout"] == "j\n" and data["pooled"] is not None
    r = daemon.ak("run", *HOST, "--", "tr", "a-z", "A-Z", cwd=tmp_path, input=b"stdin works\n")
    assert r.stdout == "STDIN WORKS\n"


def test_hostile_project_file_is_limited_through_the_daemon_too(daemon: Daemon,
                                                               tmp_path: Path) -> None:
    """A project's agentkernel.toml asking for permissive, the home dir and a writable
    project dir gets none of it, in-process or through the daemon (docs/config.md)."""
    daemon.ensure_up()
    (tmp_path / "agentkernel.toml").write_text(
        '[security]\nprofile = "permissive"\nmount_home = true\nmount_cwd = true\n')
    script = ["sh", "-c", "test -d /home/user && echo home; echo x > /workspace/planted; true"]
    for via in ("daemon", "in-process"):
        env = {"AGENTKERNEL_NO_DAEMON": "1"} if via == "in-process" else {}
        r = daemon.ak("run", *HOST, "--json", "--", *script, cwd=tmp_path, env=env)
        doc = json.loads(r.stdout)
        assert (doc["profile"], doc["stdout"]) == ("moderate", ""), (via, r.stderr)
        assert (doc["pooled"] is not None) == (via == "daemon"), (via, r.stderr, doc)
        assert not (tmp_path / "planted").exists(), via
    r = daemon.ak("create", "box-hostile", "-i", "host", "-B", "namespaces", "-d", str(tmp_path))
    assert r.returncode == 0, r.stderr
    try:
        r = daemon.ak("exec", "box-hostile", "--", *script)
        assert r.stdout == "" and not (tmp_path / "planted").exists()
    finally:
        daemon.ak("remove", "box-hostile")


def test_ctrl_c_is_forwarded_through_the_daemon(daemon: Daemon, tmp_path: Path) -> None:
    daemon.ensure_up()
    script = "trap 'echo got-INT; exit 5' INT; echo ready; while :; do sleep 0.05; done"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentkernel", "run", *HOST, "--", "sh", "-c", script],
        cwd=tmp_path, env={**os.environ, **daemon.env}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGINT)
    out, _err = proc.communicate(timeout=20)
    assert out == b"got-INT\n"
    assert proc.returncode == 5


def test_client_gone_kills_its_command(daemon: Daemon, tmp_path: Path) -> None:
    daemon.ensure_up()
    marker = f"ak-orphan-{secrets.token_hex(4)}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentkernel", "run", *HOST, "--", "sh", "-c",
         f"echo ready; sleep 30 && echo {marker}"],  # (dash has no `exec -a`)
        cwd=tmp_path, env={**os.environ, **daemon.env}, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode != 0:
            break
        time.sleep(0.1)
    assert subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode != 0


def _pty_session(daemon: Daemon, args: list[str], keys: list[bytes], *, rows: int = 33,
                 cols: int = 101, timeout: float = 30, prompt: bytes = b"") -> tuple[int, bytes]:
    """Run the CLI on a real pseudo-terminal, type `keys` (once `prompt` has shown: an
    interactive bash drops what was typed before its prompt), collect what it shows."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "agentkernel", *args],
                            env={**os.environ, **daemon.env, "TERM": "xterm"},
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                            cwd=daemon.root)
    os.close(slave)
    output = b""
    pending = list(keys)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                output += chunk
            elif pending and prompt in output:
                os.write(master, pending.pop(0))
            elif proc.poll() is not None:
                break
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return proc.returncode, output


def test_attach_gives_a_real_terminal(daemon: Daemon) -> None:
    name = f"att-{secrets.token_hex(3)}"
    assert daemon.ak("create", name, *HOST).returncode == 0
    try:
        code, out = _pty_session(daemon, ["attach", name], [
            b"tty; stty size; echo $((6*7))\r",
            b"exit 3\r",
        ], prompt=b"@agentkernel:")
        text = out.decode(errors="replace")
        assert "/dev/pts/" in text
        assert "33 101" in text  # the window size came through
        assert "42" in text
        assert code == 3, text
        code, out = _pty_session(daemon, ["exec", "-t", "-i", name, "--", "sh", "-c",
                                          "read x; echo got:$x; test -t 0"], [b"abc\r"])
        assert code == 0 and b"got:abc" in out
    finally:
        daemon.ak("remove", name)


def test_socket_api_detached_logs_files_snapshots(daemon: Daemon) -> None:
    """The manager's other operations, as the HTTP layer reaches them, over the socket."""
    daemon.ensure_up()
    name = f"api-{secrets.token_hex(3)}"
    with daemon.use():
        from agentkernel.ipc import client

        info = client.call("create", {"name": name, "image": "host", "backend": "namespaces",
                                      "env": {"A": "1"}})
        assert info["status"] == "running" and info["uuid"]
        assert client.call("get_by_uuid", {"uuid": info["uuid"]})["name"] == name
        det = client.call("exec_detached", {"name": name, "argv": [
            "sh", "-c", "echo $A; echo e >&2; sleep 0.3; echo late; exit 7"]})
        assert det["status"] == "running" and det["id"].startswith("cmd-")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            st = client.call("detached_status", {"name": name, "cmd_id": det["id"]})
            if st["status"] != "running":
                break
            time.sleep(0.05)
        assert st["status"] == "completed" and st["exit_code"] == 7
        out, err = client.call("detached_logs", {"name": name, "cmd_id": det["id"]})
        assert (out, err) == ("1\nlate\n", "e\n")
        long = client.call("exec_detached", {"name": name, "argv": ["sleep", "30"]})
        client.call("detached_kill", {"name": name, "cmd_id": long["id"]})
        st = client.call("detached_status", {"name": name, "cmd_id": long["id"]})
        assert st["status"] == "completed" and st["exit_code"] == 137
        assert len(client.call("detached_list", {"name": name})) == 2
        assert client.call("write_file", {"name": name, "path": "//root//w.txt",
                                          "data": "written"}) == 7
        assert client.call("read_file", {"name": name, "path": "/root/w.txt"}) == "written"
        with pytest.raises(client.DaemonError) as exc:
            client.call("read_file", {"name": name, "path": "/root/../etc/shadow"})
        assert exc.value.exit_code == 2
        new = client.call("extend", {"name": name, "seconds": 3600})
        assert new and client.call("get", {"name": name})["expires_at"] == new
        events = [e["type"] for e in client.call("logs", {"name": name})]
        assert "sandbox_created" in events and "file_written" in events
        snap = client.call("snapshot", {"name": name, "snapshot_name": f"{name}-s"})
        assert snap["sandbox"] == name and snap["backend"] == "namespaces"
        client.call("delete_file", {"name": name, "path": "/root/w.txt"})
        client.call("remove", {"name": name})
        restored = client.call("restore_snapshot", {"snapshot_name": f"{name}-s"})
        assert restored["name"] == name  # the original name was free again
        assert client.call("read_file", {"name": name, "path": "/root/w.txt"}) == "written"
        assert [s["name"] for s in client.call("snapshots")] == [f"{name}-s"]
        client.call("delete_snapshot", {"snapshot_name": f"{name}-s"})
        assert client.call("snapshots") == []
        backends = {b["backend"]: b for b in client.call("backends")}
        assert backends["namespaces"]["usable"] and backends["namespaces"]["capabilities"][
            "snapshots"]
        # A pooled run with no project dir (what the HTTP API does) uses the configured key.
        lines = client.open_stream("run", {"argv": ["echo", "api"], "image": "host",
                                           "profile": "moderate", "backend": "namespaces"},
                                   auto_start=False)
        assert lines is not None
        got: list[bytes] = []
        infos: list[dict[str, Any]] = []
        result = client.pump(lines, sink=lambda _s, d: got.append(d), on_started=infos.append)
        assert result["exit_code"] == 0 and b"".join(got) == b"api\n"
        assert infos[0]["pooled"] is True
        client.call("remove", {"name": name})


@pytest.mark.skipif(not Path("/usr/bin/runsc").exists() and not any(
    (Path(p) / "runsc").exists() for p in os.environ.get("PATH", "").split(":")),
    reason="runsc not installed")
def test_gvisor_persistent_sandbox(daemon: Daemon) -> None:
    name = f"gv-{secrets.token_hex(3)}"
    r = daemon.ak("create", name, "-i", "host", "-B", "gvisor", "-p", "restrictive")
    assert r.returncode == 0, r.stderr
    try:
        r = daemon.ak("exec", name, "--", "sh", "-c", "echo in-gvisor; exit 4")
        assert (r.returncode, r.stdout) == (4, "in-gvisor\n")
        if os.geteuid() == 0:  # its control dir is a host dir runsc's gofer writes as root
            r = daemon.ak("exec", name, "--", "sh", "-c",
                          "dd if=/dev/zero of=/.ak/ctl/fill bs=64k count=16 2>/dev/null; "
                          "ln -s / /.ak/ctl/link 2>/dev/null; echo done")
            assert r.stdout == "done\n", r.stderr
            ctl = daemon.run_dir / "sandboxes" / name / "ctl"
            assert sorted(p.name for p in ctl.iterdir()) == ["agent.sock"]
        r = daemon.ak("stop", name)
        assert r.returncode != 0 and "remove it instead" in r.stderr
    finally:
        assert daemon.ak("remove", name).returncode == 0


def test_our_client_talks_to_the_daemon_socket_by_default(daemon: Daemon) -> None:
    """`AgentKernel()` with no base URL reaches the local daemon's unix socket (starting the
    daemon if needed), not TCP: the same API the official SDKs speak."""
    with daemon.use():
        os.environ.pop("AGENTKERNEL_BASE_URL", None)
        from agentkernel import AgentKernel

        with AgentKernel() as c:
            assert c.health() == "ok"
            out = c.run(["sh", "-c", "echo hi; exit 3"])
            assert (out.output, out.exit_code) == ("hi\n", 3)
            name = f"uds-{os.getpid()}"
            with c.sandbox(name, image="host") as sb:
                assert sb.run(["echo", "in-sandbox"]).output == "in-sandbox\n"
        api = Path(daemon.env["AGENTKERNEL_RUNTIME_DIR"]) / "api.sock"
        assert stat.S_IMODE(api.stat().st_mode) == 0o600


HOT_PATH_MODULES = {
    "agentkernel", "agentkernel.__main__", "agentkernel.cli", "agentkernel.cli.fast",
    "agentkernel.cli.run", "agentkernel.cli.common", "agentkernel.ipc",
    "agentkernel.ipc.client", "agentkernel.ipc.wire", "agentkernel.context",
    "agentkernel.paths", "agentkernel.errors", "agentkernel.peercred"}


def test_run_through_the_daemon_stays_import_light(daemon: Daemon, tmp_path: Path) -> None:
    """A whole `run` through the daemon (flags included) loads none of the modules that
    cost the CLI's hot path milliseconds: not the planner, not typing, re, enum or json."""
    args = ["run", "-q", "-i", "host", "-B", "namespaces", "-p", "restrictive", "-e", "A=1",
            "--", "true"]
    assert daemon.ak(*args, cwd=tmp_path).returncode == 0  # the key's pool exists now
    out = subprocess.run([sys.executable, "-X", "importtime", str(LAUNCHER), *args],
                         cwd=tmp_path, env={**os.environ, **daemon.env}, capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    loaded = {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines()
              if line.startswith("import time:")}
    heavy = {"typing", "re", "enum", "json", "socket", "contextlib", "functools",
             "collections", "threading", "agentkernel.engine",
             "agentkernel.profiles", "agentkernel.config", "agentkernel.backends",
             "agentkernel.planner", "agentkernel.images"}
    assert not loaded & heavy, sorted(loaded & heavy)
    # The budget (docs/architecture.md): the entry, the fast path, the run command and
    # what it shares with the others, the socket client and codec, and three leaves.
    ours = {m for m in loaded if m == "agentkernel" or m.startswith("agentkernel.")}
    assert ours <= HOT_PATH_MODULES, sorted(ours - HOT_PATH_MODULES)


def test_fast_exit_keeps_output_and_exit_code(daemon: Daemon, tmp_path: Path) -> None:
    """The CLI skips the interpreter's teardown (os._exit) after a run through the daemon:
    output the sandbox wrote into a pipe arrives whole, in order, and the exit code is the
    command's, through both the installed launcher and `python -m agentkernel`."""
    script = ("head -c 300000 /dev/zero | tr '\\0' x; echo; echo err-tail >&2; "
              "printf last; exit 7")
    args = ["run", "-q", "-i", "host", "-B", "namespaces", "--", "sh", "-c", script]
    for entry in (["-m", "agentkernel"], [str(LAUNCHER)]):
        argv = [sys.executable, *entry, *args]
        out = subprocess.run(argv, cwd=tmp_path, env={**os.environ, **daemon.env},
                             capture_output=True, timeout=60, check=False)
        assert out.returncode == 7, out.stderr[-500:]
        assert out.stdout == b"x" * 300000 + b"\nlast"
        assert out.stderr.endswith(b"err-tail\n"), out.stderr[-500:]


def test_a_project_cannot_pick_a_backend_weaker_than_auto(daemon: Daemon,
                                                         tmp_path: Path) -> None:
    """A cloned repository's `backend = "docker"` (below every backend `auto` picks) where
    the user names none: auto's pick runs the command, one line says why, through the
    daemon and in-process; a stronger one (gVisor, where auto picks namespaces) applies."""
    from agentkernel.backends import backend_class, choose

    daemon.ensure_up()
    auto = choose("auto").backend
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "agentkernel.toml").write_text('[sandbox]\nbackend = "docker"\n')
    config_home = {"XDG_CONFIG_HOME": str(tmp_path / "config")}  # the user names none
    for via in ("daemon", "in-process"):
        env = {**config_home, **({"AGENTKERNEL_NO_DAEMON": "1"} if via == "in-process" else {})}
        r = daemon.ak("run", "-i", "host", "--json", "--", "true", cwd=proj, env=env)
        assert r.returncode == 0, (via, r.stderr)
        assert json.loads(r.stdout)["backend"] == auto.name, (via, r.stdout)
        assert r.stderr.count('[sandbox] backend "docker" ignored') == 1, (via, r.stderr)
        assert f"weaker than {auto.name}" in r.stderr, (via, r.stderr)
    if auto.strength < backend_class("gvisor").strength and backend_available("gvisor"):
        (proj / "agentkernel.toml").write_text('[sandbox]\nbackend = "gvisor"\n')
        r = daemon.ak("run", "-i", "host", "--json", "--", "true", cwd=proj, env=config_home)
        assert json.loads(r.stdout)["backend"] == "gvisor", r.stderr
        assert "[sandbox] backend" not in r.stderr, r.stderr
