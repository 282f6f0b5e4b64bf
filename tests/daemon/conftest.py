"""Fixtures for the daemon tests: an isolated data/runtime dir, a daemon, a leak check."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sandbox_helpers import Result, ak

sys.path.insert(0, str(Path(__file__).parent))
from daemon_helpers import all_pids, cgroup_dirs, sandbox_processes

DAEMON_TOML = """
[daemon]
pool_min = 1
pool_max = 4
adhoc_min = 1
adhoc_idle_seconds = 30
reaper_interval = 0.2
pools = [{image = "host", profile = "moderate", backend = "namespaces"}]
"""


# Every sandbox the daemon tests name themselves starts with one of these.


@dataclass
class Daemon:
    """The isolated environment every daemon test talks to."""

    root: Path
    env: dict[str, str]

    @property
    def run_dir(self) -> Path:
        return Path(self.env["AGENTKERNEL_RUNTIME_DIR"])

    @property
    def home(self) -> Path:
        return Path(self.env["AGENTKERNEL_HOME"])

    def ak(self, *args: str, cwd: Path | None = None, input: bytes | None = None,
           timeout: float = 60, env: dict[str, str] | None = None) -> Result:
        return ak(*args, cwd=cwd or self.root, env={**self.env, **(env or {})}, input=input,
                  timeout=timeout)

    def pid(self) -> int | None:
        try:
            return int((self.run_dir / "daemon.pid").read_text())
        except (OSError, ValueError):
            return None

    def ensure_up(self) -> None:
        r = self.ak("daemon", "start")
        assert r.returncode == 0, r.stderr

    @contextlib.contextmanager
    def use(self) -> Iterator[None]:
        old = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            yield
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    if shutil.which("bwrap") is None:
        pytest.skip("the daemon tests need bubblewrap")
    root = tmp_path_factory.mktemp("akd")
    (root / "daemon.toml").write_text(DAEMON_TOML)
    env = {"AGENTKERNEL_HOME": str(root / "home"), "AGENTKERNEL_RUNTIME_DIR": str(root / "run"),
           "AGENTKERNEL_DAEMON_CONFIG": str(root / "daemon.toml")}
    (root / "run").mkdir(mode=0o700)
    before_pids = all_pids()
    before_cgroups = cgroup_dirs()
    d = Daemon(root, env)
    d.ensure_up()
    yield d
    # Tear everything down, then prove nothing of ours is left on the host.
    listing = d.ak("list", "--json")
    if listing.returncode == 0:
        import json

        for row in json.loads(listing.stdout or "[]"):
            d.ak("remove", row["name"])
    d.ak("daemon", "stop")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        leaked = {p for p in sandbox_processes(str(root)) if p[0] not in before_pids}
        if not leaked:
            break
        time.sleep(0.1)
    assert not leaked, f"processes left behind: {leaked}"
    # Other suites (other data dirs) may run sandboxes on this host meanwhile, with the same
    # names: only this data dir's groups count (their names end in its scope), the pool's
    # random-named ones included.
    from agentkernel.cgroups import _scope_of

    ours = "." + _scope_of(str(root / "home"))
    deadline = time.monotonic() + 10
    while (left := {c for c in cgroup_dirs() - before_cgroups
                    if Path(c).name.endswith(ours)}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"cgroups left behind: {sorted(left)}"
    import sqlite3

    db = sqlite3.connect(str(root / "home" / "state.db"))
    try:
        for table in ("ephemeral", "sandboxes"):
            rows = db.execute(f"SELECT name FROM {table}").fetchall()
            assert not rows, f"{table} still lists {rows}"
    finally:
        db.close()
    for sub in (root / "run" / "sandboxes", root / "home" / "sandboxes"):
        assert not sub.exists() or not any(sub.iterdir()), f"dirs left in {sub}"
    assert not (root / "run" / "daemon.sock").exists()
