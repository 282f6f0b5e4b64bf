"""An agent's project repository shown read-only: its `.git` holds what the host's own git
runs (config's core.fsmonitor at every `git status`, shell prompts included; hooks;
core.hooksPath), so the agent may edit the project's files but not its repository."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import UsageError


def git_pins(workspace: Path, inside: str) -> tuple[tuple[str, str], ...]:
    """The read-only binds (host path, in-sandbox path) that pin `workspace`'s `.git` (a
    directory, or a worktree's or submodule's file naming one) at the project's place
    `inside`: a mount point, so the agent can neither change it nor rename it away and
    put its own there. None where the project has no `.git`."""
    path = workspace / ".git"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return ()
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        kind = "symbolic link" if stat.S_ISLNK(st.st_mode) else "special file"
        raise UsageError(f"{path} is a {kind}: an agent's sandbox shows a project's .git "
                         "read-only (its config and hooks run on the host) and cannot pin "
                         "this one; make it the directory or file git makes")
    return ((str(path), f"{inside.rstrip('/')}/.git"),)
