"""Pool keys of read-only binds (daemon.runs.install_ids): an agent's install is stale when
changed in place or replaced; a project's pinned .git only when replaced (the user's own
git changes its ctime at every command)."""

from __future__ import annotations

import os
from pathlib import Path

from agentkernel.daemon.runs import install_ids


def test_a_git_command_does_not_make_warm_agent_sandboxes_stale(tmp_path: Path) -> None:
    git = tmp_path / "project" / ".git"
    git.mkdir(parents=True)
    install = tmp_path / "claude"
    install.mkdir()
    binds = ((str(install), "/run/ak/agents/claude"), (str(git), "/p/.git"))
    before = install_ids(binds)
    (git / "index.lock").touch()
    os.rename(git / "index.lock", git / "index")  # what `git status` does
    assert install_ids(binds)[1] == before[1]
    (install / "new").touch()  # an install changed in place
    assert install_ids(binds)[0] != before[0]
    os.rename(git, tmp_path / "old")
    git.mkdir()  # a new clone
    assert install_ids(binds)[1] != before[1]
