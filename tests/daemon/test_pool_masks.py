"""A daemon's one-shot sandboxes take /etc's private entries from the daemon's kept walk
(rootfs_watch), not from a walk by each sandbox's agent: a change to /etc after the walk
must be masked in every run after it, also one its key's warm sandboxes would serve."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import pytest

from conftest import Daemon

HOST = ("-i", "host", "-B", "namespaces", "-p", "moderate")


def _cat(daemon: Daemon, project: Path, *paths: str) -> str:
    script = " ".join(f"cat {p} 2>/dev/null;" for p in paths) + " ls -A /etc; true"
    r = daemon.ak("run", *HOST, "--", "sh", "-c", script, cwd=project)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_private_etc_entries_made_after_the_walk_are_masked(daemon: Daemon,
                                                            tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("planting a secret in /etc needs root")
    daemon.ensure_up()
    top = Path("/etc") / f"ak-pool-{secrets.token_hex(4)}"
    top.mkdir(mode=0o755)
    try:
        (top / "later-private").write_text("PUBLIC-UNTIL-CHMOD\n")
        (top / "later-private").chmod(0o644)
        warm = tmp_path / "warm"
        warm.mkdir()
        # Several starts: the daemon walks once plainly, then once with its watches.
        for _ in range(3):
            assert "PUBLIC-UNTIL-CHMOD" in _cat(daemon, warm, f"{top}/later-private")
        # Now, with the walk kept: a new private file, a private dir, a mode change.
        (top / "later-private").chmod(0o600)
        (top / "new-key").write_text("NEW-SECRET-FILE\n")
        (top / "new-key").chmod(0o600)
        vault = top / "vault"
        vault.mkdir(mode=0o700)
        (vault / "inner").write_text("NEW-SECRET-DIR\n")
        (vault / "inner").chmod(0o644)
        # The same key (its warm sandboxes were made before the change: none of them may
        # serve), and another key (its sandboxes start after it).
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        for project in (warm, warm, fresh):
            out = _cat(daemon, project, f"{top}/later-private", f"{top}/new-key",
                       f"{vault}/inner")
            assert "PUBLIC-UNTIL-CHMOD" not in out, project
            assert "NEW-SECRET" not in out
            assert top.name in out  # the dir itself (world-readable) is there, as on the host
    finally:
        shutil.rmtree(top)
