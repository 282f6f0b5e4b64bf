"""rootfs_watch: the cached walk for private entries is never stale — every change that
could turn a readable entry into a hidden one (or back) is seen by the kernel's events,
including a mode changed through a hard link elsewhere and a mount over a walked dir."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel import rootfs_watch
from agentkernel.rootfs import HostRootfs


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "etc"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "conf").write_text("x")
    (root / "pub").write_text("x")
    tmp_path.chmod(0o755)
    rootfs_watch.forget()
    yield root
    rootfs_watch.forget()


def masks(root: Path) -> list[str]:
    """The cached answer, checked against a fresh walk every time."""
    rootfs = HostRootfs((), (), private_dirs=(str(root),))
    got = [m.path.removeprefix(str(root)) for m in rootfs_watch.private_masks(rootfs)]
    assert got == [m.path.removeprefix(str(root)) for m in rootfs.private_masks()]
    return got


def cached(root: Path) -> bool:
    return any(hit.dirs == (str(root),) for hit in rootfs_watch._cache.values())


def test_changes_are_seen(tree: Path, tmp_path: Path) -> None:
    assert masks(tree) == [] and not cached(tree)  # a one-start process keeps nothing
    assert masks(tree) == [] and cached(tree)
    (tree / "a" / "b" / "conf").chmod(0o600)  # in place: only the file's own inode knows
    assert masks(tree) == ["/a/b/conf"]
    (tree / "a" / "b" / "conf").chmod(0o644)
    assert masks(tree) == []
    (tree / "a" / "new").write_text("x")
    (tree / "a" / "new").chmod(0o640)
    assert masks(tree) == ["/a/new"]
    (tree / "a" / "new").rename(tree / "a" / "b" / "moved")
    assert masks(tree) == ["/a/b/moved"]
    (tree / "a" / "b").chmod(0o700)  # a dir made private: hidden whole
    assert masks(tree) == ["/a/b"]
    (tree / "a" / "b").chmod(0o755)
    other = tmp_path / "elsewhere"
    os.link(tree / "pub", other)
    assert masks(tree) == ["/a/b/moved"]
    other.chmod(0o600)  # through another name: nothing in the walked dirs changed
    assert masks(tree) == ["/a/b/moved", "/pub"]


def test_unchanged_is_reused(tree: Path) -> None:
    masks(tree)
    masks(tree)
    hit = next(iter(rootfs_watch._cache.values()))
    (tree / "a" / "b" / "conf").read_text()  # reads change nothing
    masks(tree)
    assert next(iter(rootfs_watch._cache.values())) is hit


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")
def test_mounts_are_seen(tree: Path, tmp_path: Path) -> None:
    masks(tree)
    masks(tree)
    hit = next(iter(rootfs_watch._cache.values()))
    elsewhere = tmp_path / "mnt"
    elsewhere.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(elsewhere)], check=True)
    try:
        assert masks(tree) == []  # a mount elsewhere: the walk still holds
        assert next(iter(rootfs_watch._cache.values())) is hit
    finally:
        subprocess.run(["umount", str(elsewhere)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=700", "tmpfs", str(tree / "a")],
                   check=True)
    try:
        assert masks(tree) == ["/a"]  # mounted over a walked dir: what is there now
    finally:
        subprocess.run(["umount", str(tree / "a")], check=True)
    assert masks(tree) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")
def test_mounts_beyond_the_first_page_are_seen(tree: Path, tmp_path: Path) -> None:
    """/proc/self/mountinfo answers one read with about a page: a mount listed after the
    first page of a big table must count as well."""
    fillers = [tmp_path / f"filler-{'x' * 60}-{i}" for i in range(80)]
    for path in fillers:
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(path)], check=True)
    try:
        assert len(Path("/proc/self/mountinfo").read_bytes()) > 8192
        masks(tree)
        masks(tree)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=700", "tmpfs", str(tree / "a")],
                       check=True)
        try:
            assert masks(tree) == ["/a"]  # listed last, pages after the first
        finally:
            subprocess.run(["umount", str(tree / "a")], check=True)
    finally:
        for path in fillers:
            subprocess.run(["umount", str(path)], check=False)


def test_kept_masks_watches_from_the_first_call(tree: Path) -> None:
    rootfs = HostRootfs((), (), private_dirs=(str(tree),))
    assert rootfs_watch.kept_masks(rootfs) == () and cached(tree)  # a daemon: kept at once
    (tree / "a" / "key").write_text("x")
    (tree / "a" / "key").chmod(0o600)
    got = rootfs_watch.kept_masks(rootfs)
    assert got is not None and [m.path for m in got] == [str(tree / "a" / "key")]
    assert got == rootfs.private_masks()


def test_a_changed_fixed_mask_list_drops_the_old_walk(tree: Path) -> None:
    """A credential path appearing changes the fixed masks, so the key: the walk kept under
    the old list (an inotify fd watching every entry) is closed, not kept for good."""
    from agentkernel.rootfs import Mask

    before = HostRootfs((), (), private_dirs=(str(tree),))
    after = HostRootfs((), (Mask("/etc/credstore", True),), private_dirs=(str(tree),))
    def inotify_fds() -> int:
        return sum(os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
                   for fd in os.listdir("/proc/self/fd") if fd.isdigit()
                   and os.path.exists(f"/proc/self/fd/{fd}"))

    held = inotify_fds()
    assert rootfs_watch.kept_masks(before) == ()
    assert inotify_fds() == held + 1
    assert rootfs_watch.kept_masks(after) == after.masks
    assert list(rootfs_watch._cache) == [(after.private_dirs, after.masks)]
    assert inotify_fds() == held + 1  # the old walk's closed


def test_kept_masks_is_none_where_the_walk_cannot_be_watched(
        tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No watch left for this user: None (the caller's own walk, the agent's, serves), and
    no walk per call for a while after."""
    rootfs = HostRootfs((), (), private_dirs=(str(tree),))
    starts = []

    def refuse(_rootfs: HostRootfs) -> None:
        starts.append(1)
        return None

    monkeypatch.setattr(rootfs_watch._Watched, "start", staticmethod(refuse))
    assert rootfs_watch.kept_masks(rootfs) is None
    assert rootfs_watch.kept_masks(rootfs) is None
    assert len(starts) == 1
