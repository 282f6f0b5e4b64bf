"""Files written with their holes: all-zero blocks are skipped (seeked over), not written."""

from __future__ import annotations

import os
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
    """All of `src` into `dst` with `write_sparse`, sized at the end."""
    while chunk := src.read(READ):
        write_sparse(dst, chunk)
    finish(dst)
