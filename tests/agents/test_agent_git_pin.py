"""An agent's project repository is read-only to it: `.git` holds what the host's own git
runs (config's core.fsmonitor at the user's next `git status`, hooks, core.hooksPath), so
the agent edits the project's files and cannot change, remove or replace its `.git`; a
`.git` that is a link is refused before anything starts; nothing of the host's `.git`
reaches the sandbox as a descriptor. Namespaces and gVisor, as root and as an ordinary
user; the stand-in agent of test_agent_user runs the attack as the agent's user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from test_agent_user import NOBODY, _setup, base  # noqa: F401 - `base` is a fixture

from sandbox_helpers import SYSTEM_PYTHON, ak, ak_as_user

ATTACK = r"""
printf '[core]\n\tfsmonitor = "touch /var/tmp/ak-pin-pwned"\n' >> .git/config 2>/dev/null \
  && echo config-written || echo config-denied
mv .git .git-away 2>/dev/null && echo git-moved || echo move-denied
rm -rf .git 2>/dev/null; test -e .git/HEAD && echo git-kept || echo git-gone
mkdir -p .git/hooks 2>/dev/null
echo 'touch /var/tmp/ak-pin-pwned' > .git/hooks/pre-commit 2>/dev/null \
  && echo hook-written || echo hook-denied
for fd in /proc/self/fd/*; do readlink "$fd"; done | grep -q '\.git' && echo fd-leak || echo no-fd
echo edited > edited && echo edit-ok
"""


def _repo(project: Path, owner: int) -> bytes:
    if shutil.which("git") is None:
        pytest.skip("needs git")
    subprocess.run(["git", "init", "-q", str(project)], check=True, timeout=60)
    for p in (project / ".git", *(project / ".git").rglob("*")):
        os.lchown(p, owner, owner)
    return (project / ".git" / "config").read_bytes()


def _check(out: str, err: str, code: int, project: Path, config: bytes) -> None:
    assert code == 0, (out, err)
    lines = out.split()
    for expected in ("config-denied", "move-denied", "git-kept", "hook-denied", "no-fd",
                     "edit-ok"):
        assert expected in lines, (expected, out, err)
    assert (project / ".git" / "config").read_bytes() == config
    assert not (project / ".git" / "hooks" / "pre-commit").exists()
    assert (project / "edited").read_text() == "edited\n"  # the project itself is the agent's
    subprocess.run(["git", "-c", "safe.directory=*", "status"], cwd=project, capture_output=True,
                   timeout=60, check=True)
    assert not Path("/var/tmp/ak-pin-pwned").exists()


def _skip_unless(backend: str, user: int) -> None:
    from sandbox_helpers import backend_available

    if os.geteuid() != 0 or not backend_available(backend):
        pytest.skip(f"needs root and the {backend} backend")
    if user != 0 and (shutil.which("setpriv") is None or not os.access(SYSTEM_PYTHON, os.X_OK)):
        pytest.skip("needs setpriv and the system's python3 to become nobody")


def _run(base_: Path, user: int, project: Path, data: Path, *args: str) -> tuple[str, str, int]:
    env = {"AGENTKERNEL_HOME": str(data), "AGENTKERNEL_NO_DAEMON": "1"}
    if user == 0:
        r = ak(*args, cwd=project, env=env, timeout=120)
        return r.stdout, r.stderr, r.returncode
    proc = ak_as_user(user, base_, *args, cwd=project, env=env)
    out, err = proc.communicate(timeout=150)
    return out, err, proc.returncode


@pytest.mark.parametrize("user", [0, NOBODY], ids=["root", "nobody"])
@pytest.mark.parametrize("backend", ["namespaces", "gvisor"])
def test_the_agent_cannot_change_its_projects_git(base: Path, backend: str,  # noqa: F811
                                                  user: int) -> None:
    _skip_unless(backend, user)
    Path("/var/tmp/ak-pin-pwned").unlink(missing_ok=True)
    data, project = _setup(base, user)
    config = _repo(project, user)
    out, err, code = _run(base, user, project, data, "run", "-q", "--agent", "claude", "-B",
                          backend, "--", "sh", "-c", ATTACK)
    _check(out, err, code, project, config)


@pytest.mark.parametrize("user", [0, NOBODY], ids=["root", "nobody"])
def test_a_git_that_is_a_link_is_refused(base: Path, user: int) -> None:  # noqa: F811
    """A link cannot be pinned where it is (a mount follows it): the agent could replace
    it with a `.git` of its own. Refused before anything starts, saying why."""
    _skip_unless("namespaces", user)
    data, project = _setup(base, user)
    real = base / "elsewhere.git"
    real.mkdir()
    (project / ".git").symlink_to(real)
    os.lchown(project / ".git", user, user)
    out, err, code = _run(base, user, project, data, "run", "-q", "--agent", "claude", "--",
                          "sh", "-c", "echo started")
    assert code == 2 and "started" not in out, (out, err)
    assert ".git is a symbolic link" in err, err


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "open: a repository the agent makes itself (`git init` in a subdir, or in a project "
    "that had none) is the caller's on the host, so git trusts it: its core.fsmonitor runs "
    "at the user's next `git status` there. Only an existing .git is pinned; refusing "
    "entries named .git anywhere needs a filter on every create and rename (--review "
    "shows them)"))
def test_a_repository_the_agent_makes_is_not_run_by_the_hosts_git(base: Path  # noqa: F811
                                                                  ) -> None:
    _skip_unless("namespaces", 0)
    mark = Path("/var/tmp/ak-pin-pwned")
    mark.unlink(missing_ok=True)
    data, project = _setup(base, 0)
    _repo(project, 0)
    plant = ("mkdir sub && git -C sub init -q && printf '[core]\\n\\tfsmonitor = \"touch "
             f"{mark}; false\"\\n' >> sub/.git/config && echo planted")
    out, err, code = _run(base, 0, project, data, "run", "-q", "--agent", "claude", "--",
                          "sh", "-c", plant)
    assert code == 0 and "planted" in out, (out, err)
    try:
        subprocess.run(["git", "status"], cwd=project / "sub", capture_output=True,
                       timeout=60, check=False)
        assert not mark.exists(), "the sandbox's command ran on the host"
    finally:
        mark.unlink(missing_ok=True)
