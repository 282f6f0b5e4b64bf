"""Unpack OCI layer tarballs safely into a directory usable as an overlayfs lower layer.

Whiteouts. An OCI layer deletes lower-layer paths with ``.wh.NAME`` entries and hides a
whole lower directory with ``DIR/.wh..wh..opq``. overlayfs expresses the same thing as a
0/0 character device (whiteout) and an ``overlay.opaque=y`` xattr on the directory. A
0/0 device can only be made with CAP_MKNOD in the initial user namespace, so:

* every layer always gets a side list, ``whiteouts.json`` next to its ``root/`` dir,
  naming its deletions and opaque dirs (``LayerInfo``);
* when we can make device nodes (root on the host) the layer's ``root/`` also gets the
  overlay markers: a 0/0 char device per deletion, and ``trusted.overlay.opaque=y``
  plus ``user.overlay.opaque=y`` (for ``userxattr`` mounts in a user namespace) on
  opaque dirs. Such a layer is ``overlay_ready`` and can be a lowerdir as it is;
* otherwise (rootless) the markers are missing, and ``compose()`` builds a flat rootfs
  by copying the layers bottom-up and applying each side list before the layer's files.

Safety. Entry names that are absolute or contain ``..`` are rejected; every path is
resolved one component at a time with ``O_NOFOLLOW`` from the layer's root fd, so an
entry that would be written through a symlink (``link -> /etc`` then ``link/passwd``)
is rejected rather than followed. Hardlinks must point at an earlier entry of the same
layer. Device nodes are skipped; declared entry sizes, the total unpacked size (also
against the free space: a bomb never fills the disk) and the entry count are limited.
Image-supplied ``*.overlay.*`` xattrs are dropped, since they would change how overlayfs
reads the layer.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, ClassVar

if TYPE_CHECKING:
    import tarfile

_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
SIDE_LIST = "whiteouts.json"


class LayerError(Exception):
    """A layer is malformed or hostile; nothing of it is kept."""


@dataclass(frozen=True)
class Limits:
    """Upper bounds that protect the host from a hostile or broken layer."""

    max_entry_bytes: int = 16 << 30
    max_layer_bytes: int = 64 << 30
    max_entries: int = 2_000_000


@dataclass
class LayerInfo:
    """What unpacking one layer produced, besides its files."""

    diff_id: str
    size: int = 0
    whiteouts: list[str] = field(default_factory=list)
    opaque_dirs: list[str] = field(default_factory=list)
    overlay_ready: bool = False
    skipped_devices: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "diff_id": self.diff_id,
            "size": self.size,
            "whiteouts": self.whiteouts,
            "opaque_dirs": self.opaque_dirs,
            "overlay_ready": self.overlay_ready,
            "skipped_devices": self.skipped_devices,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerInfo:
        return cls(
            diff_id=str(data["diff_id"]),
            size=int(data.get("size", 0)),
            whiteouts=[str(x) for x in data.get("whiteouts", [])],
            opaque_dirs=[str(x) for x in data.get("opaque_dirs", [])],
            overlay_ready=bool(data.get("overlay_ready", False)),
            skipped_devices=int(data.get("skipped_devices", 0)),
        )

    @classmethod
    def load(cls, layer_dir: Path) -> LayerInfo:
        return cls.from_json(json.loads((layer_dir / SIDE_LIST).read_text()))


_mknod_ok: bool | None = None


def can_make_whiteouts() -> bool:
    """True if this process can create overlay whiteouts (0/0 char devices)."""
    global _mknod_ok
    if _mknod_ok is None:
        with tempfile.TemporaryDirectory(prefix="ak-mknod-") as tmp:
            try:
                os.mknod(os.path.join(tmp, "w"), stat.S_IFCHR | 0o600, os.makedev(0, 0))
                _mknod_ok = True
            except OSError:
                _mknod_ok = False
    return _mknod_ok


class _Hasher:
    """A read-only stream that hashes and counts what passes through, up to a limit."""

    def __init__(self, raw: Any, limit: int) -> None:
        self._raw = raw
        self._limit = limit
        self.sha = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._raw.read(n if n is not None and n >= 0 else _CHUNK)
        self.count += len(data)
        if self.count > self._limit:
            raise LayerError(f"layer unpacks to more than {self._limit} bytes")
        self.sha.update(data)
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


def open_decompressed(f: BinaryIO) -> IO[bytes] | Any:
    """Wrap ``f`` in the decompressor its magic bytes call for (gzip, zstd, or none)."""
    head = f.read(4)
    f.seek(0)
    if head.startswith(_GZIP_MAGIC):
        import gzip

        return gzip.GzipFile(fileobj=f, mode="rb")
    if head == _ZSTD_MAGIC:
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
    return f


def safe_parts(name: str) -> list[str]:
    """Split an archive path into components; reject absolute paths and ``..``."""
    if name.startswith("/"):
        raise LayerError(f"absolute path {name!r} in layer")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LayerError(f"path {name!r} escapes the layer ('..')")
    if any("\0" in p for p in parts):
        raise LayerError(f"NUL byte in path {name!r}")
    return parts


def _is_symlink_at(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _remove_at(name: str, dir_fd: int) -> None:
    """Remove whatever ``name`` is in ``dir_fd`` (a dir recursively, never following links)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


class _Tree:
    """Open directories below a root fd without ever following a symlink."""

    def __init__(self, root_fd: int, label: str) -> None:
        self.root_fd = root_fd
        self.label = label
        self._cached: tuple[tuple[str, ...], int] | None = None

    def close(self) -> None:
        self.forget()

    def forget(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def open_dir(self, parts: list[str], create: bool, shown: str) -> int | None:
        """fd of the directory ``parts`` (owned by the cache; don't close it).

        None when it does not exist and ``create`` is false, or when it goes through a
        symlink and ``create`` is false (lookups for deletions just find nothing there).
        """
        key = tuple(parts)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        fd = os.dup(self.root_fd)
        try:
            for comp in parts:
                try:
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        os.close(fd)
                        return None
                    os.mkdir(comp, 0o755, dir_fd=fd)
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    if _is_symlink_at(comp, fd):
                        if not create:
                            os.close(fd)
                            return None
                        raise LayerError(
                            f"entry {shown!r} would be written through the symlink "
                            f"{'/'.join(parts[: parts.index(comp) + 1])!r}"
                        ) from None
                    if not create:
                        os.close(fd)
                        return None
                    # A later entry turns a file into a directory: the later one wins.
                    os.unlink(comp, dir_fd=fd)
                    os.mkdir(comp, 0o755, dir_fd=fd)
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        self.forget()
        self._cached = (key, fd)
        return fd


def _set_xattrs(target: int | str, xattrs: dict[str, bytes], root: bool) -> None:
    for name, value in xattrs.items():
        # overlay.* from an image would steer our overlay mount (redirects, opaque dirs).
        if ".overlay." in name or name.startswith("security.selinux"):
            continue
        if not (name.startswith("user.") or root):
            continue
        with contextlib.suppress(OSError):
            os.setxattr(target, name, value)


def _xattrs_of(member: tarfile.TarInfo) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            out[key[len("SCHILY.xattr.") :]] = value.encode("utf-8", "surrogateescape")
    return out


@dataclass
class _DirMeta:
    parts: list[str]
    mode: int
    uid: int
    gid: int
    mtime: float
    xattrs: dict[str, bytes]


class _Space:
    """The free space of a store's filesystem, shared by this process's unpacks: a file
    entry claims its bytes against what is free now (earlier entries' written bytes show
    there, of every unpack) less what other entries being written claimed. Checking each
    layer against the space free at its own start let several pulls at once fill the disk."""

    _lock = threading.Lock()
    _claimed: ClassVar[dict[int, int]] = {}  # st_dev -> bytes of entries being written

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.dev = os.fstat(fd).st_dev

    @contextlib.contextmanager
    def claim(self, name: str, size: int) -> Iterator[None]:
        if size == 0:
            yield
            return
        with self._lock:
            vfs = os.statvfs(self.fd)
            free = vfs.f_bavail * vfs.f_frsize - self._claimed.get(self.dev, 0)
            if size > free:
                raise LayerError(f"entry {name!r} needs {size} bytes and {max(free, 0)} are "
                                 "free where the store keeps layers")
            self._claimed[self.dev] = self._claimed.get(self.dev, 0) + size
        try:
            yield
        finally:
            with self._lock:
                self._claimed[self.dev] -= size


def unpack_layer(
    blob: Path,
    dest: Path,
    *,
    diff_id: str | None = None,
    limits: Limits | None = None,
    overlay_markers: bool | None = None,
) -> LayerInfo:
    """Unpack the layer ``blob`` (gzip, zstd or plain tar) into the new directory ``dest``.

    ``diff_id`` (``sha256:…`` of the uncompressed tar) is verified when given. Raises
    LayerError for hostile or broken content; ``dest`` is then left for the caller to
    delete (the store unpacks into a private temp dir).
    """
    import tarfile  # only when unpacking: keeps `import agentkernel.images` cheap

    limits = limits or Limits()
    if overlay_markers is None:
        overlay_markers = can_make_whiteouts()
    root = os.geteuid() == 0
    dest.mkdir(mode=0o755)
    info = LayerInfo(diff_id=diff_id or "", overlay_ready=overlay_markers)
    dirs: list[_DirMeta] = []
    root_fd = os.open(dest, _DIR_FLAGS)
    tree = _Tree(root_fd, str(dest))
    try:
        space = _Space(root_fd)
        with blob.open("rb") as f:
            hasher = _Hasher(open_decompressed(f), limits.max_layer_bytes)
            try:
                with tarfile.open(fileobj=hasher, mode="r|") as tar:  # type: ignore[call-overload]
                    expanded = 0
                    for count, member in enumerate(tar, 1):
                        if count > limits.max_entries:
                            raise LayerError(f"more than {limits.max_entries} entries")
                        if member.size > limits.max_entry_bytes:
                            raise LayerError(
                                f"entry {member.name!r} declares {member.size} bytes "
                                f"(limit {limits.max_entry_bytes})"
                            )
                        # A sparse entry's holes are not in the stream (the hasher never
                        # counts them): a 10 KiB layer of GNU sparse entries unpacked to
                        # terabytes of zeros. Its files' sizes count toward the limit.
                        expanded += member.size if member.isfile() else 0
                        if expanded > limits.max_layer_bytes:
                            raise LayerError(
                                f"layer unpacks to more than {limits.max_layer_bytes} bytes"
                            )
                        # A decompression bomb filled the filesystem to its last byte
                        # (ENOSPC came only then): stop while the space is still there.
                        with space.claim(member.name, member.size if member.isfile() else 0):
                            _extract_one(tar, member, tree, info, dirs, overlay_markers, root)
                hasher.drain()
            except LayerError:
                raise
            except (tarfile.TarError, EOFError) as exc:
                raise LayerError(f"broken tar stream: {exc}") from None
            except Exception as exc:
                # zlib/zstd errors, truncated data and write failures end up here.
                raise LayerError(f"cannot unpack layer: {exc}") from None
        # Deepest first, so a read-only parent is made read-only after its children.
        for meta in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
            _apply_dir_meta(tree, meta, root)
    finally:
        tree.close()
        os.close(root_fd)
    info.size = hasher.count
    got = "sha256:" + hasher.sha.hexdigest()
    if diff_id and got != diff_id:
        raise LayerError(f"uncompressed layer is {got}, config says {diff_id}")
    info.diff_id = got
    return info


def _copy_keeping_holes(src: IO[bytes], out: int, size: int, rel: str,
                        holes: bool = True) -> None:
    """`size` bytes of `src` into `out`, with `holes` a block of zeros left a hole (a sparse
    entry's holes come back as zeros: written, they took the disk they never took in the
    layer)."""
    remaining = size
    while remaining > 0:
        chunk = src.read(min(_CHUNK, remaining))
        if not chunk:
            raise LayerError(f"entry {rel!r} is truncated")
        remaining -= len(chunk)
        if holes and chunk.count(0) == len(chunk):
            os.lseek(out, len(chunk), os.SEEK_CUR)
            continue
        view = memoryview(chunk)
        while view:
            view = view[os.write(out, view) :]
    os.ftruncate(out, size)  # a trailing hole


def _apply_dir_meta(tree: _Tree, meta: _DirMeta, root: bool) -> None:
    fd = tree.open_dir(meta.parts, create=False, shown="/".join(meta.parts))
    if fd is None:
        return
    if root:
        with contextlib.suppress(OSError):
            os.fchown(fd, meta.uid, meta.gid)
    _set_xattrs(fd, meta.xattrs, root)
    os.fchmod(fd, meta.mode & 0o7777)
    os.utime(fd, (meta.mtime, meta.mtime))


def _extract_one(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    tree: _Tree,
    info: LayerInfo,
    dirs: list[_DirMeta],
    markers: bool,
    root: bool,
) -> None:
    parts = safe_parts(member.name)
    if not parts:
        return  # the layer's own root ("./"): its metadata is the lower layers' business
    *parent, base = parts
    rel = "/".join(parts)
    if base == OPAQUE_MARKER:
        path = "/".join(parent)
        info.opaque_dirs.append(path)
        fd = tree.open_dir(parent, create=True, shown=rel)
        assert fd is not None
        if markers:
            for attr in ("trusted.overlay.opaque", "user.overlay.opaque"):
                with contextlib.suppress(OSError):
                    os.setxattr(fd, attr, b"y")
        return
    if base.startswith(WHITEOUT_PREFIX):
        target = base[len(WHITEOUT_PREFIX) :]
        if not target or target in (".", ".."):
            raise LayerError(f"bad whiteout {member.name!r}")
        info.whiteouts.append("/".join([*parent, target]))
        if markers:
            fd = tree.open_dir(parent, create=True, shown=rel)
            assert fd is not None
            # A whiteout only hides lower layers: never replace this layer's own entry.
            with contextlib.suppress(FileExistsError):
                os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=fd)
        return

    if member.isdir():
        fd = tree.open_dir(parent, create=True, shown=rel)
        assert fd is not None
        try:
            st = os.stat(base, dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(base, dir_fd=fd)
                os.mkdir(base, 0o755, dir_fd=fd)
        except FileNotFoundError:
            os.mkdir(base, 0o755, dir_fd=fd)
        dirs.append(
            _DirMeta(parts, member.mode, member.uid, member.gid, member.mtime, _xattrs_of(member))
        )
        return
    if member.ischr() or member.isblk():
        info.skipped_devices += 1
        return

    fd = tree.open_dir(parent, create=True, shown=rel)
    assert fd is not None
    # The later entry for a path wins, whatever was there.
    try:
        st = os.stat(base, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(base, dir_fd=fd)
        else:
            os.unlink(base, dir_fd=fd)

    if member.isfile():
        src = tar.extractfile(member)
        assert src is not None
        out = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600, dir_fd=fd)
        try:
            # Only a sparse entry's zeros go back as holes: a plain entry's bytes are
            # written, so its claim on the free space is spent as it says (a layer of
            # plain zeros still stops before the store's filesystem is full).
            _copy_keeping_holes(src, out, member.size, rel, holes=member.issparse())
            if root:
                with contextlib.suppress(OSError):
                    os.fchown(out, member.uid, member.gid)
            _set_xattrs(out, _xattrs_of(member), root)
            # After chown, which clears setuid/setgid bits.
            os.fchmod(out, member.mode & 0o7777)
            os.utime(out, (member.mtime, member.mtime))
        finally:
            os.close(out)
    elif member.issym():
        # The target is stored, never resolved: it means something only inside the sandbox.
        os.symlink(member.linkname, base, dir_fd=fd)
        if root:
            with contextlib.suppress(OSError):
                os.chown(base, member.uid, member.gid, dir_fd=fd, follow_symlinks=False)
        with contextlib.suppress(OSError, NotImplementedError):
            os.utime(base, (member.mtime, member.mtime), dir_fd=fd, follow_symlinks=False)
    elif member.islnk():
        tparts = safe_parts(member.linkname)
        if not tparts:
            raise LayerError(f"hardlink {rel!r} points at the layer root")
        if tparts == parts:
            return
        # Open the target's parent on a separate walk: the cache holds our own parent.
        tfd = _open_existing(tree.root_fd, tparts[:-1])
        if tfd is None:
            raise LayerError(f"hardlink {rel!r} -> {member.linkname!r}: target not in this layer")
        try:
            tst = os.stat(tparts[-1], dir_fd=tfd, follow_symlinks=False)
            if stat.S_ISDIR(tst.st_mode):
                raise LayerError(f"hardlink {rel!r} -> {member.linkname!r} is a directory")
            os.link(tparts[-1], base, src_dir_fd=tfd, dst_dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            raise LayerError(
                f"hardlink {rel!r} -> {member.linkname!r}: target not in this layer"
            ) from None
        finally:
            os.close(tfd)
    elif member.isfifo():
        os.mkfifo(base, member.mode & 0o777, dir_fd=fd)
    # Other types (GNU volume headers etc.) carry nothing for a rootfs.


def _open_existing(root_fd: int, parts: Iterable[str]) -> int | None:
    """fd of an existing directory below ``root_fd``; None if missing or via a symlink."""
    fd = os.dup(root_fd)
    for comp in parts:
        try:
            nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
        except OSError:
            os.close(fd)
            return None
        os.close(fd)
        fd = nfd
    return fd


def compose(layers: list[Path], dest: Path) -> None:
    """Copy ``layers`` (each a ``…/root`` dir, bottom first) into ``dest`` as one rootfs.

    Each layer's deletions and opaque dirs (from its side list) are applied before its
    files, as overlayfs would show them. This is the fallback when the layers cannot be
    mounted as overlay lowerdirs (no whiteout markers, or no overlayfs).
    """
    dest.mkdir(parents=True, exist_ok=True)
    dest_fd = os.open(dest, _DIR_FLAGS)
    tree = _Tree(dest_fd, str(dest))
    try:
        for layer in layers:
            info = LayerInfo.load(layer.parent)
            for path in info.opaque_dirs:
                parts = safe_parts(path)
                fd = tree.open_dir(parts, create=False, shown=path)
                if fd is not None:
                    for name in os.listdir(fd):
                        _remove_at(name, fd)
            for path in info.whiteouts:
                parts = safe_parts(path)
                fd = tree.open_dir(parts[:-1], create=False, shown=path)
                if fd is not None:
                    _remove_at(parts[-1], fd)
            tree.forget()
            _copy_layer(layer, tree)
    finally:
        tree.close()
        os.close(dest_fd)


def _copy_layer(layer: Path, tree: _Tree) -> None:
    root = os.geteuid() == 0
    inodes: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(layer):
        rel_dir = os.path.relpath(dirpath, layer)
        dparts = [] if rel_dir == "." else rel_dir.split("/")
        fd = tree.open_dir(dparts, create=True, shown=rel_dir)
        assert fd is not None
        for name in [*dirnames, *filenames]:
            src = os.path.join(dirpath, name)
            st = os.lstat(src)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                continue  # an overlay whiteout marker: the side list already applied it
            if stat.S_ISDIR(st.st_mode):
                try:
                    dst = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    if not stat.S_ISDIR(dst.st_mode):
                        os.unlink(name, dir_fd=fd)
                        os.mkdir(name, st.st_mode & 0o7777 | 0o700, dir_fd=fd)
                except FileNotFoundError:
                    os.mkdir(name, st.st_mode & 0o7777 | 0o700, dir_fd=fd)
                continue
            _remove_at(name, fd)
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in inodes:
                first = inodes[key]
                tfd = _open_existing(tree.root_fd, first[:-1])
                if tfd is not None:
                    try:
                        os.link(first[-1], name, src_dir_fd=tfd, dst_dir_fd=fd,
                                follow_symlinks=False)
                        continue
                    finally:
                        os.close(tfd)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(src), name, dir_fd=fd)
            elif stat.S_ISREG(st.st_mode):
                out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                              | os.O_CLOEXEC, 0o600, dir_fd=fd)
                try:
                    with open(src, "rb") as inp:
                        # sendfile keeps the copy in the kernel.
                        done = 0
                        while done < st.st_size:
                            sent = os.sendfile(out, inp.fileno(), done, st.st_size - done)
                            if sent == 0:
                                break
                            done += sent
                    if root:
                        os.fchown(out, st.st_uid, st.st_gid)
                    os.fchmod(out, st.st_mode & 0o7777)
                finally:
                    os.close(out)
            elif stat.S_ISFIFO(st.st_mode):
                os.mkfifo(name, st.st_mode & 0o777, dir_fd=fd)
            else:
                continue
            if st.st_nlink > 1:
                inodes[key] = [*dparts, name]
        # Keep a directory's own mode/owner as the layer has it.
        if dparts:
            with contextlib.suppress(OSError):
                dst_fd = tree.open_dir(dparts, create=False, shown=rel_dir)
                if dst_fd is not None:
                    st = os.lstat(dirpath)
                    if root:
                        os.fchown(dst_fd, st.st_uid, st.st_gid)
                    os.fchmod(dst_fd, st.st_mode & 0o7777 | (0 if root else 0o700))
