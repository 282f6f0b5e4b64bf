"""Compiled WebAssembly modules (`.cwasm`) kept in the user's data dir, trusted only if ours.

Loading a `.cwasm` maps machine code into the worker: a file someone else could have
written is code execution there. So the cache lives only under our own data dir (never the
project dir), its directory must be ours and 0700 (checked on the descriptor entries are
then opened through), each file ours, a regular file with one link and not writable by
anyone else; anything else is ignored (and never written to). Only this process writes
entries, from what a compiler child answered (wasm.py): neither the worker nor that child
can open the directory (they run as other users, or without the data dir mounted). Entries are
keyed by the module's content hash, the wasmtime version and our engine settings, so an
upgrade or a changed setting never loads code compiled for another engine. The directory
is capped (oldest entries go first). Each entry starts with a SHA-256 of what follows, so a
damaged one is recompiled without wasmtime being asked to load it (and without importing
it: a cache hit needs no wasmtime in this process at all).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from pathlib import Path

CACHE_DIR = "wasm-cache"
SUFFIX = ".cwasm"
MAX_ENTRY_BYTES = 256 * 1024 * 1024  # a compiled module larger than this is not cached
MAX_CACHE_BYTES = 512 * 1024 * 1024  # the whole directory; oldest entries go first
KEY_PREFIX = b"agentkernel-wasm-cache-v2\0"
ENTRY_MAGIC = b"AKWC2\0"  # then the SHA-256 of the compiled module, then the module
_HEAD = len(ENTRY_MAGIC) + 32


def cache_key(source: bytes, engine_fingerprint: str) -> str:
    """The entry name for `source` compiled by the engine described by `engine_fingerprint`."""
    digest = hashlib.sha256(KEY_PREFIX)
    digest.update(engine_fingerprint.encode())
    digest.update(b"\0")
    digest.update(source)
    return digest.hexdigest()


def cache_dir() -> Path | None:
    """Our private cache dir, made if missing; None if it is not safely ours."""
    from ..paths import data_dir

    path = data_dir() / CACHE_DIR
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        return None
    return path


def _open_dir() -> int | None:
    """Our cache dir, opened (a descriptor: entries are then opened relative to the dir
    that was checked, not to a path someone may have swapped since); None if it is not
    safely ours."""
    directory = cache_dir()
    if directory is None:
        return None
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        os.close(fd)
        return None
    return fd


def load(key: str) -> bytes | None:
    """The cached compiled module for `key`, if an entry exists and is safely ours."""
    dir_fd = _open_dir()
    if dir_fd is None:
        return None
    try:
        fd = os.open(key + SUFFIX, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                     dir_fd=dir_fd)
    except OSError:
        return None
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077
                or st.st_nlink != 1 or st.st_size > MAX_ENTRY_BYTES):
            return None
        data = read_fd(fd, st.st_size)
    finally:
        os.close(fd)
    body = data[_HEAD:]
    if data[:len(ENTRY_MAGIC)] != ENTRY_MAGIC or hashlib.sha256(body).digest() != \
            data[len(ENTRY_MAGIC):_HEAD]:
        forget(key)  # damaged, or of another version of this cache: compiled afresh
        return None
    return body


def store(key: str, compiled: bytes) -> None:
    """Write an entry atomically (0600, in our 0700 dir); a failure only costs a compile."""
    if len(compiled) + _HEAD > MAX_ENTRY_BYTES:
        return
    dir_fd = _open_dir()
    if dir_fd is None:
        return
    tmp = f".{key}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dir_fd)
        try:
            view = memoryview(ENTRY_MAGIC + hashlib.sha256(compiled).digest() + compiled)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, key + SUFFIX, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        return
    finally:
        os.close(dir_fd)
    directory = cache_dir()
    if directory is not None:
        trim(directory)


def forget(key: str) -> None:
    """Drop an entry the engine refused (corrupt or from another build)."""
    directory = cache_dir()
    if directory is not None:
        with contextlib.suppress(OSError):
            os.unlink(directory / (key + SUFFIX))


def trim(directory: Path, cap: int = MAX_CACHE_BYTES) -> None:
    """Keep the directory under `cap` bytes: the least recently written entries go."""
    entries: list[tuple[float, int, str]] = []
    total = 0
    with contextlib.suppress(OSError), os.scandir(directory) as it:
        for entry in it:
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                entries.append((st.st_mtime, st.st_size, entry.name))
                total += st.st_size
    entries.sort()
    for _mtime, size, name in entries:
        if total <= cap:
            break
        with contextlib.suppress(OSError):
            os.unlink(directory / name)
            total -= size


def read_fd(fd: int, size: int) -> bytes:
    """Up to `size` bytes from `fd` (less if it ends first), read in 1 MiB pieces."""
    chunks = []
    left = size
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
