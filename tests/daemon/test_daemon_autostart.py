"""`run` without a daemon starts one in the background; it serves the next runs from its warm
pool and stops by itself once unused, leaving nothing behind."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from sandbox_helpers import ak

RUN = ("run", "-v", "-i", "host", "-B", "namespaces", "-p", "restrictive", "--")


def _wait(cond: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")
def test_first_run_starts_a_daemon_that_serves_the_next_and_then_stops(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {"AGENTKERNEL_HOME": str(tmp_path / "home"), "AGENTKERNEL_RUNTIME_DIR": str(run_dir),
           "AGENTKERNEL_DAEMON_AUTOSTART": "1", "AGENTKERNEL_DAEMON_IDLE_EXIT": "3",
           "XDG_CONFIG_HOME": str(tmp_path / "config")}  # no user daemon config: no pools
    project = tmp_path / "project"
    project.mkdir()

    first = ak(*RUN, "echo", "one", cwd=project, env=env)
    assert first.returncode == 0 and first.stdout == "one\n", first.stderr
    assert "started the daemon in the background" in first.stderr
    assert "via daemon" not in first.stderr  # the first run itself ran in-process
    assert _wait(lambda: (run_dir / "daemon.sock").exists(), 30), "no daemon came up"
    pid = int((run_dir / "daemon.pid").read_text())

    second = ak(*RUN, "echo", "two", cwd=project, env=env)
    assert second.returncode == 0 and second.stdout == "two\n", second.stderr
    assert "via daemon" in second.stderr and "started the daemon" not in second.stderr

    quiet = ak("run", "-q", "-i", "host", "-B", "namespaces", "--", "true", cwd=project,
               env={**env, "AGENTKERNEL_DAEMON_AUTOSTART": "0", "AGENTKERNEL_NO_DAEMON": "1"})
    assert quiet.returncode == 0 and quiet.stderr == ""

    # Unused for 3 s and holding nothing of the user's: it stops and cleans up its pool.
    assert _wait(lambda: not _alive(pid), 30), "the daemon did not stop when idle"
    assert not (run_dir / "daemon.sock").exists()
    sandboxes = run_dir / "sandboxes"
    assert not sandboxes.exists() or not any(sandboxes.iterdir())
    assert "unused for 3 s: stopping" in (tmp_path / "home" / "daemon.log").read_text()
    # A minute has not passed since the last start: no new attempt (a daemon that cannot
    # start must not cost every run one).
    again = ak(*RUN, "true", cwd=project, env=env)
    assert again.returncode == 0 and "started the daemon" not in again.stderr
    assert not (run_dir / "daemon.sock").exists()


def test_a_kept_sandbox_keeps_an_idle_daemon_alive(tmp_path: Path) -> None:
    if shutil.which("bwrap") is None:
        pytest.skip("needs bubblewrap")
    run_dir = tmp_path / "run"
    env = {"AGENTKERNEL_HOME": str(tmp_path / "home"), "AGENTKERNEL_RUNTIME_DIR": str(run_dir),
           "XDG_CONFIG_HOME": str(tmp_path / "config")}
    run_dir.mkdir(mode=0o700)
    import subprocess
    import sys

    daemon = subprocess.Popen(
        [sys.executable, "-m", "agentkernel", "daemon", "start", "--foreground",
         "--idle-exit", "1"], env={**os.environ, **env}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert _wait(lambda: (run_dir / "daemon.sock").exists(), 30)
        made = ak("create", "keepme", "-i", "host", "-B", "namespaces", env=env)
        assert made.returncode == 0, made.stderr
        time.sleep(3)
        assert daemon.poll() is None, "an idle daemon stopped while it held a kept sandbox"
        assert ak("remove", "keepme", env=env).returncode == 0
        daemon.wait(timeout=30)  # now nothing holds it
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
