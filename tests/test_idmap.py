"""Unit tier for idmap: the host range, and where a staged runtime finds host paths."""

from __future__ import annotations

import pytest

from agentkernel import idmap
from agentkernel.errors import SandboxError
from agentkernel.idmap import Staged


def test_staged_paths_use_the_longest_prefix() -> None:
    s = Staged({"/": "/S/0", "/a/b": "/S/1", "/a": "/S/2"}, [])
    assert s.translate("/") == "/S/0"
    assert s.translate("/root") == "/S/0/root"
    assert s.translate("/a") == "/S/2"
    assert s.translate("/a/b/c") == "/S/1/c"
    assert s.translate("/a/bc") == "/S/2/bc"  # a name prefix is not a path prefix


def test_unstaged_path_is_refused() -> None:
    with pytest.raises(SandboxError):
        Staged({"/a": "/S/0"}, []).translate("/b")


def test_subid_entry_sets_the_range(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    sub = tmp_path / "subuid"
    sub.write_text("alice:100000:65536\nagentkernel:200000:65536\n")
    assert idmap._subid_start(str(sub)) == (200000, 65536)
    assert idmap._subid_start(str(tmp_path / "missing")) is None


def test_default_range_is_far_from_host_accounts() -> None:
    rng = idmap.host_range()
    assert min(rng.uid, rng.gid) >= 65536 and rng.size >= 1
