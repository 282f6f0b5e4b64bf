"""Read-only binds by descriptor (backends.base.pin_sources): what is bound is what was
checked, whatever is renamed into the host path afterwards."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agentkernel.backends.base import pin_sources
from agentkernel.errors import SandboxError


def test_the_bound_file_is_the_one_opened(tmp_path: Path) -> None:
    src = tmp_path / ".git"
    src.mkdir()
    (src / "config").write_text("mine\n")
    fds: list[int] = []
    try:
        [fd] = pin_sources(((str(src), "/w/.git"),), fds)
        src.rename(tmp_path / "away")  # another sandbox swaps a link to a secret in
        src.symlink_to("/etc")
        assert os.listdir(f"/proc/self/fd/{fd}") == ["config"]
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_link_or_special_file_is_not_bound(tmp_path: Path, kind: str) -> None:
    src = tmp_path / ".git"
    if kind == "symlink":
        src.symlink_to(tmp_path)
    else:
        os.mkfifo(src)
    fds: list[int] = []
    with pytest.raises(SandboxError):
        pin_sources(((str(src), "/w/.git"),), fds)
    for fd in fds:
        os.close(fd)
