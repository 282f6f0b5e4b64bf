"""Root filesystems: the host's userland (secrets masked) or an image's tree, as read-only binds."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Literal, NamedTuple

# Top-level host paths that make up a userland. /home, /root, /opt, /srv, /var and
# the user's dotfiles are never part of it.
USERLAND = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")

# Masked even when world-readable: credential stores and key material by convention.
ALWAYS_MASKED = (
    "/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/sudoers",
    "/etc/sudoers.d", "/etc/ssh", "/etc/ssl/private", "/etc/security/opasswd",
    "/etc/credstore", "/etc/credstore.encrypted", "/etc/docker", "/etc/containers/auth.json",
    "/etc/NetworkManager/system-connections", "/etc/wpa_supplicant", "/etc/krb5.keytab",
    "/etc/machine-id",
)

MountKind = Literal["ro-bind", "symlink"]
# Told of each path a walk for private entries depends on, with its lstat (None: a root).
Watch = Callable[[str, "os.stat_result | None"], None]

# Top-level names the backends mount themselves; an image's own copies are not bound.
BACKEND_MOUNTS = frozenset({"proc", "sys", "dev", "tmp", "run"})


class HostEntry(NamedTuple):
    """One top-level piece of the root: a read-only bind of `source` at `path`, or a symlink."""

    kind: MountKind
    path: str
    target: str = ""  # symlink target
    source: str = ""  # what is bound at `path` (defaults to `path` itself: the host's)

    @property
    def src(self) -> str:
        return self.source or self.path

    @property
    def is_dir(self) -> bool:
        return self.kind == "ro-bind" and os.path.isdir(self.src)


class Mask(NamedTuple):
    """A host path hidden inside the sandbox: an empty dir or an empty file."""

    path: str
    is_dir: bool


# The trees made of the host's own dirs (the userland, the wasm worker's Python and
# packages): a root-started sandbox gets them without id-mapping (`host_owned`).
HOST_USERLANDS = frozenset({"host", "wasm-worker"})


class HostRootfs(NamedTuple):
    """Everything a backend needs to assemble a root filesystem from read-only pieces."""

    entries: tuple[HostEntry, ...]
    masks: tuple[Mask, ...]  # fixed credential paths, always hidden
    name: str = "host"  # "host", or the image reference it was made from
    # Dirs whose not-world-readable entries must be hidden too (found when the sandbox
    # starts: the agent walks them in C; `private_masks()` is the Python equivalent).
    private_dirs: tuple[str, ...] = ()

    def host_owned(self) -> frozenset[str]:
        """The host dirs of the host's own userland (bind sources) that a root-started
        sandbox gets without id-mapping (namespaces, gVisor): the host's files there are
        never the sandbox's (no host id is one of its ids), so the kernel keeps every entry
        host root keeps to itself (0600, 0700) from the sandbox's root, anywhere in the
        tree, with no walk and nothing to keep current. Empty for an image's tree (the
        sandbox's own files: id-mapped, so that its root owns them). The wasm worker's tree
        is the host's too (its Python, wasmtime, our package)."""
        if self.name not in HOST_USERLANDS:
            return frozenset()
        return frozenset(e.src for e in self.entries if e.kind != "symlink")

    def private_masks(self, watch: Watch | None = None) -> tuple[Mask, ...]:
        """Every mask, the private dirs' walked ones included, nested ones dropped.
        `watch` is told of each dir before it is read, and of each other entry
        (rootfs_watch: what may change the answer)."""
        found = {m.path: m for d in self.private_dirs for m in _secret_entries(d, watch)}
        for mask in self.masks:
            found.setdefault(mask.path, mask)
        kept: list[Mask] = []
        for mask in sorted(found.values(), key=lambda m: m.path):
            if not any(mask.path.startswith(k.path + "/") for k in kept if k.is_dir):
                kept.append(mask)
        return tuple(kept)


def walk_tree(
    root: str, descend: Callable[[os.DirEntry[str], os.stat_result], bool]
) -> Iterator[tuple[os.DirEntry[str], os.stat_result]]:
    """Every entry under `root` with its lstat, never following symlinks; a directory is
    entered when `descend(entry, st)` says so (called after the entry is yielded).
    Unreadable entries are skipped."""
    stack = [root]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:
            continue
        with it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                yield entry, st
                if stat.S_ISDIR(st.st_mode) and descend(entry, st):
                    stack.append(entry.path)


def _world_readable(st: os.stat_result) -> bool:
    need = 0o005 if stat.S_ISDIR(st.st_mode) else 0o004
    return st.st_mode & need == need


def _secret_entries(root: str, watch: Watch | None = None) -> list[Mask]:
    """Every entry under `root` that the host does not let everyone read.

    Inside the sandbox the command may run with the host uid of the caller (root in CI),
    so file modes alone do not protect root-only files: hide them.
    """
    def descend(entry: os.DirEntry[str], st: os.stat_result) -> bool:
        if not _world_readable(st):
            return False
        if watch is not None:
            watch(entry.path, st)  # (before the walk reads it)
        return True

    if watch is not None:
        watch(root, None)
    out = []
    for entry, st in walk_tree(root, descend):
        if watch is not None and not stat.S_ISDIR(st.st_mode) and not stat.S_ISLNK(st.st_mode):
            watch(entry.path, st)
        if not stat.S_ISLNK(st.st_mode) and not _world_readable(st):
            out.append(Mask(entry.path, stat.S_ISDIR(st.st_mode)))
    return out


def host_rootfs() -> HostRootfs:
    """Describe the host's userland as binds, symlinks and masks (cheap: no tree walk).

    The always-masked paths are looked up on every call (a few lstats): one created after a
    long-lived process started (a daemon, before `/etc/credstore` existed) is masked from
    the next plan on, and the pool drops warm sandboxes made without it (daemon/pool.py)."""
    masks = tuple(Mask(path, os.path.isdir(path) and not os.path.islink(path))
                  for path in ALWAYS_MASKED if os.path.lexists(path))
    return HostRootfs(_userland_entries(), masks, private_dirs=("/etc",))


@lru_cache(maxsize=1)
def _userland_entries() -> tuple[HostEntry, ...]:
    """The top-level userland dirs and links (fixed for a process's life)."""
    entries: list[HostEntry] = []
    for path in USERLAND:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            entries.append(HostEntry("symlink", path, os.readlink(path)))
        elif stat.S_ISDIR(st.st_mode):
            entries.append(HostEntry("ro-bind", path))
    return tuple(entries)


def tree_rootfs(root: Path, name: str) -> HostRootfs:
    """Describe a private tree (an image's composed rootfs) by its top-level entries."""
    entries: list[HostEntry] = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name in BACKEND_MOUNTS:
            continue
        path = "/" + entry.name
        if entry.is_symlink():
            entries.append(HostEntry("symlink", path, os.readlink(entry.path)))
        elif entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False):
            entries.append(HostEntry("ro-bind", path, source=entry.path))
    return HostRootfs(tuple(entries), (), name)
