"""An agent's project at its own path: the target is checked strictly before any mount."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from agentkernel.backends.namespaces import build_bwrap_argv
from agentkernel.controlplane import control_masks, workspace_target
from agentkernel.errors import UsageError
from agentkernel.planner import same_path_target, sandbox_cwd
from agentkernel.profiles import get_profile
from agentkernel.rootfs import host_rootfs
from agentkernel.sandbox import SandboxSpec


@pytest.fixture
def outside_tmp() -> Path:
    """A dir outside every system dir (tmp_path is under /tmp, which is the sandbox's)."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="ak-samepath-", dir="/var/lib"))
    (base / "project").mkdir()
    yield base / "project"  # type: ignore[misc]
    shutil.rmtree(base, ignore_errors=True)


def test_a_plain_project_path_is_its_own_target(outside_tmp: Path) -> None:
    assert workspace_target(outside_tmp) == str(outside_tmp)


@pytest.mark.parametrize("path", [
    "/", "/etc", "/etc/ssh", "/usr/local", "/usr", "/lib64", "/lib", "/proc/self", "/sys",
    "/dev", "/tmp", "/run", "/var/run", "/var/tmp", "/root", "/home", "/var", "/boot",
])
def test_system_dirs_are_refused(path: str) -> None:
    if not os.path.isdir(path):
        pytest.skip(f"{path} not here")
    with pytest.raises(UsageError):
        workspace_target(Path(path))


def test_under_tmp_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="/tmp"):
        workspace_target(tmp_path)


@pytest.mark.parametrize("path", ["relative/dir", "/var/lib/../etc", "/var//lib", "/var/lib/",
                                  "/var/lib/a:b", "/var/lib/a,b", "/var/lib/a\nb"])
def test_malformed_paths_are_refused(path: str) -> None:
    with pytest.raises(UsageError):
        workspace_target(Path(path) if "\n" in path else path)  # type: ignore[arg-type]


def test_a_symlink_on_the_way_is_refused(outside_tmp: Path) -> None:
    link = outside_tmp.parent / "link"
    link.symlink_to("/etc")
    with pytest.raises(UsageError, match="symlink"):
        workspace_target(link)
    (outside_tmp / "real").mkdir()
    (outside_tmp.parent / "hop").symlink_to(outside_tmp)
    with pytest.raises(UsageError, match="symlink"):
        workspace_target(outside_tmp.parent / "hop" / "real")
    missing = outside_tmp / "gone"
    with pytest.raises(UsageError):
        workspace_target(missing)


def test_the_sandboxs_own_mounts_are_refused(outside_tmp: Path) -> None:
    inner = outside_tmp / "sub"
    inner.mkdir()
    for occupied in (str(outside_tmp), str(inner), str(outside_tmp.parent)):
        with pytest.raises(UsageError, match="overlap"):
            workspace_target(outside_tmp, (occupied,))
    assert workspace_target(outside_tmp, (str(outside_tmp) + "x",)) == str(outside_tmp)


def test_the_planner_falls_back_to_workspace_with_a_note(outside_tmp: Path) -> None:
    warnings: list[str] = []
    rootfs = host_rootfs()
    assert same_path_target("/etc", rootfs, None, (), warnings) == "/workspace"
    assert len(warnings) == 1 and "/workspace" in warnings[0] and "/etc" in warnings[0]
    # The agent's install and the mounted home count as the sandbox's own.
    binds = ((str(outside_tmp), str(outside_tmp)),)
    assert same_path_target(str(outside_tmp), rootfs, None, binds, warnings) == "/workspace"
    assert same_path_target(str(outside_tmp), rootfs, None, ()) == str(outside_tmp)
    with pytest.raises(UsageError):  # without a warnings list: refused (a kept sandbox)
        same_path_target("/usr/local", rootfs, None, ())
    assert sandbox_cwd(None, True, None, str(outside_tmp)) == str(outside_tmp)


def test_mounts_and_masks_follow_the_target(outside_tmp: Path) -> None:
    """The bwrap argv binds the project at its path; control masks (and the cow lower
    dir's) follow it; nothing lands at /workspace."""
    (outside_tmp / "state").mkdir()
    for mode in ("rw", "cow"):
        profile = get_profile("moderate").with_overrides(workspace=mode)  # type: ignore[arg-type]
        at = str(outside_tmp)
        masks = (f"{at}/state",)
        spec = SandboxSpec(name="t", profile=profile, rootfs=host_rootfs(), image="host",
                           workspace=outside_tmp, workspace_at=at, masks=masks)
        argv = build_bwrap_argv("bwrap", spec, "/agent", "/bpf", resolv=None, info_fd=-1)
        assert "/workspace" not in argv
        pairs = list(zip(argv, argv[1:], argv[2:], strict=False))
        if mode == "rw":
            assert ("--bind", str(outside_tmp), at) in pairs
        else:
            assert ("--dir", at) in itertools.pairwise(argv)
            assert "/run/ak/lower/workspace/state" in argv
        assert f"{at}/state" in argv


def test_control_masks_use_the_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "proj" / "data"
    data.mkdir(parents=True)
    monkeypatch.setenv("AGENTKERNEL_HOME", str(data))
    masks = control_masks(get_profile("moderate"), tmp_path / "proj", None, "/x/proj")
    assert "/x/proj/data" in masks and not any(m.startswith("/workspace") for m in masks)
