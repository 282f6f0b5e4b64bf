"""Red team, round 8: `run --agent --review` cannot fill the project's disk with a file
that took no room in the agent's copy.

The agent works on a private copy of the project; what it changed is applied back when the
user answers `y` (shown as "Binary or large file ... added") or, with `--apply`, whenever
the agent exits 0. A sparse file costs the agent nothing in the copy (`truncate -s 16T`),
and applying wrote every zero of it into the project. Now the applied file keeps the
holes. (That a sandbox makes sparse files: tests/daemon/test_redteam8_cp_sparse.py.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from agentkernel.agents.review import apply, changes, copy_project

SIZE = 1 << 30


def test_apply_keeps_a_sparse_files_holes(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "README").write_text("hello\n")
    copy = copy_project(project)
    try:
        with (copy / "build.bin").open("wb") as f:  # what the agent leaves: 1 GiB, 2 bytes
            f.truncate(SIZE)
            f.seek(SIZE // 2)
            f.write(b"x")
            f.seek(SIZE - 1)
            f.write(b"y")
        assert (copy / "build.bin").stat().st_blocks * 512 < 1 << 20
        assert apply(project, copy, changes(project, copy)) == []
        out = project / "build.bin"
        st = out.stat()
        assert st.st_size == SIZE
        with out.open("rb") as f:
            f.seek(SIZE // 2 - 1)
            assert f.read(2) == b"\0x"
            f.seek(SIZE - 1)
            assert f.read() == b"y"
        assert st.st_blocks * 512 < 4 << 20, st.st_blocks  # not 1 GiB of zeros
    finally:
        shutil.rmtree(copy.parent, ignore_errors=True)
