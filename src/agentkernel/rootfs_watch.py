"""The host userland's private entries (`HostRootfs.private_masks`), walked once per process
and reused for as long as the kernel says nothing they depend on changed.

The walk (~1,300 entries of /etc here: 7-20 ms of CPU) decides a mask by each entry's type
and mode. What can change that, and what tells us: an entry created, removed or renamed
in a walked dir (inotify on the dir), an entry's mode or owner changed, also through a
hard link elsewhere (inotify IN_ATTRIB on the entry itself: every entry is watched), a
walked dir removed or moved, a mount appearing, going or replaced at, under or above a
walked dir (the mount ids in /proc/self/mountinfo, re-read only when the kernel's mount
table says it changed). Any event, a queue overflow, or a watch that could not be added
means a new walk. Watches are set before a dir is read, so a change during the walk is
seen too. A process that starts one sandbox walks once, without watches.
"""

from __future__ import annotations

import os
import select
import threading
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from .rootfs import HostRootfs, Mask

# inotify(7): what is asked of each watch.
IN_ATTRIB, IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE = 0x4, 0x40, 0x80, 0x100
IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = 0x200, 0x400, 0x800
IN_DONT_FOLLOW = 0x02000000
WATCH = (IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF
         | IN_MOVE_SELF | IN_DONT_FOLLOW)
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
MAX_MOUNTINFO = 4 * 1024 * 1024  # bytes of /proc/self/mountinfo read at most
MAX_WATCHES = 16384  # a userland with more entries than this is walked every time

_lock = threading.Lock()
_walks: dict[tuple[object, ...], int] = {}  # key -> walks done without a cache
_cache: dict[tuple[object, ...], _Watched] = {}


def private_masks(rootfs: HostRootfs) -> tuple[Mask, ...]:
    """`rootfs.private_masks()`, from the cache while it is provably current."""
    key = (rootfs.private_dirs, rootfs.masks)
    with _lock:
        hit = _current(key)
        if hit is not None:
            return hit
        if not rootfs.private_dirs or _walks.get(key, 0) == 0:
            _walks[key] = 1  # (the first walk of a process goes without watches)
            return rootfs.private_masks()
        watched = _Watched.start(rootfs)
        if watched is None:
            return rootfs.private_masks()
        _store(key, watched)
        return watched.masks


def _current(key: tuple[object, ...]) -> tuple[Mask, ...] | None:
    """Under the lock: the cached walk's masks for `key` while it is current (a stale one
    is dropped)."""
    hit = _cache.get(key)
    if hit is None:
        return None
    if hit.fresh():
        return hit.masks
    hit.close()
    del _cache[key]
    return None


UNWATCHABLE_RETRY = 60.0  # seconds before a walk that could not be watched is tried again
_unwatchable: dict[tuple[object, ...], float] = {}  # key -> when watching it last failed


def kept_masks(rootfs: HostRootfs) -> tuple[Mask, ...] | None:
    """`rootfs.private_masks()` where this process keeps the walk (watched from the first
    call: a daemon), else None, for a caller that has a walk of its own to fall back on
    (the namespaces agent's, in C). None also for a while after watching failed (no
    inotify instance or watch left for this user), instead of a walk in Python per call."""
    import time

    key = (rootfs.private_dirs, rootfs.masks)
    with _lock:
        hit = _current(key)
        if hit is not None:
            return hit
        failed = _unwatchable.get(key)
        if failed is not None and time.monotonic() - failed < UNWATCHABLE_RETRY:
            return None
        watched = _Watched.start(rootfs)
        if watched is None:
            _unwatchable[key] = time.monotonic()
            return None
        _unwatchable.pop(key, None)
        _store(key, watched)
        return watched.masks


def _store(key: tuple[object, ...], watched: _Watched) -> None:
    """Under the lock: keep `watched` for `key`, dropping (and closing: an inotify fd with
    a watch per entry) any walk of the same dirs under other fixed masks. Those change
    when a credential path appears or goes; the old list is not asked for again, and its
    watches would otherwise stay until the process ends."""
    for old in [k for k in _cache if k[0] == key[0] and k != key]:
        _cache.pop(old).close()
    _cache[key] = watched


def forget() -> None:
    """Drop every cache (tests; a daemon shutting down)."""
    with _lock:
        for hit in _cache.values():
            hit.close()
        _cache.clear()
        _walks.clear()
        _unwatchable.clear()


class _Watched:
    """One walk's masks, its inotify fd and the mounts it saw."""

    def __init__(self, fd: int, mounts: IO[bytes], dirs: tuple[str, ...]) -> None:
        self.fd = fd
        self.mounts = mounts
        self.dirs = dirs
        self.seen = _mounts_at(mounts, dirs)
        self.masks: tuple[Mask, ...] = ()
        self.poller = select.poll()
        self.poller.register(mounts.fileno(), select.POLLPRI | select.POLLERR)

    @classmethod
    def start(cls, rootfs: HostRootfs) -> _Watched | None:
        try:
            fd = _libc_inotify_init()
        except OSError:
            return None  # (no inotify instance left for this user: walk every time)
        try:
            mounts = open("/proc/self/mountinfo", "rb", buffering=0)  # noqa: SIM115
        except OSError:
            os.close(fd)
            return None
        self = cls(fd, mounts, rootfs.private_dirs)
        count = [0]

        def watch(path: str, st: os.stat_result | None) -> None:
            count[0] += 1
            if count[0] > MAX_WATCHES or _add_watch(fd, path) < 0:
                raise _Unwatchable

        try:
            self.masks = rootfs.private_masks(watch=watch)
        except _Unwatchable:
            self.close()
            return None
        return self

    def fresh(self) -> bool:
        try:
            if os.read(self.fd, 4096):
                return False  # something changed (or the queue overflowed)
        except BlockingIOError:
            pass
        except OSError:
            return False
        if self.poller.poll(0):  # the mount table changed: did it under our dirs?
            return _mounts_at(self.mounts, self.dirs) == self.seen
        return True

    def close(self) -> None:
        os.close(self.fd)
        self.mounts.close()


class _Unwatchable(Exception):
    """A watch could not be added: this walk is not cached."""


def _mounts_at(f: IO[bytes], dirs: tuple[str, ...]) -> frozenset[tuple[str, str]]:
    """(mount id, mount point) of every mount at, under or above one of `dirs` (reading
    the file again also re-arms its poll). A table beyond MAX_MOUNTINFO gives an answer
    equal to no other, so that a walk depending on it is never reused."""
    f.seek(0)
    chunks: list[bytes] = []
    size = 0
    while size <= MAX_MOUNTINFO:  # procfs answers a read with one page or so: to the end
        chunk = f.read(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > MAX_MOUNTINFO:
        return frozenset({("truncated", os.urandom(8).hex())})
    data = b"".join(chunks)
    out = set()
    for line in data.split(b"\n"):
        fields = line.split(b" ")
        if len(fields) < 5:
            continue
        point = _unescape(fields[4].decode(errors="replace"))
        for d in dirs:
            if point == d or point.startswith(d + "/") or d.startswith(point.rstrip("/") + "/"):
                out.add((fields[0].decode(), point))
                break
    return frozenset(out)


def _unescape(path: str) -> str:
    """mountinfo's octal escapes (\\040 for a space) undone."""
    if "\\" not in path:
        return path
    import re

    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


_LIBC: object | None = None


def _libc() -> object:
    global _LIBC
    if _LIBC is None:
        import ctypes

        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _libc_inotify_init() -> int:
    import ctypes

    fd = int(_libc().inotify_init1(IN_NONBLOCK | IN_CLOEXEC))  # type: ignore[attr-defined]
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def _add_watch(fd: int, path: str) -> int:
    return int(_libc().inotify_add_watch(  # type: ignore[attr-defined]
        fd, os.fsencode(path), WATCH))
