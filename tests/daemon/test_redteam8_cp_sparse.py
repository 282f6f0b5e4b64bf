"""Red team, round 8: `cp` out of a sandbox cannot fill the host's disk with a file that
takes no room in the sandbox.

A sparse file costs its sandbox nothing (`truncate -s 16T` on its disk or tmpfs, within
any quota); `cp` wrote every zero of it on the host: 4 KiB in the sandbox became 256 MiB
on the host here, 16 TiB were one `truncate` away. The sandbox chooses what a path the user
copies holds (a results file, a build output). Now the host file keeps the holes: what
takes room on the host is what took room in the sandbox (as the snapshot's tar does).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Daemon

HOST = ("-i", "host", "-B", "namespaces")
SIZE = 256 << 20


@pytest.fixture
def box(daemon: Daemon) -> Iterator[str]:
    name = f"sparse-{secrets.token_hex(3)}"
    r = daemon.ak("create", name, *HOST)
    assert r.returncode == 0, r.stderr
    yield name
    daemon.ak("remove", name)


def test_cp_out_keeps_a_sparse_files_holes(daemon: Daemon, box: str, tmp_path: Path) -> None:
    make = (f"truncate -s {SIZE} /root/results && printf middle | dd of=/root/results "
            f"bs=1 seek={SIZE // 2} conv=notrunc 2>/dev/null && printf end >> /root/results")
    r = daemon.ak("exec", box, "--", "sh", "-c", make)
    assert r.returncode == 0, r.stderr
    dest = tmp_path / "results"
    r = daemon.ak("cp", f"{box}:/root/results", str(dest), timeout=300)
    assert r.returncode == 0, r.stderr
    st = dest.stat()
    assert st.st_size == SIZE + 3  # the same file,
    with dest.open("rb") as f:
        f.seek(SIZE // 2)
        assert f.read(6) == b"middle"
        f.seek(SIZE)
        assert f.read() == b"end"
        f.seek(SIZE // 2 - 4096)
        assert f.read(4096) == bytes(4096)
    assert st.st_blocks * 512 < 4 << 20, st.st_blocks  # taking what it took inside
