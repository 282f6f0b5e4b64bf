"""The path every newcomer takes: no flags, backend `auto`, the daemon autostarted, a fresh
data dir and project. What the README shows must work exactly like this."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_helpers import Result, ak

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")


class Newcomer:
    """A fresh user: own data and runtime dirs, no user config, autostart on (the default)."""

    def __init__(self, root: Path) -> None:
        run = root / "run"
        run.mkdir(mode=0o700)
        self.run_dir = run
        self.project = root / "project"
        self.project.mkdir()
        self.env = {"AGENTKERNEL_HOME": str(root / "home"), "AGENTKERNEL_RUNTIME_DIR": str(run),
                    "AGENTKERNEL_DAEMON_AUTOSTART": "1", "AGENTKERNEL_DAEMON_IDLE_EXIT": "120",
                    "XDG_CONFIG_HOME": str(root / "config")}

    def ak(self, *args: str, timeout: float = 120) -> Result:
        return ak(*args, cwd=self.project, env=self.env, timeout=timeout)

    def wait_daemon(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.run_dir / "daemon.sock").exists():
                return
            time.sleep(0.1)
        raise AssertionError("no daemon came up")


@pytest.fixture
def newcomer(tmp_path: Path) -> Iterator[Newcomer]:
    user = Newcomer(tmp_path)
    yield user
    user.ak("daemon", "stop", timeout=90)


def test_run_ls_root_prints_the_listing(newcomer: Newcomer) -> None:
    """`agentkernel run -- ls /`: coreutils stat the root; a backend that breaks that (this
    host's gVisor) is not picked by `auto`."""
    first = newcomer.ak("run", "--", "ls", "/")
    assert first.returncode == 0, first.stderr
    assert "usr" in first.stdout.split(), first.stderr
    assert "Invalid argument" not in first.stderr
    newcomer.wait_daemon()
    # The next run goes through the daemon it started: the same backend, the same answer.
    second = newcomer.ak("run", "-v", "--", "ls", "/")
    assert second.returncode == 0 and "usr" in second.stdout.split(), second.stderr
    assert "via daemon" in second.stderr
    doctor = newcomer.ak("doctor")
    picked = doctor.stdout.split("`--backend auto` picks: ")[1].split()[0]
    assert f"backend {picked}:" in second.stderr, (doctor.stdout, second.stderr)


def test_offline_default_image_is_one_line_and_q_is_quiet(newcomer: Newcomer) -> None:
    """No registry here: the default image falls back to the host's userland with one short
    line, in-process and through the daemon alike, and `-q` prints nothing."""
    first = newcomer.ak("run", "--", "true")
    assert first.returncode == 0, first.stderr
    notes = [ln for ln in first.stderr.splitlines() if "unavailable" in ln]
    assert len(notes) == 1 and len(notes[0]) <= 160, first.stderr
    newcomer.wait_daemon()
    via = newcomer.ak("run", "--", "true")
    assert via.returncode == 0 and via.stderr.splitlines() == notes, via.stderr
    quiet = newcomer.ak("run", "-q", "--", "true")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
