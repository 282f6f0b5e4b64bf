"""Host disk bounds of persistent sandboxes: a quota-sized image per state dir, capped logs.

A persistent sandbox keeps its writable layers (root overlay upper, /tmp, /root, /home,
/var/tmp, a copy-on-write project's upper or gVisor's project copy) on the host's disk.
Started by root, the daemon keeps them on a sparse ext4 image of the quota's size
(`<state dir>/disk.ext4`), loop-mounted under /run/agentkernel-disks, so a sandbox that
fills it gets ENOSPC and the host's disk is untouched. The backend is handed the mount
point as the sandbox's state dir and knows nothing more. The mount outlives daemon
restarts (it is the host's) and is mounted again after a reboot; `remove` unmounts it and
deletes the image.

The mount point is outside the data dir on purpose: a sandbox whose project dir contains
the data dir (a run from $HOME) gets the project by a recursive bind in its user
namespace, which would carry an image mount along as a locked submount, and overlayfs
refuses a lower layer with one (EINVAL), so its copy-on-write project could not be made.

An ordinary user cannot mount an image (no loop devices; FUSE's fuse2fs is not in the
project's dependencies): there the daemon measures the state dir instead and stops a
sandbox that grew past its quota (see `usage`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import BinaryIO, Final

from ..errors import SandboxError

MIB: Final = 1024 * 1024
DEFAULT_LOG_BYTES: Final = 64 * MIB  # per stream of one detached command
MOUNT_ROOT: Final = "/run/agentkernel-disks"  # beside root's runtime dir, never inside it
_IMAGE: Final = "disk.ext4"


def image_path(state_dir: Path) -> Path:
    """The image holding a persistent sandbox's writable layers."""
    return state_dir / _IMAGE


def mount_point(state_dir: Path) -> Path:
    """Where the image of `state_dir` is mounted: one dir per data dir, so that daemons
    with different data dirs never share a mount point."""
    import hashlib

    key = hashlib.sha256(os.path.realpath(state_dir.parent).encode()).hexdigest()[:16]
    return Path(MOUNT_ROOT) / key / state_dir.name


def layers_dir(state_dir: Path) -> Path:
    """Where a sandbox's writable layers live: its disk's mount point, else the state dir."""
    return mount_point(state_dir) if image_path(state_dir).exists() else state_dir


def can_mount() -> bool:
    """Whether images can be loop-mounted here: root, with loop devices and the tools."""
    from ..vm.disk import mkfs_binary

    return (os.geteuid() == 0 and Path("/dev/loop-control").exists()
            and shutil.which("mount") is not None and shutil.which("umount") is not None
            and mkfs_binary() is not None)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \\ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1:i + 4]) == 3 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def is_mounted(path: Path) -> bool:
    """Whether something is mounted exactly at `path` in our mount namespace."""
    target = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            return any(_unescape(line.split()[4]) == target for line in f if line.strip())
    except OSError:
        return False


def _run(argv: list[str], what: str) -> None:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if out.returncode != 0:
        err = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
        raise SandboxError(f"{what}: {err}")


def attach(state_dir: Path, size_mb: int | None) -> bool:
    """Mount the state dir's image (made the first time) at its mount point.

    Returns whether a quota now bounds the sandbox's layers: False when none is asked
    for, when this process cannot mount, or for a sandbox made before quotas existed (its
    layers are in the state dir itself).
    """
    image = image_path(state_dir)
    if not size_mb or not can_mount():
        return False
    target = mount_point(state_dir)
    if is_mounted(target):
        return True
    if not image.exists():
        if any((state_dir / d).exists() for d in ("layers", "dirs", "workspace")):
            return False
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _make_image(image, size_mb)
    else:
        # Preen after a crash or power cut; exit 1 means "errors fixed".
        fsck = shutil.which("e2fsck")
        if fsck:
            subprocess.run([fsck, "-p", str(image)], capture_output=True, timeout=300,
                           check=False)
    for d in (target.parent.parent, target.parent, target):
        d.mkdir(mode=0o700, exist_ok=True, parents=True)
    # nosuid/nodev: nothing a sandbox wrote can become a device or set-id program on the
    # host; the image's root is root's 0700 like the dir it stands for.
    _run(["mount", "-t", "ext4", "-o", "loop,nosuid,nodev,noatime", str(image), str(target)],
         f"cannot mount the disk of {state_dir.name}")
    target.chmod(0o700)
    with contextlib.suppress(OSError):
        (target / "lost+found").rmdir()
    return True


def _make_image(image: Path, size_mb: int) -> None:
    from ..vm.disk import make_ext4

    tmp = image.with_name(image.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    try:
        make_ext4(tmp, source=None, size_bytes=size_mb * MIB, label="akstate", journal=True)
        tmp.chmod(0o600)
        tmp.replace(image)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def detach(state_dir: Path, timeout: float = 5.0) -> None:
    """Unmount the state dir's image (if mounted) and delete it: nothing is left.

    The loop device goes with the last reference to the mount (mount -o loop sets
    autoclear); a mount still busy after `timeout` is detached lazily.
    """
    target = mount_point(state_dir)
    deadline = time.monotonic() + timeout
    while is_mounted(target):
        out = subprocess.run(["umount", str(target)], capture_output=True, timeout=60,
                             check=False)
        if out.returncode == 0:
            continue
        if time.monotonic() > deadline:
            subprocess.run(["umount", "-l", str(target)], capture_output=True, timeout=60,
                           check=False)
            break
        time.sleep(0.05)
    for d in (target, target.parent):  # the per-data-dir dir goes with its last sandbox
        with contextlib.suppress(OSError):
            d.rmdir()
    image_path(state_dir).unlink(missing_ok=True)
    image_path(state_dir).with_name(_IMAGE + ".tmp").unlink(missing_ok=True)


def usage(path: Path) -> int:
    """Bytes allocated under `path` (counted by blocks, hard links once; no symlinks)."""
    from ..rootfs import walk_tree

    total, seen = 0, set()
    for _entry, st in walk_tree(str(path), lambda _e, _st: True):
        if st.st_nlink > 1:
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
        total += st.st_blocks * 512
    return total


def _older(path: Path) -> Path:
    return path.with_name(path.name + ".1")


def _dropped_flag(path: Path) -> Path:
    return path.with_name(path.name + ".dropped")


class CappedLog:
    """A detached command's output file that never grows past `cap` bytes.

    Output goes to PATH until it holds half the cap; then PATH becomes PATH.1 (replacing
    the older half, whose loss PATH.dropped records) and a new PATH starts. So the newest
    output is always kept and the files together stay within the cap; `read_log` puts a
    marker where output was dropped. A full disk stops the writing, never the command:
    its output is still drained, and dropped.
    """

    def __init__(self, path: Path, cap: int = DEFAULT_LOG_BYTES) -> None:
        self.path = path
        self.cap = cap
        self.half = max(1, cap // 2)
        self._f: BinaryIO | None = open(path, "ab")  # noqa: SIM115 - closed in close()
        self._size = self._f.tell()

    def write(self, data: bytes) -> None:
        while data and self._f is not None:
            room = self.half - self._size
            if room <= 0:
                self._rotate()
                continue
            chunk, data = data[:room], data[room:]
            try:
                self._f.write(chunk)
                self._f.flush()
            except OSError:  # ENOSPC at the sandbox's quota: keep draining, stop writing
                self.close()
                return
            self._size += len(chunk)

    def _rotate(self) -> None:
        assert self._f is not None
        self._f.close()
        self._f = None
        try:
            if _older(self.path).exists():
                _dropped_flag(self.path).touch()
            self.path.replace(_older(self.path))
            self._f = open(self.path, "wb")  # noqa: SIM115
        except OSError:
            return  # a full disk again: stop writing
        self._size = 0

    def close(self) -> None:
        if self._f is not None:
            with contextlib.suppress(OSError):
                self._f.close()
            self._f = None

    def __enter__(self) -> CappedLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dropped(path: Path) -> bool:
    """Whether a capped log at `path` lost older output."""
    return _dropped_flag(path).exists()


LOG_MARKER: Final = b"[agentkernel: earlier output dropped: this log keeps the newest output]\n"


def read_log(path: Path) -> bytes:
    """A capped log's content: a marker if output was dropped, the older half, the newer."""
    parts = [LOG_MARKER] if _dropped_flag(path).exists() else []
    for p in (_older(path), path):
        with contextlib.suppress(FileNotFoundError):
            parts.append(p.read_bytes())
    return b"".join(parts)
