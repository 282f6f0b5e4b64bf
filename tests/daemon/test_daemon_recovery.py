"""Recoverable state (issue 9, R1 and R8): daemons of different data dirs never touch each
other's cgroups; a damaged or truncated state.db, or a full data dir, leaves nothing
running that the daemon cannot manage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_helpers import Result, ak

NAMESPACES = ["-i", "host", "-B", "namespaces"]
QUIET_POOL = "[daemon]\nadhoc_min = 0\npools = []\nreaper_interval = 0.2\n"


class Private:
    """A daemon of its own: data dir, runtime dir, config."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        (root / "daemon.toml").write_text(QUIET_POOL)
        self.root = root
        self.env = {"AGENTKERNEL_HOME": str(root / "home"),
                    "AGENTKERNEL_RUNTIME_DIR": str(root / "run"),
                    "AGENTKERNEL_DAEMON_CONFIG": str(root / "daemon.toml")}

    @property
    def db(self) -> Path:
        return self.root / "home" / "state.db"

    def ak(self, *args: str, timeout: float = 120) -> Result:
        return ak(*args, cwd=self.root, env=self.env, timeout=timeout)

    def ok(self, *args: str) -> str:
        r = self.ak(*args)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r.stdout

    def pid(self) -> int:
        return int((self.root / "run" / "daemon.pid").read_text())

    def listing(self) -> dict[str, str]:
        return {row["name"]: row["status"] for row in json.loads(self.ok("list", "--json"))}

    def scope(self) -> str:
        out = subprocess.run(
            [sys.executable, "-c", "from agentkernel.cgroups import scope; print(scope())"],
            env={**os.environ, **self.env}, capture_output=True, text=True, check=True)
        return out.stdout.strip()

    def teardown(self) -> None:
        r = self.ak("list", "--json")
        if r.returncode == 0:
            for row in json.loads(r.stdout or "[]"):
                self.ak("remove", row["name"])
        self.ak("daemon", "stop")


@pytest.fixture
def make(tmp_path: Path) -> Iterator[list[Private]]:
    if shutil.which("bwrap") is None:
        pytest.skip("needs bubblewrap")
    made: list[Private] = []
    yield made
    for daemon in made:
        daemon.teardown()


def _new(made: list[Private], root: Path) -> Private:
    d = Private(root)
    made.append(d)
    d.ok("daemon", "start")
    return d


def _group_dirs(name_glob: str) -> list[Path]:
    return [p for p in Path("/sys/fs/cgroup").glob(f"**/agentkernel/{name_glob}") if p.is_dir()]


# ---------------------------------------------------------------- R1: cgroup names


def test_two_daemons_both_run_web(make: list[Private], tmp_path: Path) -> None:
    a = _new(make, tmp_path / "a")
    b = _new(make, tmp_path / "b")
    a.ok("create", "web", *NAMESPACES)
    b.ok("create", "web", *NAMESPACES)  # used to destroy a's `web` as "left over"
    for d in (a, b):
        assert d.listing() == {"web": "running"}
        assert d.ok("exec", "web", "--", "echo", "alive").strip() == "alive"
    if os.geteuid() == 0 and _group_dirs("web.*"):
        mine = {p.name for p in _group_dirs("web.*")}
        assert {f"web.{a.scope()}", f"web.{b.scope()}"} <= mine
    b.ok("remove", "web")
    assert a.ok("exec", "web", "--", "echo", "still").strip() == "still"


def test_a_group_with_processes_is_never_destroyed_on_a_guess(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from agentkernel import cgroups
    from agentkernel.cgroups import Cgroup, Limits
    from agentkernel.errors import SandboxError

    if os.geteuid() != 0 or not cgroups.detect().usable:
        pytest.skip("needs root and a writable cgroup")
    monkeypatch.setenv("AGENTKERNEL_HOME", str(tmp_path / "home"))
    first = Cgroup.create("guess", Limits(pids=64))
    assert first is not None
    proc = subprocess.Popen(["sleep", "300"], preexec_fn=first.join_fn())
    try:
        with pytest.raises(SandboxError, match="has running processes"):
            Cgroup.create("guess", Limits(pids=64))
        assert proc.poll() is None  # still running, its group still there
        assert all(d.is_dir() for d in first.dirs)
    finally:
        proc.kill()
        proc.wait()
        first.destroy()
    # An empty one (its processes are gone) is cleared and made again.
    stale = Cgroup.create("guess", Limits(pids=64))
    assert stale is not None
    again = Cgroup.create("guess", Limits(pids=64))
    assert again is not None
    again.destroy()


# ---------------------------------------------------------------- R8: damaged state.db


def _damage(db: Path, how: str) -> None:
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    if how == "garbage":
        db.write_bytes(os.urandom(db.stat().st_size or 8192))
    elif how == "truncated":
        with open(db, "r+b") as f:
            f.truncate(db.stat().st_size // 2)
    else:  # emptied
        db.write_bytes(b"")


@pytest.mark.parametrize("backup", ["backup", "no-backup"])
@pytest.mark.parametrize("how", ["garbage", "truncated", "emptied"])
def test_damaged_state_db_while_a_sandbox_runs(make: list[Private], tmp_path: Path, how: str,
                                               backup: str) -> None:
    d = _new(make, tmp_path / "d")
    d.ok("create", "keep", *NAMESPACES)
    d.ok("exec", "keep", "--", "sh", "-c", "echo kept > /root/mark")
    d.ok("create", "idle", *NAMESPACES)
    d.ok("stop", "idle")
    d.ok("daemon", "stop")  # kept sandboxes run on without it
    _damage(d.db, how)
    if backup == "no-backup":
        (d.db.parent / "state.db.bak").unlink(missing_ok=True)
    start = d.ak("daemon", "start")
    assert start.returncode == 0, start.stderr
    assert d.listing() == {"keep": "running", "idle": "stopped"}
    assert d.ok("exec", "keep", "--", "cat", "/root/mark").strip() == "kept"
    d.ok("start", "idle")
    assert d.ok("exec", "idle", "--", "echo", "up").strip() == "up"
    d.ok("remove", "keep")
    d.ok("remove", "idle")
    assert d.listing() == {}
    log = (d.root / "home" / "daemon.log").read_text()
    if how != "emptied":
        assert list(d.db.parent.glob("state.db.damaged-*")), "the damaged file is kept aside"
        assert "state.db was damaged" in log, log
    if how == "emptied" or backup == "no-backup":
        assert "rebuilt the record of sandbox keep" in log, log


def test_damaged_after_a_crash(make: list[Private], tmp_path: Path) -> None:
    """kill -9 of the daemon (its WAL left behind), then garbage: re-adopted all the same."""
    d = _new(make, tmp_path / "k")
    d.ok("create", "crash", *NAMESPACES)
    os.kill(d.pid(), 9)
    time.sleep(0.5)
    _damage(d.db, "garbage")
    assert d.ak("daemon", "start").returncode == 0
    assert d.listing() == {"crash": "running"}
    assert d.ok("exec", "crash", "--", "echo", "ok").strip() == "ok"


# ---------------------------------------------------------------- R8: a full data dir


def test_full_data_dir_leaks_no_cgroup(make: list[Private], tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs as the data dir")
    d = Private(tmp_path / "full")
    home = d.root / "home"
    home.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(home)],
                   check=True)
    try:
        make.append(d)
        d.ok("daemon", "start")
        d.ok("run", "-q", *NAMESPACES, "-p", "restrictive", "--", "true")  # caches in place
        filler = home / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True,
                       check=False)
        for _ in range(4):
            # Fails ("database or disk is full") once the database cannot grow, and must
            # then leave nothing behind, whichever write failed.
            d.ak("run", "-q", *NAMESPACES, "-p", "restrictive", "--", "true")
        scope = d.scope()
        deadline = time.monotonic() + 15
        while _group_dirs(f"pool-*.{scope}") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _group_dirs(f"pool-*.{scope}"), "cgroups of destroyed pool sandboxes left"
        filler.unlink()
        d.ok("run", "-q", *NAMESPACES, "-p", "restrictive", "--", "true")
    finally:
        d.ak("daemon", "stop")
        subprocess.run(["umount", "-l", str(home)], check=False)
