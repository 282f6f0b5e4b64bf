"""A project shown at its own host path (SandboxSpec.workspace_at), in real sandboxes.

`run --agent` and `create --agent` show the project where it is on the host. Each default
backend (namespaces, gVisor) is started as root with such a spec (rw and copy-on-write):
the project is there and nowhere else (no /workspace), writes land on the host only when
rw, a masked dir inside it (a control dir) stays hidden at the new path, and the target's
parents are the sandbox's own empty dirs, not the host's.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel.backends import Backend
from agentkernel.controlplane import workspace_target
from agentkernel.profiles import get_profile
from agentkernel.rootfs import host_rootfs
from agentkernel.sandbox import Sandbox, SandboxSpec
from sandbox_helpers import backend_available


@pytest.fixture
def project() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="ak-samepath-", dir="/var/lib"))
    proj = base / "project"
    (proj / "ctl").mkdir(parents=True)
    (proj / "ctl" / "daemon.sock").write_text("control plane\n")
    (proj / "hello.txt").write_text("hello\n")
    (base / "sibling-secret").write_text("not the project's\n")
    try:
        yield proj
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _backend(name: str) -> Backend:
    if not backend_available(name):
        pytest.skip(f"{name} backend unavailable here")
    if name == "gvisor":
        from agentkernel.backends.gvisor import GVisorBackend

        return GVisorBackend()
    from agentkernel.backends.namespaces import NamespacesBackend

    return NamespacesBackend()


def _sh(sandbox: Sandbox, script: str, cwd: str) -> str:
    out, err, _ = sandbox.client.exec(["sh", "-c", script], cwd=cwd).wait(60)
    return (out + err).decode(errors="replace")


@pytest.mark.parametrize("mode", ["rw", "cow"])
@pytest.mark.parametrize("backend", ["namespaces", "gvisor"])
def test_project_at_its_own_path(backend: str, mode: str, project: Path) -> None:
    at = workspace_target(project)
    spec = SandboxSpec(name=f"samepath-{backend[:4]}-{mode}",
                       # (no network: nothing here needs it, and it keeps the egress
                       # gate's start out of this test)
                       profile=get_profile("moderate").with_overrides(
                           workspace=mode, network=False),  # type: ignore[arg-type]
                       rootfs=host_rootfs(), image="host", workspace=project,
                       masks=(f"{at}/ctl",), workspace_at=at)
    sandbox = _backend(backend).start(spec)
    try:
        # (listings by python: ls's statx fails under gVisor on this kernel, any dir)
        out = _sh(sandbox, "pwd; cat hello.txt; python3 -c 'import os; print(len(os.listdir("
                  "\"ctl\")))'; echo new > made; test -e /workspace && echo has-workspace "
                  "|| echo no-workspace; python3 -c 'import os; print(*os.listdir(\"..\"))'; "
                  "cat ../sibling-secret 2>&1 || true", at)
    finally:
        sandbox.destroy()
    lines = out.splitlines()
    assert lines[:4] == [at, "hello", "0", "no-workspace"], out
    # The parent is the sandbox's own dir: only the project in it, no host sibling.
    assert lines[4].split() == ["project"], out
    assert "not the project's" not in out, out
    assert (project / "made").exists() == (mode == "rw"), out
    assert (project / "ctl" / "daemon.sock").read_text() == "control plane\n"
