"""`create --agent --settings`: which host files are copied, attacked with links."""

from __future__ import annotations

import os
from pathlib import Path

from agentkernel.agents.registry import get
from agentkernel.agents.settings import MAX_FILE, collect


def test_only_documents_never_links_or_sign_ins(tmp_path: Path) -> None:
    home = tmp_path / "home"
    claude = home / ".claude"
    (claude / "skills" / "s").mkdir(parents=True)
    (claude / "CLAUDE.md").write_text("be brief\n")
    (claude / "skills" / "s" / "SKILL.md").write_text("---\nname: s\n---\n")
    (claude / "skills" / "s" / "run.sh").write_text("#!/bin/sh\n")
    (claude / "skills" / "s" / "run.sh").chmod(0o755)
    (claude / "settings.json").write_text('{"env": {"ANTHROPIC_API_KEY": "sk-leak"}}')
    (claude / ".credentials.json").write_text('{"token": "sk-leak"}')
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY\n")
    (claude / "skills" / "s" / "leak").symlink_to(secret)
    (claude / "skills" / "linked").symlink_to(tmp_path)  # a linked dir: not walked
    (claude / "agents").symlink_to(tmp_path)  # a listed path that is a link: skipped
    (claude / "skills" / "big.md").write_bytes(b"x" * (MAX_FILE + 1))
    found, skipped = collect(get("claude"), home)
    got = {f.path: f for f in found}
    assert set(got) == {".claude/CLAUDE.md", ".claude/skills/s/SKILL.md",
                        ".claude/skills/s/run.sh"}, got
    assert got[".claude/skills/s/run.sh"].mode == 0o755
    assert all(b"sk-leak" not in f.data and b"PRIVATE" not in f.data for f in found)
    assert skipped == [".claude/skills/big.md: not a regular file of at most 1 MiB"], skipped
    assert not os.path.exists(home / ".claude" / "commands")
