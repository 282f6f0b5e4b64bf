"""Outside review, round 4 (open): an agent's project is read-write, its `.git` with it.

`run --agent` shows the project read-write so that the agent can edit it, and what it
writes lands as the caller's. That includes `.git/config`: `core.fsmonitor` names a
command that the user's own `git status` on the host runs (shell prompts run it at every
prompt), and `core.hooksPath`, `.git/hooks/*`, a submodule's config under `.git/modules`,
or a gitlink the agent adds to the index pointing at a config of its own do the same at
other git commands. The sandbox then reached host code execution as the user through the
next git command, without the user running anything the agent wrote.

Now the project's `.git` is bound read-only over itself (agents/gitpin.py): the agent
edits, the user commits. The real Claude Code, told by the suite's fake model to write the
line, in a real sandbox; the host's own git must not run it. (A repository the agent makes
itself stays open: test_agent_git_pin.py.)
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import AGENTS_HOME, REAL_KEY, FakeApi, serving_fake_api  # tests/agents/
from sandbox_helpers import ak

MARK = Path("/var/tmp/ak-rt4-fsmonitor-ran")
WRITE = ("printf '[core]\\n\\tfsmonitor = \"touch " + str(MARK) + "; false\"\\n' "
         ">> .git/config; echo fake-model-done")


@pytest.fixture(scope="module")
def config_api() -> Iterator[FakeApi]:
    with serving_fake_api(WRITE) as api:
        yield api


def test_an_agent_cannot_plant_a_command_for_the_hosts_git(config_api: FakeApi,
                                                           tmp_path: Path,
                                                           project: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("needs git")
    MARK.unlink(missing_ok=True)
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    home = tmp_path / "data"
    home.mkdir()
    (home / "agents").symlink_to(AGENTS_HOME / "agents")
    env = {"AGENTKERNEL_HOME": str(home), "AGENTKERNEL_NO_DAEMON": "1",
           "AGENTKERNEL_EGRESS_UPSTREAM_CA": str(config_api.ca), "ANTHROPIC_API_KEY": REAL_KEY}
    try:
        r = ak("run", "--agent", "claude", *config_api.add_hosts(), "--", "-p", "go",
               "--dangerously-skip-permissions", cwd=project, timeout=240, env=env)
        assert r.returncode == 0, (r.stdout, r.stderr)
        # The user, later, on the host.
        subprocess.run(["git", "status"], cwd=project, capture_output=True, timeout=60,
                       check=False)
        assert not MARK.exists(), "the sandbox's command ran on the host"
    finally:
        MARK.unlink(missing_ok=True)
