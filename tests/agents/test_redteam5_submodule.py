"""Outside review, round 5: a submodule's work tree is the agent's, and the host's git
runs in it from the top of the user's own repository.

`run --agent` pins the project's `.git` read-only (agents/gitpin), so the agent cannot
set `core.fsmonitor` in it. But `git status` at the top of a repository with a populated
submodule runs `git status` inside that submodule, whose repository is whatever its
work tree's `.git` names: the agent moves the submodule's dir away and `git init`s one
of its own there (or rewrites the `gitdir:` line of its `.git` file), and the user's next
`git status` in their own, pinned repository runs the agent's `core.fsmonitor` on the
host. The documented open hole (a repository the agent makes) needed the user to enter
that directory; this one does not. Open: pinning `sub/.git` is not enough (the agent
renames `sub` or any dir above it, which carries the mount away); every dir on the way to
each gitlink of the index would have to be a mount point.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from test_agent_git_pin import _repo, _run, _skip_unless
from test_agent_user import _setup, base  # noqa: F401 - `base` is a fixture

MARK = Path("/var/tmp/ak-rt5-submodule-pwned")


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "open: the host's `git status` at the top of the user's pinned repository recurses "
    "into a submodule's work tree, whose .git the agent replaces (see the module doc)"))
def test_a_submodule_the_agent_replaces_is_not_run_by_the_hosts_git(base: Path  # noqa: F811
                                                                   ) -> None:
    _skip_unless("namespaces", 0)
    MARK.unlink(missing_ok=True)
    data, project = _setup(base, 0)
    _repo(project, 0)
    upstream = base / "upstream"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "safe.directory=*"]
    subprocess.run(["git", "init", "-q", str(upstream)], check=True, timeout=60)
    subprocess.run([*git, "-C", str(upstream), "commit", "-q", "--allow-empty", "-m", "s"],
                   check=True, timeout=60)
    subprocess.run([*git, "-c", "protocol.file.allow=always", "-C", str(project),
                    "submodule", "-q", "add", str(upstream), "sub"],
                   check=True, timeout=60, capture_output=True)
    subprocess.run([*git, "-C", str(project), "commit", "-q", "-m", "t"], check=True,
                   timeout=60)
    plant = ("mv sub sub.away && mkdir sub && git -C sub init -q && printf '[core]\\n"
             f"\\tfsmonitor = \"touch {MARK}; false\"\\n' >> sub/.git/config && echo planted")
    out, err, code = _run(base, 0, project, data, "run", "-q", "--agent", "claude", "--",
                          "sh", "-c", plant)
    assert code == 0 and "planted" in out, (out, err)
    try:
        # The user's own repository, at its top: the one .git the pin promises.
        subprocess.run(["git", "status"], cwd=project, capture_output=True, timeout=60,
                       check=False)
        assert not MARK.exists(), "the sandbox's command ran on the host"
    finally:
        MARK.unlink(missing_ok=True)
