"""Outside review: a relative PATH entry never makes the project's files host helpers.

A PATH with an empty entry (`export PATH=$EXTRA:$PATH` with EXTRA unset), `.` or any
relative dir names the current directory, which for `agentkernel run` is the project: a
cloned repository's. Our helpers are found on PATH (`paths.which`, and bare argv for
execvp): with such a PATH, the repository's `./unshare`, `./nsenter`, `./ip`, `./runsc`
ran on the host as the caller, root for root (Go refuses the same since 1.19: ErrDot).
Each fake here notes that it ran, then runs the real tool, so the run itself still works.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from sandbox_helpers import ak, ak_as_user, backend_available, nobody_home

TOOLS = ("bwrap", "runsc", "unshare", "nsenter", "ip")


def _plant(project: Path, marker: Path, tools: tuple[str, ...]) -> None:
    for tool in tools:
        real = shutil.which(tool)
        if real is None:
            continue
        fake = project / tool
        fake.write_text(f'#!/bin/sh\necho "$0 $(id -u)" >> {marker}\nexec {real} "$@"\n')
        fake.chmod(0o755)


@pytest.mark.parametrize("backend", ["namespaces", "gvisor"])
@pytest.mark.parametrize("path", [":{}", "bin:{}"])
def test_the_projects_tools_never_run_on_the_host(tmp_path: Path, backend: str,
                                                  path: str) -> None:
    if not backend_available(backend):
        pytest.skip(f"{backend} is not installed")
    project, marker = tmp_path / "repo", tmp_path / "ran"
    project.mkdir()
    _plant(project, marker, TOOLS)
    (project / "bin").symlink_to(".")
    r = ak("run", "-B", backend, "-i", "host", "--", "echo", "inside", cwd=project,
           env={"PATH": path.format(os.environ.get("PATH", os.defpath)),
                "AGENTKERNEL_NO_DAEMON": "1", "HOME": str(tmp_path)})
    assert not marker.exists(), f"ran on the host: {marker.read_text()}"
    assert r.returncode == 0 and r.stdout == "inside\n", r.stderr


def test_the_projects_tools_never_run_as_nobody() -> None:
    if not backend_available("namespaces"):
        pytest.skip("bwrap is not installed")
    with nobody_home() as home:
        project, marker = home / "project", home / "ran"
        # (not unshare: the harness itself starts `unshare` from this PATH and dir)
        _plant(project, marker, ("bwrap", "nsenter", "ip"))
        for path in project.iterdir():
            os.chown(path, 65534, 65534)
        proc = ak_as_user(65534, home, "run", "-B", "namespaces", "-i", "host", "--",
                          "echo", "inside", cwd=project,
                          env={"PATH": ":" + os.environ.get("PATH", os.defpath)})
        out, err = proc.communicate(timeout=150)
        assert not marker.exists(), f"ran on the host: {marker.read_text()}"
        assert proc.returncode == 0 and out == "inside\n", err
