"""`run --agent --review`: the diff of a copy and its application, attacked with links."""

from __future__ import annotations

import io
import os
from pathlib import Path

from agentkernel.agents.review import Change, apply, changes, copy_project, show


def _tree(root: Path) -> None:
    (root / "src").mkdir(parents=True)
    (root / "src" / "a.py").write_text("print('a')\n")
    (root / "gone.txt").write_text("bye\n")
    (root / "old").mkdir()
    (root / "old" / "x").write_text("x\n")


def test_diff_and_apply(tmp_path: Path) -> None:
    project = tmp_path / "p"
    _tree(project)
    copy = copy_project(project)
    try:
        (copy / "src" / "a.py").write_text("print('b')\n")
        (copy / "gone.txt").unlink()
        (copy / "old" / "x").unlink()
        (copy / "old").rmdir()
        (copy / "new" / "deep").mkdir(parents=True)
        (copy / "new" / "deep" / "n.txt").write_text("n\n")
        (copy / "tool.sh").write_text("#!/bin/sh\n")
        (copy / "tool.sh").chmod(0o755)
        (copy / "blob").write_bytes(b"\0\1")
        found = changes(project, copy)
        assert {(c.path, c.kind) for c in found} == {
            ("src/a.py", "modified"), ("gone.txt", "deleted"), ("old", "deleted"),
            ("old/x", "deleted"), ("new", "added"), ("new/deep", "added"),
            ("new/deep/n.txt", "added"), ("tool.sh", "added"), ("blob", "added")}
        out = io.StringIO()
        show(project, copy, found, out)
        text = out.getvalue()
        assert "-print('a')" in text and "+print('b')" in text, text
        assert "Binary or large file blob added" in text, text
        assert apply(project, copy, found) == []
        assert changes(project, copy) == []  # the project is now the copy
        assert os.access(project / "tool.sh", os.X_OK)
    finally:
        import shutil

        shutil.rmtree(copy.parent)


def test_links_never_carry_a_write_outside(tmp_path: Path) -> None:
    """A link the project has, or one the agent planted, is never followed on apply."""
    outside = tmp_path / "outside"
    outside.mkdir()
    project = tmp_path / "p"
    project.mkdir()
    (project / "l").symlink_to(outside)
    copy = copy_project(project)
    try:
        assert (copy / "l").is_symlink()  # copied as a link, not as what it points to
        # The agent turns the link into a dir with a file: the link is replaced, not used.
        (copy / "l").unlink()
        (copy / "l").mkdir()
        (copy / "l" / "evil").write_text("pwned\n")
        # ... and plants a link of its own pointing outside.
        (copy / "planted").symlink_to("/etc")
        found = changes(project, copy)
        assert apply(project, copy, found) == []
        assert list(outside.iterdir()) == []
        assert (project / "l").is_dir() and not (project / "l").is_symlink()
        assert os.readlink(project / "planted") == "/etc"  # a link, as shown in the diff
        # A change list that would write through a link in the project is refused.
        (project / "m").symlink_to(outside)
        (copy / "m").mkdir()
        (copy / "m" / "evil").write_text("pwned\n")
        skipped = apply(project, copy, [Change("m/evil", "added")])
        assert len(skipped) == 1 and skipped[0].startswith("m/evil"), skipped
        assert list(outside.iterdir()) == []
    finally:
        import shutil

        shutil.rmtree(copy.parent)
