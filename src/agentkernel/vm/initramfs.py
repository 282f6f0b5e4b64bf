"""The guest initramfs: a newc cpio archive with our agent as /init and the kernel's modules."""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..paths import data_dir, native_binary
from .kernel import KernelInfo

MODULE_DIR = "/m"  # where the modules live inside the initramfs (short: the cmdline is small)


@dataclass(frozen=True)
class Entry:
    """One cpio member: a directory, a regular file or a character device."""

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _header(ino: int, entry: Entry, name: bytes) -> bytes:
    fields = [
        ino, entry.mode, 0, 0, 1 if not stat.S_ISDIR(entry.mode) else 2, 0,
        len(entry.data), 0, 0, entry.rdev[0], entry.rdev[1], len(name) + 1, 0,
    ]
    return b"070701" + b"".join(b"%08X" % f for f in fields)


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def write_newc(entries: list[Entry]) -> bytes:
    """Serialise `entries` as a newc ("070701") cpio archive, ending with TRAILER!!!."""
    out = bytearray()
    for ino, entry in enumerate([*entries, Entry("TRAILER!!!", 0)], start=1):
        name = entry.path.lstrip("/").encode() or b"."
        head = _header(ino if entry.path != "TRAILER!!!" else 0, entry, name)
        out += head + name + b"\0"
        out += _pad(len(head) + len(name) + 1)
        out += entry.data + _pad(len(entry.data))
    return bytes(out)


def read_newc(blob: bytes) -> dict[str, Entry]:
    """Parse a newc archive (used by the tests to check what we wrote)."""
    entries: dict[str, Entry] = {}
    i = 0
    while i + 110 <= len(blob):
        if blob[i:i + 6] != b"070701":
            raise ValueError(f"bad cpio magic at {i}")
        f = [int(blob[i + 6 + 8 * k:i + 14 + 8 * k], 16) for k in range(13)]
        namesize, filesize = f[11], f[6]
        name = blob[i + 110:i + 110 + namesize - 1].decode()
        i += 110 + namesize
        i += -i % 4
        data = blob[i:i + filesize]
        i += filesize
        i += -i % 4
        if name == "TRAILER!!!":
            break
        entries["/" + name] = Entry("/" + name, f[1], data, (f[9], f[10]))
    return entries


def entries_for(kernel: KernelInfo, agent: Path) -> list[Entry]:
    entries = [
        Entry("/dev", stat.S_IFDIR | 0o755),
        Entry("/dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        Entry("/dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
        Entry("/proc", stat.S_IFDIR | 0o755),
        Entry("/sys", stat.S_IFDIR | 0o755),
        Entry("/tmp", stat.S_IFDIR | 0o1777),
        Entry("/init", stat.S_IFREG | 0o755, agent.read_bytes()),
    ]
    if kernel.modules:
        entries.append(Entry(MODULE_DIR, stat.S_IFDIR | 0o755))
        for name in kernel.modules:
            entries.append(Entry(f"{MODULE_DIR}/{name}.ko", stat.S_IFREG | 0o644,
                                 kernel.module_path(name).read_bytes()))
    return entries


def ensure_initramfs(kernel: KernelInfo, agent: Path | None = None) -> Path:
    """The initramfs for `kernel` and the current agent, built once and cached by content."""
    agent = agent or native_binary("ak-agent")
    entries = entries_for(kernel, agent)
    digest = hashlib.sha256()
    for e in entries:
        digest.update(e.path.encode() + b"\0" + str(e.mode).encode() + b"\0")
        digest.update(hashlib.sha256(e.data).digest())
    path = data_dir() / "microvm" / "initramfs" / f"{digest.hexdigest()[:24]}.cpio.gz"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    # Fast compression: the kernel inflates it in a few ms, and it is built rarely.
    tmp.write_bytes(gzip.compress(write_newc(entries), compresslevel=1, mtime=0))
    tmp.replace(path)
    return path
