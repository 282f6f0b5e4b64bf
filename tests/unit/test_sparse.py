"""Unit tier for sparse.py: copies keep every byte and leave holes where the source has
them or where its blocks are all zeros."""

from __future__ import annotations

import os
from pathlib import Path

from agentkernel.sparse import BLOCK, copy_sparse


def _copy(tmp_path: Path, src: Path) -> Path:
    out = tmp_path / "out"
    with src.open("rb") as s, out.open("wb") as d:
        copy_sparse(s, d)
    return out


def test_data_holes_and_a_hole_at_the_end(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with src.open("wb") as f:
        f.write(b"head")
        f.seek(5 * BLOCK + 7)
        f.write(b"middle" * 1000)
        f.write(bytes(3 * BLOCK))  # zeros written, not a hole: still left as one
        f.write(b"tail")
        f.truncate(40 * BLOCK + 3)  # a hole at the end
    out = _copy(tmp_path, src)
    assert out.read_bytes() == src.read_bytes()
    assert out.stat().st_blocks <= src.stat().st_blocks


def test_a_huge_sparse_file_is_not_read_through(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with src.open("wb") as f:
        f.truncate(1 << 40)  # 1 TiB of hole: reading it would take many minutes
        f.seek(1 << 39)
        f.write(b"x")
    out = _copy(tmp_path, src)
    assert out.stat().st_size == 1 << 40
    assert out.stat().st_blocks * 512 < 1 << 20
    with out.open("rb") as f:
        f.seek(1 << 39)
        assert f.read(1) == b"x"


def test_empty_and_small_files(tmp_path: Path) -> None:
    for data in (b"", b"a", bytes(10), os.urandom(BLOCK + 1)):
        src = tmp_path / "src"
        src.write_bytes(data)
        assert _copy(tmp_path, src).read_bytes() == data
