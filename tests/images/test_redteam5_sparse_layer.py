"""Outside review, round 5: a layer's sparse entries count at their full size, and their
holes stay holes.

A GNU sparse entry (`tar --sparse`) stores only its data; Python's tarfile hands its holes
back as zeros. The layer's limit counted the tar stream's bytes, so a layer of 10 KiB
unpacked to as many GiB of zeros as it declared (each entry up to the 16 GiB entry limit,
up to two million entries: only the free-space claim stopped it, within an entry of a
full disk). Now every regular file's size counts toward `max_layer_bytes`, and a block of
zeros is left a hole. Attacked with layers the real GNU tar makes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agentkernel.images.unpack import LayerError, Limits, unpack_layer

pytestmark = pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")

MIB = 1 << 20


def _sparse_layer(tmp: Path, files: int, size: int) -> Path:
    src = tmp / "src"
    src.mkdir()
    for i in range(files):
        with open(src / f"f{i}", "wb") as f:
            f.truncate(size)
            f.seek(size // 2)
            f.write(b"data in the middle\n")
    layer = tmp / "layer.tar"
    subprocess.run(["tar", "--sparse", "-C", str(src), "-cf", str(layer), "."], check=True,
                   timeout=120)
    assert layer.stat().st_size < MIB  # only the data and the maps are in the stream
    return layer


def test_sparse_entries_count_toward_the_layer_limit(tmp_path: Path) -> None:
    layer = _sparse_layer(tmp_path, files=3, size=64 * MIB)
    with pytest.raises(LayerError, match="more than"):
        unpack_layer(layer, tmp_path / "out", limits=Limits(max_layer_bytes=128 * MIB))


def test_a_sparse_entrys_holes_stay_holes(tmp_path: Path) -> None:
    layer = _sparse_layer(tmp_path, files=2, size=256 * MIB)
    unpack_layer(layer, tmp_path / "out")
    for i in range(2):
        path = tmp_path / "out" / f"f{i}"
        st = os.stat(path)
        assert st.st_size == 256 * MIB
        assert st.st_blocks * 512 < 8 * MIB, "the holes were written as zeros"
        with open(path, "rb") as f:
            f.seek(128 * MIB)
            assert f.read(19) == b"data in the middle\n"
            f.seek(128 * MIB - 4096)
            assert f.read(4096) == bytes(4096)
