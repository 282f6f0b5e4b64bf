"""Outside review, round 4: a container sandbox's project changes are bounded.

On docker and podman a copy-on-write project's upper dir was a host dir: the scratch dir
under the runtime dir for a one-shot run (`/run/agentkernel`, RAM where `/run` is a tmpfs),
with no size: 200 MB into `/workspace` past a 128 MiB cap landed on the host. The upper is
now a tmpfs of the cap where the engine mounts the overlay (backends/container_upper.py),
detached once the container runs (its overlay keeps it). As an ordinary user (rootless
Podman): tests/test_containers.py::test_rootless_podman_workspace_writes_stop_at_the_cap.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from sandbox_helpers import ak, backend_available, container_ready


@pytest.fixture(params=["docker", "podman"])
def engine(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if not backend_available(name):
        pytest.skip(f"needs {name}")
    container_ready(request, name)
    return name


def _upper_mounts() -> list[str]:
    """tmpfs mounts of ours left on the host (a one-shot sandbox's upper, `ws`)."""
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if "/sandboxes/" in line and "/ws " in line]


def test_container_workspace_writes_stop_at_the_cap(engine: str, project: Path) -> None:
    before = _upper_mounts()
    r = ak("run", "-B", engine, "-p", "moderate", "-m", "128m", "--", "sh", "-c",
           "head -c 200M /dev/zero > /workspace/fill; echo ws=$?; "
           "echo small > /workspace/small; cat /workspace/small", cwd=project, timeout=180,
           env={"AGENTKERNEL_NO_DAEMON": "1"})
    assert "ws=" in r.stdout or "out of memory" in r.stderr, (r.stdout, r.stderr)
    assert "ws=0" not in r.stdout, (r.stdout, r.stderr)
    assert not (project / "fill").exists()
    assert _upper_mounts() == before  # detached once the engine had the overlay
    # Podman's API service we start runs in /, not in the caller's project: conmon drops
    # an `oom` file into its working dir when the container's OOM killer acts.
    assert not (project / "oom").exists()
    pidfile = Path(os.environ.get("AGENTKERNEL_RUNTIME_DIR", "/nonexistent")) / "podman.pid"
    if engine == "podman" and pidfile.exists():
        with contextlib.suppress(OSError):
            assert os.readlink(f"/proc/{pidfile.read_text().strip()}/cwd") == "/"


def test_container_workspace_still_copy_on_write(engine: str, project: Path) -> None:
    """Below the cap the project is written as before, and the host's stays untouched."""
    (project / "keep.txt").write_text("original\n")
    r = ak("run", "-q", "-B", engine, "-p", "moderate", "--", "sh", "-c",
           "echo changed > /workspace/keep.txt; head -c 1M /dev/zero > /workspace/one; "
           "cat /workspace/keep.txt; wc -c < /workspace/one", cwd=project, timeout=180,
           env={"AGENTKERNEL_NO_DAEMON": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["changed", "1048576"], r.stdout
    assert (project / "keep.txt").read_text() == "original\n"
    assert not (project / "one").exists()
