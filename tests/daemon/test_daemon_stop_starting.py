"""`daemon stop` right after a `run` that started the daemon in the background (it takes a
second or two to come up): it waits for that daemon and stops it, instead of saying "not
running" and leaving it to come up afterwards. As root and as an ordinary user (nobody)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from sandbox_helpers import SYSTEM_PYTHON, public_pythonpath

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _daemons(run_dir: Path) -> list[int]:
    """Live processes running `agentkernel daemon start` for this runtime dir."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if b"daemon" in argv and b"start" in argv and str(run_dir).encode() in env \
                and _alive(int(entry.name)):
            out.append(int(entry.name))
    return out


def _check(cli: list[str], base: Path, env: dict[str, str], cwd: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], env=env, cwd=cwd, capture_output=True,
                              text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)

    first = run("run", "-q", "-i", "host", "-B", "namespaces", "-p", "restrictive", "--",
                "true")
    assert first.returncode == 0, first.stderr
    stop = run("daemon", "stop")  # at once: the daemon is still on its way up
    assert stop.returncode == 0 and "Daemon stopped." in stop.stdout, (stop.stdout,
                                                                     stop.stderr)
    run_dir = Path(env["AGENTKERNEL_RUNTIME_DIR"])
    # Nothing comes up after the stop (a start still under way would have by now: it
    # takes about a second here).
    time.sleep(3)
    assert _daemons(run_dir) == []
    assert not (run_dir / "daemon.sock").exists()
    again = run("daemon", "stop")
    assert again.returncode != 0 and "not running" in again.stderr


def test_stop_waits_for_an_autostarted_daemon(tmp_path: Path) -> None:
    env = {**os.environ, "AGENTKERNEL_HOME": str(tmp_path / "home"),
           "AGENTKERNEL_RUNTIME_DIR": str(tmp_path / "run"),
           "AGENTKERNEL_DAEMON_AUTOSTART": "1", "XDG_CONFIG_HOME": str(tmp_path / "config")}
    env.pop("AGENTKERNEL_NO_DAEMON", None)
    project = tmp_path / "project"
    project.mkdir()
    import sys

    try:
        _check([sys.executable, "-m", "agentkernel"], tmp_path, env, project)
    finally:
        for pid in _daemons(tmp_path / "run"):
            os.kill(pid, 9)  # (a failed check's leftover: ours, by its pid)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root (to become nobody) and setpriv")
def test_stop_waits_for_an_autostarted_daemon_as_nobody() -> None:
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="ak-stop-", dir="/tmp"))
    try:
        base.chmod(0o755)
        for d in ("home", "run", "config", "project"):
            (base / d).mkdir(mode=0o700)
            os.chown(base / d, 65534, 65534)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(base / "home"),
               "PYTHONPATH": public_pythonpath(), "AGENTKERNEL_HOME": str(base / "home"),
               "AGENTKERNEL_RUNTIME_DIR": str(base / "run"),
               "AGENTKERNEL_DAEMON_AUTOSTART": "1", "XDG_CONFIG_HOME": str(base / "config")}
        cli = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
               SYSTEM_PYTHON, "-m", "agentkernel"]
        _check(cli, base, env, base / "project")
    finally:
        for pid in _daemons(base / "run"):
            os.kill(pid, 9)  # (a failed check's leftover: ours, by its pid)
        shutil.rmtree(base, ignore_errors=True)
