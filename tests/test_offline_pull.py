"""Offline runs are quiet: a failed pull of the image is one short line (none with -q), and
it is remembered for a minute per user and registry settings instead of retried every run.

No registry is reachable from these machines, so this is the real offline case."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_helpers import ak

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")
RUN = ("run", "-B", "namespaces", "--")  # no --image: the default image, which is not stored


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    return {"AGENTKERNEL_HOME": str(tmp_path / "home"), "AGENTKERNEL_RUNTIME_DIR": str(run),
            "AGENTKERNEL_NO_DAEMON": "1", "XDG_CONFIG_HOME": str(tmp_path / "config")}


class Counter:
    """A TCP port that counts connections and hangs up: a mirror that never works."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.count = 0
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.count += 1
            conn.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()


@pytest.fixture
def mirror() -> Iterator[Counter]:
    counter = Counter()
    yield counter
    counter.close()


def test_fallback_note_is_one_short_line_and_q_silences_it(tmp_path: Path,
                                                          env: dict[str, str]) -> None:
    first = ak(*RUN, "cat", "/etc/os-release", cwd=tmp_path, env=env)
    assert first.returncode == 0 and "ID=" in first.stdout, first.stderr
    lines = first.stderr.splitlines()
    assert len(lines) == 1, first.stderr
    assert lines[0].startswith("agentkernel: warning: image alpine:3.20 unavailable (")
    assert "host's userland" in lines[0] and len(lines[0]) <= 160, lines[0]
    assert "HTTPSConnection" not in first.stderr  # no library internals
    quiet = ak("run", "-q", "-B", "namespaces", "--", "cat", "/etc/os-release", cwd=tmp_path,
               env=env)
    assert quiet.returncode == 0 and "ID=" in quiet.stdout  # it still falls back
    assert quiet.stderr == ""
    # Errors still print with -q.
    failed = ak("run", "-q", "-B", "namespaces", "--", "/nonexistent", cwd=tmp_path, env=env)
    assert failed.returncode == 127 and failed.stderr != ""


def test_failed_pull_is_remembered_per_settings(tmp_path: Path, env: dict[str, str],
                                                mirror: Counter) -> None:
    with_mirror = {**env, "AGENTKERNEL_REGISTRY_MIRROR": f"127.0.0.1:{mirror.port}"}
    first = ak(*RUN, "true", cwd=tmp_path, env=with_mirror)
    assert first.returncode == 0 and "unavailable" in first.stderr, first.stderr
    tried = mirror.count
    assert tried > 0, "the first run did not try the mirror"
    again = ak(*RUN, "true", cwd=tmp_path, env=with_mirror)
    assert again.returncode == 0 and "unavailable" in again.stderr
    assert mirror.count == tried, "a pull that failed seconds ago was tried again"

    # Other settings are another question: a run with another mirror tries at once.
    other = Counter()
    try:
        changed = ak(*RUN, "true", cwd=tmp_path,
                     env={**env, "AGENTKERNEL_REGISTRY_MIRROR": f"127.0.0.1:{other.port}"})
        assert changed.returncode == 0
        assert other.count > 0, "a different mirror was not tried"
    finally:
        other.close()

    # Once the minute is over, the same settings are tried again.
    memos = list(Path(env["AGENTKERNEL_HOME"], "cache").glob("pull-failed-*"))
    assert memos
    for memo in memos:
        reason = memo.read_text().split("\n", 1)[1]
        memo.write_text(f"{time.time() - 61}\n{reason}")
    later = ak(*RUN, "true", cwd=tmp_path, env=with_mirror)
    assert later.returncode == 0
    assert mirror.count > tried, "an expired failure was not tried again"


def test_offline_fallback_none_still_fails_every_time(tmp_path: Path,
                                                     env: dict[str, str]) -> None:
    """The memory only spares retries of a fallback; an error is a real attempt each time."""
    (tmp_path / "agentkernel.toml").write_text('[images]\noffline_fallback = "none"\n')
    for _ in range(2):
        r = ak(*RUN, "true", cwd=tmp_path, env=env)
        assert r.returncode == 125 and "cannot pull" in r.stderr, r.stderr
