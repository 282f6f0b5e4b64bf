"""Outside review, round 4: a project file cannot raise the default disk quota.

A kept sandbox's writable layers sit on a disk of `[resources] disk` (10 GiB unless the
user says otherwise). A project file may lower a numeric cap, never raise it; but the guard
compared a project's `disk` with the user's own key only, and where the user had set none
(the usual case) found nothing to raise: a cloned repository's `disk = "40g"` (or any
number: `"unlimited"` alone was refused) gave every sandbox created from it that much of
the host's disk. Now the default quota is the cap a project may not exceed. Attacked with
a real kept sandbox through the daemon (root: the quota is a mounted disk of that size).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from agentkernel import config
from agentkernel.daemon import quota
from conftest import Daemon  # tests/daemon/

pytestmark = pytest.mark.skipif(not quota.can_mount(), reason="needs root with loop devices")

GIB = 1 << 30


def test_a_project_cannot_raise_the_default_disk_quota(daemon: Daemon, tmp_path: Path) -> None:
    project = tmp_path / "cloned"
    project.mkdir()
    (project / "agentkernel.toml").write_text('[resources]\ndisk = "40g"\n')
    name = f"box-disk-{secrets.token_hex(3)}"
    # No user config: XDG_CONFIG_HOME names an empty dir.
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    r = daemon.ak("create", name, "-i", "host", "-B", "namespaces", "-d", str(project),
                  cwd=project, env=env)
    try:
        assert r.returncode == 0, r.stderr
        r = daemon.ak("exec", name, "--", "stat", "-f", "-c", "%b %S", "/tmp")
        assert r.returncode == 0, (r.stdout, r.stderr)
        blocks, size = (int(x) for x in r.stdout.split())
        assert blocks * size <= config.DEFAULT_DISK_MB * (1 << 20), r.stdout
        image = quota.image_path(daemon.home / "sandboxes" / name)
        assert os.stat(image).st_size <= config.DEFAULT_DISK_MB * (1 << 20) + GIB
    finally:
        daemon.ak("remove", name)


def test_a_project_may_still_lower_it(tmp_path: Path) -> None:
    from agentkernel.config import effective_config

    project = tmp_path / "p"
    project.mkdir()
    (project / "agentkernel.toml").write_text('[resources]\ndisk = "2g"\n')
    eff = effective_config(project, {"XDG_CONFIG_HOME": str(tmp_path / "none")})
    assert eff.config.resources.disk == 2048 and not eff.warnings
    (project / "agentkernel.toml").write_text('[resources]\ndisk = "40g"\n')
    eff = effective_config(project, {"XDG_CONFIG_HOME": str(tmp_path / "none")})
    assert eff.config.resources.disk is None and eff.warnings
