"""The native `agentkernel` command against a real daemon and real sandboxes: the same
stdout, stderr and exit code as the Python CLI for the same command line (exit codes,
signals, timeouts, stdin, -q/-v, exec in a kept sandbox, run --agent), signals forwarded,
the fallbacks, and as an ordinary user."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Daemon
from native_cli_helpers import (
    NO_PYTHON,
    PY_CLI,
    ROOT,
    both,
    native_binary,
    normalized,
    on_a_terminal,
)
from sandbox_helpers import SYSTEM_PYTHON, ak, nobody_home, public_pythonpath

HOST = ["-i", "host", "-B", "namespaces"]
CLAUDE = ROOT / ".cache" / "agents-home" / "agents" / "claude"


@pytest.fixture(scope="module")
def native() -> Path:
    return native_binary()


def _same(native: Path, daemon: Daemon, args: list[str], cwd: Path,
          stdin: bytes | None = None, handled: bool = True) -> tuple[int, bytes, str]:
    env = {**os.environ, **daemon.env}
    py, nat = both(native, args, env, cwd, stdin=stdin, handled=handled)
    assert nat.code == py.code, (args, py, nat)
    assert nat.out == py.out, args
    assert normalized(nat.err) == normalized(py.err), args
    return py.code, py.out, py.err


def test_runs_match_the_python_cli(native: Path, daemon: Daemon, tmp_path: Path) -> None:
    daemon.ensure_up()
    (tmp_path / "f.txt").write_text("hi there\n")
    cases: list[tuple[list[str], int]] = [
        (["sh", "-c", "echo out; echo err >&2; exit 42"], 42),
        (["sh", "-c", "kill -TERM $$"], 128 + signal.SIGTERM),
        (["cat", "f.txt"], 0),
        (["no-such-command-xyz"], 127),
        (["/etc"], 126),
    ]
    for argv, code in cases:
        for flags in (["-v"], ["-q"], []):
            got, _, _ = _same(native, daemon, ["run", *flags, *HOST, "--", *argv], tmp_path)
            assert got == code, argv
    got, _, err = _same(native, daemon, ["run", *HOST, "-t", "1", "--", "sleep", "30"],
                        tmp_path)
    assert got == 124 and "timed out" in err, err
    data = bytes(range(256)) * 64
    got, out, _ = _same(native, daemon, ["run", "-q", *HOST, "--", "cat"], tmp_path,
                        stdin=data)
    assert got == 0 and out == data


def test_signals_are_forwarded(native: Path, daemon: Daemon, tmp_path: Path) -> None:
    daemon.ensure_up()
    script = "trap 'echo got $0; exit 7' INT TERM HUP QUIT; echo ready; sleep 30 & wait"
    env = {**os.environ, **daemon.env, "AGENTKERNEL_PYTHON": NO_PYTHON}
    for client in ([str(native)], PY_CLI):
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            proc = subprocess.Popen([*client, "run", "-q", *HOST, "--", "sh", "-c", script],
                                    cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n"
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=30)
            assert (proc.returncode, out) == (7, b"got sh\n"), (client, sig, err)


def test_exec_in_a_kept_sandbox(native: Path, daemon: Daemon, tmp_path: Path) -> None:
    daemon.ensure_up()
    r = daemon.ak("create", "box-native", *HOST, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    try:
        for args, stdin in ((["exec", "box-native", "--", "sh", "-c", "echo $X; exit 3"], None),
                            (["exec", "-e", "X=1", "box-native", "sh", "-c", "echo $X"], None),
                            (["exec", "-i", "box-native", "--", "cat"], b"in\x00put\n"),
                            (["exec", "no-such-box", "--", "true"], None)):
            _same(native, daemon, args, tmp_path, stdin=stdin)
        env = {**os.environ, **daemon.env}
        args = ["exec", "-t", "box-native", "--", "sh", "-c", "stty size; exit 3"]
        py = on_a_terminal([*PY_CLI, *args], env, tmp_path)
        nat = on_a_terminal([str(native), *args], {**env, "AGENTKERNEL_PYTHON": NO_PYTHON},
                            tmp_path)
        assert nat == py and py[0] == 3 and b"40 100" in py[1], (nat, py)
    finally:
        daemon.ak("remove", "box-native")


def test_fallbacks_match_the_python_cli(native: Path, daemon: Daemon, tmp_path: Path) -> None:
    """Unknown options, --json and a daemon of another data dir (WrongDaemon: the run is
    in-process) go to the Python CLI, which answers as it always did."""
    daemon.ensure_up()
    _same(native, daemon, ["run", "--bogus", "--", "true"], tmp_path, handled=False)
    env = {**os.environ, **daemon.env}
    py, nat = both(native, ["run", "--json", *HOST, "--", "echo", "x"], env, tmp_path,
                   handled=False)
    assert py.code == nat.code == 0 and b'"stdout": "x\\n"' in nat.out
    other = {**daemon.env, "AGENTKERNEL_HOME": str(tmp_path / "other"),
             "AGENTKERNEL_DAEMON_AUTOSTART": "0"}
    py, nat = both(native, ["run", "-q", *HOST, "--", "echo", "in-process"],
                   {**os.environ, **other}, tmp_path, handled=False)
    assert (py.code, py.out) == (nat.code, nat.out) == (0, b"in-process\n"), (py, nat)


def test_no_daemon_is_the_python_path(native: Path, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir(mode=0o700)
    env = {**os.environ, "AGENTKERNEL_HOME": str(tmp_path / "home"),
           "AGENTKERNEL_RUNTIME_DIR": str(tmp_path / "run"), "AGENTKERNEL_DAEMON_AUTOSTART": "0"}
    py, nat = both(native, ["run", *HOST, "--", "sh", "-c", "echo a; exit 4"], env, tmp_path,
                   handled=False)
    assert (py.code, py.out, py.err) == (nat.code, nat.out, nat.err) == (4, b"a\n", "")


@pytest.mark.skipif(not (CLAUDE / "node_modules" / ".bin" / "claude").exists(),
                    reason="scripts/install-agents.sh has not installed the agent CLIs")
def test_agent_version_matches_the_python_cli(native: Path, daemon: Daemon,
                                              tmp_path: Path) -> None:
    daemon.ensure_up()
    agents = daemon.home / "agents"  # the agent CLIs scripts/install-agents.sh installed
    if not agents.exists():
        agents.symlink_to(CLAUDE.parent)
    try:
        code, out, _ = _same(native, daemon, ["run", "--agent", "claude", "--", "--version"],
                             tmp_path)
        assert code == 0 and out.strip(), out
        _, _, said = _same(native, daemon, ["run", "-v", "--agent", "claude", "--", "--version"],
                           tmp_path)
        # `-v` says which backend and isolation the agent got, as the in-process run says.
        alone = ak("run", "-v", "--agent", "claude", "--", "--version", cwd=tmp_path,
                   env={**daemon.env, "AGENTKERNEL_NO_DAEMON": "1"})
        assert alone.returncode == 0, alone.stderr
        for kind in ("backend", "image", "profile"):
            line = [ln for ln in alone.stderr.splitlines()
                    if ln.startswith(f"agentkernel: {kind} ")]
            assert line and line[0] in said.splitlines(), (kind, alone.stderr, said)
        env = {**os.environ, **daemon.env}
        args = ["run", "--agent", "claude", "--", "--version"]  # on a terminal: a PTY
        py = on_a_terminal([*PY_CLI, *args], env, tmp_path)
        nat = on_a_terminal([str(native), *args], {**env, "AGENTKERNEL_PYTHON": NO_PYTHON},
                            tmp_path)
        assert nat == py and py[0] == 0 and py[2][0] == py[2][1], (nat, py)
    finally:
        agents.unlink()


def test_as_an_ordinary_user(native: Path) -> None:
    """As host nobody: a copy of the binary in a public dir, its fallback the system's
    Python with this checkout's sources; a daemon of nobody's; the same run both ways."""
    with nobody_home() as home:
        bindir = home / "bin"
        bindir.mkdir()
        shutil.copy(native, bindir / "agentkernel")
        for p in (bindir, bindir / "agentkernel"):
            os.chown(p, 65534, 65534)
            p.chmod(0o755)
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(home),
               "PYTHONPATH": public_pythonpath(), "AGENTKERNEL_HOME": str(home / "data"),
               "AGENTKERNEL_RUNTIME_DIR": str(home / "run"),
               "AGENTKERNEL_DAEMON_AUTOSTART": "0", "AGENTKERNEL_PYTHON": SYSTEM_PYTHON}
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]

        def run(*argv: str,
                extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*as_nobody, *argv], cwd=home / "project",
                                  env={**env, **(extra or {})}, capture_output=True, text=True,
                                  timeout=120, stdin=subprocess.DEVNULL, check=False)

        ak = str(bindir / "agentkernel")
        r = run(ak, "daemon", "start")  # through the fallback: Python
        assert r.returncode == 0, r.stderr
        try:
            line = ["run", "-v", *HOST, "--no-network", "--", "sh", "-c",
                    "id -u; echo err >&2; exit 5"]
            run(ak, *line)  # (the pool's first sandbox)
            nat = run(ak, *line, extra={"AGENTKERNEL_PYTHON": NO_PYTHON})
            py = run(SYSTEM_PYTHON, "-m", "agentkernel", *line)
            assert (nat.returncode, nat.stdout) == (py.returncode, py.stdout), (nat, py)
            assert normalized(nat.stderr) == normalized(py.stderr)
            assert nat.returncode == 5 and nat.stdout.strip() != "", nat
        finally:
            run(ak, "daemon", "stop")
            time.sleep(0.2)

