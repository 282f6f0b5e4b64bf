"""ext4 disk images for guests: the read-only root per rootfs, writable layers, project copies."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import SandboxError
from ..paths import data_dir
from ..rootfs import HostRootfs

MIB = 1024 * 1024
BASE_DIRS = ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "dev", "proc", "sys", "tmp", "run",
             "root", "home", "var/tmp", "workspace")


def mkfs_binary() -> str | None:
    """mkfs.ext4 (or mke2fs): on PATH, or in the sbin dirs an ordinary user's PATH lacks
    (Debian's default for users has no /usr/sbin, where e2fsprogs puts it)."""
    for name in ("mkfs.ext4", "mke2fs"):
        found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
        if found is not None:
            return found
    return None


def _mkfs() -> str:
    mkfs = mkfs_binary()
    if mkfs is None:
        raise SandboxError("the microvm backend needs mkfs.ext4: apt install e2fsprogs")
    return mkfs


def tree_usage(root: Path) -> tuple[int, int]:
    """(bytes, inodes) a tree needs, counting allocated blocks, not apparent sizes."""
    from ..rootfs import walk_tree

    total, inodes = 0, 0
    for _entry, st in walk_tree(str(root), lambda _e, _st: True):
        inodes += 1
        total += max(st.st_blocks * 512, 4096) if stat.S_ISREG(st.st_mode) else 4096
    return total, inodes


def make_ext4(image: Path, *, source: Path | None, size_bytes: int, inodes: int | None = None,
              label: str = "ak", journal: bool = False) -> None:
    """Build a sparse ext4 image from `source` with mkfs.ext4 -d; no root needed.

    No journal unless asked: a guest's disks are thrown away with it, a host-mounted one
    (a persistent sandbox's state) must survive a crash.
    """
    size_mib = max(16, -(-size_bytes // MIB))
    argv = [_mkfs(), "-q", "-F", "-t", "ext4", "-O", "has_journal" if journal else "^has_journal",
            "-L", label, "-m", "0", "-E", "root_owner=0:0"]
    if journal:  # mkfs's default is 64 MiB of host disk from 2 GiB up; a state dir needs less
        argv += ["-J", f"size={max(4, min(16, size_mib // 64))}"]
    if inodes:
        argv += ["-N", str(inodes)]
    if source is not None:
        argv += ["-d", str(source)]
    argv += [str(image), f"{size_mib}M"]
    image.unlink(missing_ok=True)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    if out.returncode != 0:
        image.unlink(missing_ok=True)
        err = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        raise SandboxError(f"mkfs.ext4 failed for {image.name}: {err}")


def sized_for(root: Path, *, slack: int) -> tuple[int, int]:
    used, inodes = tree_usage(root)
    return int(used * 1.25) + slack, int(inodes * 1.3) + 1024


def disks_dir() -> Path:
    path = data_dir() / "microvm" / "disks"
    path.mkdir(parents=True, exist_ok=True)
    return path


def tree_root(rootfs: HostRootfs) -> Path | None:
    """The directory an image rootfs was described from (None for the host's userland)."""
    if rootfs.name == "host":
        return None
    parents = {Path(e.source).parent for e in rootfs.entries if e.kind == "ro-bind" and e.source}
    if len(parents) != 1:
        return None
    return parents.pop()


def _cached(key: str, build: Callable[[Path], None]) -> Path:
    image = disks_dir() / f"{key}.ext4"
    if image.is_file():
        return image
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=disks_dir()))
    try:
        built = tmp / "root.ext4"
        build(built)
        built.chmod(0o444)
        built.replace(image)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return image


def _fill_base_tree(dest: Path, busybox: Path) -> None:
    for d in BASE_DIRS:
        (dest / d).mkdir(parents=True, exist_ok=True)
    (dest / "tmp").chmod(0o1777)
    (dest / "var/tmp").chmod(0o1777)
    (dest / "root").chmod(0o700)
    shutil.copy2(busybox, dest / "bin/busybox")
    out = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True,
                         timeout=30, check=False)
    for line in out.stdout.split():
        link = dest / line
        if line in ("bin/busybox", "") or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink("/bin/busybox", link)
    (dest / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                     "nobody:x:65534:65534:nobody:/:/bin/false\n")
    (dest / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (dest / "etc/hosts").write_text("127.0.0.1 localhost agentkernel\n::1 localhost\n")
    (dest / "etc/os-release").write_text('ID=agentkernel-busybox\nNAME="busybox base"\n')


def is_static_elf(path: Path) -> bool:
    """An ELF64 executable with no PT_INTERP program header (runs with no libc around)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:
            return False
        phoff = int.from_bytes(head[32:40], "little")
        phentsize = int.from_bytes(head[54:56], "little")
        phnum = int.from_bytes(head[56:58], "little")
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(int.from_bytes(table[i:i + 4], "little") != 3
               for i in range(0, len(table), max(phentsize, 1)))


def base_busybox() -> Path | None:
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.is_file() and is_static_elf(path):
            return path
    return None


def ensure_root_image(rootfs: HostRootfs) -> tuple[Path, str]:
    """The read-only root disk for `rootfs` (built once, cached) and a one-line description.

    An image rootfs is copied whole into ext4. The host's userland is too large to copy
    into every guest, so a host-rootfs request gets a small busybox root instead.
    """
    root = tree_root(rootfs)
    if root is not None:
        st = root.stat()
        key = hashlib.sha256(f"tree\0{root}\0{st.st_mtime_ns}\0{st.st_ino}".encode()).hexdigest()

        def build_tree(out: Path) -> None:
            size, inodes = sized_for(root, slack=64 * MIB)
            make_ext4(out, source=root, size_bytes=size, inodes=inodes, label="akroot")

        return _cached(key[:32], build_tree), f"image {rootfs.name}"
    busybox = base_busybox()
    if busybox is None:
        raise SandboxError("the microvm backend needs an image rootfs, or a static busybox for "
                           "its base root (apt install busybox-static)")
    digest = hashlib.sha256(busybox.read_bytes()).hexdigest()

    def build_base(out: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="ak-base-") as tmp:
            _fill_base_tree(Path(tmp), busybox)
            size, inodes = sized_for(Path(tmp), slack=16 * MIB)
            make_ext4(out, source=Path(tmp), size_bytes=size, inodes=inodes, label="akroot")

    return _cached(f"busybox-{digest[:24]}", build_base), "busybox base root (static busybox)"


def make_workspace_image(source: Path, image: Path, *, writable: bool) -> None:
    """A private ext4 copy of the project directory (room to grow when it is writable)."""
    size, inodes = sized_for(source, slack=(512 if writable else 16) * MIB)
    make_ext4(image, source=source, size_bytes=size, inodes=inodes + (20000 if writable else 0),
              label="akwork")


def make_layer_image(image: Path, size_mib: int = 4096) -> None:
    """An empty ext4 for a VM's writable layer (sparse: costs only what is written)."""
    make_ext4(image, source=None, size_bytes=size_mib * MIB, label="akrw")
