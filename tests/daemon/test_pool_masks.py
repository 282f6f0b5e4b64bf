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
from sandbox_helpers import backend_available

BACKENDS = ["namespaces", pytest.param("gvisor", marks=pytest.mark.skipif(
    not backend_available("gvisor"), reason="runsc not available"))]


def _cat(daemon: Daemon, backend: str, project: Path, *paths: str) -> str:
    # (`echo /etc/*`, not ls: this host's runsc fails coreutils' stat flags)
    script = " ".join(f"cat {p} 2>/dev/null;" for p in paths) + " echo /etc/*; true"
    r = daemon.ak("run", "-i", "host", "-B", backend, "-p", "moderate", "--", "sh", "-c",
                  script, cwd=project)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_private_etc_entries_made_after_the_walk_are_masked(daemon: Daemon, tmp_path: Path,
                                                            backend: str) -> None:
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
        # Several runs: the walk is kept, the key warm.
        for _ in range(3):
            assert "PUBLIC-UNTIL-CHMOD" in _cat(daemon, backend, warm,
                                                f"{top}/later-private")
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
            out = _cat(daemon, backend, project, f"{top}/later-private",
                       f"{top}/new-key", f"{vault}/inner")
            assert "PUBLIC-UNTIL-CHMOD" not in out, project
            assert "NEW-SECRET" not in out
            assert top.name in out  # the dir itself (world-readable) is there, as on the host
    finally:
        shutil.rmtree(top)
