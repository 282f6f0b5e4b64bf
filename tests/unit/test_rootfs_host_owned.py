"""Unit tier for rootfs.HostRootfs.host_owned: which host dirs a root-started sandbox gets
without id-mapping (the host's userland) and which it gets id-mapped (an image's tree)."""

from __future__ import annotations

from pathlib import Path

from agentkernel.rootfs import host_rootfs, tree_rootfs


def test_the_hosts_userland_dirs_are_never_id_mapped() -> None:
    rootfs = host_rootfs()
    dirs = {e.src for e in rootfs.entries if e.kind == "ro-bind"}
    assert dirs and rootfs.host_owned() == dirs
    assert "/usr" in dirs and "/etc" in dirs
    links = {e.path for e in rootfs.entries if e.kind == "symlink"}
    assert not links & rootfs.host_owned()


def test_an_images_tree_is_the_sandboxs_own(tmp_path: Path) -> None:
    (tmp_path / "usr").mkdir()
    (tmp_path / "etc").mkdir()
    (tmp_path / "bin").symlink_to("usr/bin")
    rootfs = tree_rootfs(tmp_path, "alpine:3.20")
    assert rootfs.entries and rootfs.host_owned() == frozenset()


def test_the_wasm_workers_host_dirs_are_never_id_mapped() -> None:
    """The review of this change: the worker's tree (the host's userland, its Python,
    wasmtime, our package) kept the id-mapping, its name not being "host"."""
    import pytest

    from agentkernel.errors import BackendUnavailable

    try:
        from agentkernel.backends.wasm import worker_rootfs

        rootfs = worker_rootfs()
    except BackendUnavailable:
        pytest.skip("wasmtime is not installed")
    dirs = {e.src for e in rootfs.entries if e.kind == "ro-bind"}
    assert dirs and rootfs.host_owned() == dirs
