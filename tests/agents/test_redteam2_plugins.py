"""Outside review, round 2: `plugin install --scope project` in a repository that plants
symlinks (a cloned repo, or one another local user owns) must write inside the project only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT
from sandbox_helpers import ak

EXE = str(ROOT / ".venv" / "bin" / "agentkernel")


def _env(home: Path) -> dict[str, str]:
    # No agent CLI on PATH: our own file merge writes the config.
    return {"HOME": str(home), "PATH": "/usr/bin:/bin", "NO_COLOR": "1",
            "AGENTKERNEL_EXE": EXE}


@pytest.mark.parametrize(("target", "planted", "written"), [
    # a directory of the project's config is a symlink to a dir outside
    ("gemini", ".gemini", "settings.json"),
    ("codex", ".codex", "config.toml"),
    # the config file itself is a dangling symlink to a file outside
    ("opencode", "opencode.json", None),
    ("claude", ".mcp.json", None),
    # Claude Code's skill (written where its CLI is missing): .claude is a symlink
    ("claude", ".claude", "skills/agentkernel-sandbox/SKILL.md"),
])
def test_project_scope_does_not_follow_symlinks_out(tmp_path: Path, target: str, planted: str,
                                                    written: str | None) -> None:
    home = tmp_path / "home"
    project = tmp_path / "repo"
    outside = tmp_path / "victim"
    home.mkdir()
    project.mkdir()
    if written is None:
        victim = outside / "created-by-install"
        outside.mkdir()
        (project / planted).symlink_to(victim)
    else:
        victim = outside / written
        (project / planted).symlink_to(outside, target_is_directory=True)
    r = ak("plugin", "install", target, "--scope", "project", cwd=project, env=_env(home))
    assert not victim.exists(), f"plugin install wrote {victim} outside the project:\n" \
                                f"{r.stdout}{r.stderr}"
    assert r.returncode != 0 and "symlink" in (r.stdout + r.stderr), r.stdout + r.stderr


def test_project_scope_still_writes_plain_files(tmp_path: Path) -> None:
    home = tmp_path / "home"
    project = tmp_path / "repo"
    home.mkdir()
    project.mkdir()
    r = ak("plugin", "install", "gemini", "--scope", "project", cwd=project, env=_env(home))
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads((project / ".gemini" / "settings.json").read_text())
    assert doc["mcpServers"]["agentkernel"]["command"] == EXE
    gone = ak("plugin", "uninstall", "gemini", "--scope", "project", cwd=project,
              env=_env(home))
    assert gone.returncode == 0, gone.stdout + gone.stderr


def test_project_scope_uninstall_does_not_unlink_outside(tmp_path: Path) -> None:
    """uninstall removed the skill file wherever `.claude` pointed, and its dir."""
    home = tmp_path / "home"
    project = tmp_path / "repo"
    outside = tmp_path / "victim"
    home.mkdir()
    project.mkdir()
    skill = outside / "skills" / "agentkernel-sandbox" / "SKILL.md"
    skill.parent.mkdir(parents=True)
    skill.write_text("someone else's file\n")
    (project / ".claude").symlink_to(outside, target_is_directory=True)
    r = ak("plugin", "uninstall", "claude", "--scope", "project", cwd=project, env=_env(home))
    assert skill.exists(), f"uninstall removed {skill}:\n{r.stdout}{r.stderr}"
