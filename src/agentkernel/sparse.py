"""Files written with their holes: all-zero blocks are skipped (seeked over), not written."""

from __future__ import annotations

import errno
import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # not at run time: `cp` is on the CLI's light import path
    from typing import BinaryIO

BLOCK = 64 * 1024
READ = 1 << 20


def write_sparse(out: BinaryIO, data: bytes) -> None:
    """`data` at `out`'s position, its all-zero `BLOCK`s left as holes. A sparse file costs
    a sandbox nothing (`truncate -s 16T`, no room in any quota); written out as zeros it
    filled the host's disk (round 8). The caller sets the size at the end (`finish`)."""
    for at in range(0, len(data), BLOCK):
        block = data[at:at + BLOCK]
        if block.count(0) == len(block):
            out.seek(len(block), os.SEEK_CUR)
        else:
            out.write(block)


def finish(out: BinaryIO) -> None:
    """Size `out` to its position: a hole at the end is seeked over, never written."""
    out.truncate(out.tell())


def copy_sparse(src: BinaryIO, dst: BinaryIO) -> None:
    """All of `src` (a file) into `dst` with its holes: the source's own holes are skipped
    by SEEK_DATA/SEEK_HOLE without reading them (a 16 TiB sparse file took hours of zeros
    read and compared), its data with `write_sparse`; sized at the end."""
    fd = src.fileno()
    size = os.fstat(fd).st_size
    at = 0
    while at < size:
        try:
            data = os.lseek(fd, at, os.SEEK_DATA)
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # no SEEK_DATA here: all of it is data
                data, hole = at, size
            else:
                break  # nothing but a hole from `at` on
        dst.seek(data)
        while data < hole:
            chunk = os.pread(fd, min(READ, hole - data), data)
            if not chunk:
                break  # shrunk meanwhile: what is there is copied
            write_sparse(dst, chunk)
            data += len(chunk)
        at = hole
    dst.seek(max(size, dst.tell()))
    finish(dst)
