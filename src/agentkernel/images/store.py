"""The content-addressed image store: blobs, unpacked layers and image records, kept atomically."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..paths import data_dir
from .unpack import SIDE_LIST, LayerInfo

# Layout below the store root (data_dir()/images):
#   blobs/sha256/<hex>        manifests, indexes, configs and compressed layers
#   layers/<diffid-hex>/root  an unpacked layer (an overlay lowerdir), shared by images
#   layers/<diffid-hex>/whiteouts.json   its deletions and opaque dirs (LayerInfo)
#   refs/<sha256(ref)>.json   an image record: ref → digests, layers, platform
#   tmp/                      downloads and unpacks in progress; renamed into place when done
#   locks/                    flock files: store.lock (shared by pulls, exclusive for prune),
#                             one per blob and per layer so concurrent pulls don't collide


def _hex(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
        raise ValueError(f"unsupported digest {digest!r}")
    return hexpart


def _rmtree(path: Path) -> None:
    """rmtree that also copes with read-only dirs from an image (when not root)."""

    def fix(func: Callable[..., Any], p: str, _exc: BaseException) -> None:
        parent = os.path.dirname(p)
        with contextlib.suppress(OSError):
            os.chmod(parent, stat.S_IRWXU)
        with contextlib.suppress(OSError):
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, stat.S_IRWXU)
        with contextlib.suppress(FileNotFoundError):
            func(p)

    if path.is_dir() and not path.is_symlink():
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=fix)
        else:
            shutil.rmtree(path, onerror=lambda f, p, e: fix(f, p, e[1]))
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _size_of(path: Path) -> int:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_blocks * 512
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames]:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


class Store:
    """One store directory. Safe to share between threads and processes."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else data_dir() / "images"

    def init(self) -> None:
        # 0700: layers may hold setuid binaries from untrusted images; keep other users out.
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for sub in ("blobs/sha256", "layers", "refs", "tmp", "locks"):
            (self.root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)

    # -- locks -------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, name: str, *, shared: bool = False) -> Iterator[None]:
        fd = os.open(self.root / "locks" / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- blobs -------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / _hex(digest)

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def tmp_path(self, label: str) -> Path:
        fd, name = tempfile.mkstemp(prefix=f"{label}-", dir=self.root / "tmp")
        os.close(fd)
        return Path(name)

    def put_blob(self, digest: str, data: bytes) -> Path:
        """Store ``data`` under ``digest`` (verified) atomically."""
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"content does not match {digest}")
        path = self.blob_path(digest)
        if not path.exists():
            tmp = self.tmp_path("blob")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return path

    def ensure_blob(self, digest: str, fill: Callable[[Path], None]) -> Path:
        """The blob ``digest``, calling ``fill(tmpfile)`` to produce it if missing.

        ``fill`` must verify what it writes; only then is the file renamed into place.
        """
        path = self.blob_path(digest)
        if path.is_file():
            return path
        with self.lock(f"blob-{_hex(digest)}"):
            if path.is_file():  # another pull fetched it while we waited
                return path
            tmp = self.tmp_path("blob")
            try:
                fill(tmp)
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        return path

    def read_blob(self, digest: str) -> bytes:
        return self.blob_path(digest).read_bytes()

    # -- layers ------------------------------------------------------------------------

    def layer_dir(self, diff_id: str) -> Path:
        return self.root / "layers" / _hex(diff_id)

    def has_layer(self, diff_id: str) -> bool:
        d = self.layer_dir(diff_id)
        return (d / SIDE_LIST).is_file() and (d / "root").is_dir()

    def ensure_layer(self, diff_id: str, build: Callable[[Path], LayerInfo]) -> LayerInfo:
        """The unpacked layer ``diff_id``; ``build(tmp_root)`` unpacks it if missing.

        It is built in a private temp dir and renamed into place whole, so a reader
        sees either nothing or the complete layer.
        """
        final = self.layer_dir(diff_id)
        if self.has_layer(diff_id):
            return LayerInfo.load(final)
        with self.lock(f"layer-{_hex(diff_id)}"):
            if self.has_layer(diff_id):
                return LayerInfo.load(final)
            tmp = Path(tempfile.mkdtemp(prefix="layer-", dir=self.root / "tmp"))
            try:
                info = build(tmp / "root")
                (tmp / SIDE_LIST).write_text(json.dumps(info.to_json()))
                if final.exists():  # a leftover without its side list
                    _rmtree(final)
                os.rename(tmp, final)
            finally:
                if tmp.exists():
                    _rmtree(tmp)
        return info

    # -- image records -----------------------------------------------------------------

    def _record_path(self, ref: str) -> Path:
        return self.root / "refs" / (hashlib.sha256(ref.encode()).hexdigest()[:40] + ".json")

    def save_record(self, record: dict[str, Any]) -> None:
        path = self._record_path(str(record["ref"]))
        tmp = self.tmp_path("ref")
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
        os.replace(tmp, path)

    def load_record(self, ref: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self._record_path(ref).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("ref") == ref else None

    def records(self) -> list[dict[str, Any]]:
        out = []
        refs = self.root / "refs"
        if not refs.is_dir():
            return []
        for path in sorted(refs.glob("*.json")):
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(path.read_text())
                if isinstance(data, dict) and "ref" in data:
                    out.append(data)
        return out

    def delete_record(self, ref: str) -> bool:
        try:
            self._record_path(ref).unlink()
            return True
        except FileNotFoundError:
            return False

    # -- flat root filesystems ---------------------------------------------------------

    def ensure_rootfs(self, manifest_digest: str, layers: list[Path]) -> Path:
        """The image's layers composed into one read-only tree, built once per manifest.

        Sandboxes bind its top-level dirs read-only and put their own writable overlay on
        top, so the tree is shared by every sandbox of the image and never written to.
        """
        final = self.root / "rootfs" / _hex(manifest_digest)
        if final.is_dir():
            return final
        final.parent.mkdir(mode=0o700, exist_ok=True)
        with self.lock("store", shared=True), self.lock(f"rootfs-{_hex(manifest_digest)}"):
            if final.is_dir():
                return final
            tmp = Path(tempfile.mkdtemp(prefix="rootfs-", dir=self.root / "tmp"))
            try:
                from .unpack import compose

                compose(layers, tmp / "root")
                (tmp / "root").rename(final)
            finally:
                _rmtree(tmp)
        return final

    # -- prune -------------------------------------------------------------------------

    def prune(self) -> int:
        """Delete blobs, layers, temp files and locks no record uses; return bytes freed."""
        if not self.root.is_dir():
            return 0
        self.init()
        freed = 0
        with self.lock("store"):
            blobs: set[str] = set()
            layers: set[str] = set()
            for rec in self.records():
                blobs.update(_hex(d) for d in rec.get("blobs", []))
                layers.update(_hex(layer["diff_id"]) for layer in rec.get("layers", []))
            for path in (self.root / "blobs" / "sha256").iterdir():
                if path.name not in blobs:
                    freed += _size_of(path)
                    _rmtree(path)
            for path in (self.root / "layers").iterdir():
                if path.name not in layers:
                    freed += _size_of(path)
                    _rmtree(path)
            rootfs = self.root / "rootfs"
            for path in rootfs.iterdir() if rootfs.is_dir() else ():
                if path.name not in blobs:  # named after the manifest digest
                    freed += _size_of(path)
                    _rmtree(path)
            # With the store lock held exclusively no pull is running: all of these are stale.
            for path in (self.root / "tmp").iterdir():
                freed += _size_of(path)
                _rmtree(path)
            for path in (self.root / "locks").iterdir():
                if path.name != "store.lock":
                    path.unlink()
        return freed
