"""The agent's user inside a `run --agent` sandbox: not uid 0, its own HOME, the caller's
files as its own and nobody else's, no way into the in-sandbox agent, as root and as an
ordinary user.

The agent binary is a stand-in (a shell script that runs its arguments) installed where
`agents install claude` puts Claude Code: the real CLI is planned and started exactly
as for the real agent (tests/agents/test_run_agent.py drives that one), and the probe
runs as what the agent runs as.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox_helpers import SYSTEM_PYTHON, ak, ak_as_user

NOBODY = 65534
OTHER = 12345  # a host user who is neither the caller nor mapped into the sandbox
PROBE = """
echo "uid=$(id -u) gid=$(id -g) home=$HOME homeowner=$(stat -c %u:%g "$HOME")"
grep CapEff /proc/self/status
cat /proc/1/environ >/dev/null 2>&1 && echo agent-env-read || echo agent-env-denied
head -c1 /proc/1/mem >/dev/null 2>&1 && echo agent-mem-read || echo agent-mem-denied
echo x > ./mine && stat -c "mine=%u:%g" ./mine
stat -c "theirs=%u" ./theirs
echo y >> ./theirs 2>/dev/null && echo theirs-written || echo theirs-denied
touch /etc/agent-was-here 2>/dev/null && echo etc-written || echo etc-denied
touch /tmp/t && echo tmp-ok
"""


@pytest.fixture
def base() -> Iterator[Path]:
    """A dir every user may cross (not /tmp's pytest dirs, which are root's 0700)."""
    if shutil.which("bwrap") is None:
        pytest.skip("needs bubblewrap")
    path = Path(tempfile.mkdtemp(prefix="ak-agentuser-", dir="/var/lib"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _setup(base: Path, owner: int) -> tuple[Path, Path]:
    """A data dir with the stand-in agent and a project with a file of another user's,
    both owned by `owner`."""
    data, project = base / "data", base / "project"
    binary = data / "agents" / "claude" / "node_modules" / ".bin" / "claude"
    binary.parent.mkdir(parents=True)
    binary.write_text('#!/bin/sh\nexec "$@"\n')
    binary.chmod(0o755)
    project.mkdir()
    (project / "theirs").write_text("another user's\n")
    os.chown(project / "theirs", OTHER, OTHER)
    for path in (base, data, project):
        for p in (path, *path.rglob("*")):
            if p.name != "theirs":
                os.lchown(p, owner, owner)
    return data, project


def _check(out: str, err: str, code: int, project: Path, owner: int) -> None:
    assert code == 0, (out, err)
    lines = out.splitlines()
    assert lines[0].startswith("uid=1000 gid=1000 home=/home/agent homeowner=1000:1000"), out
    assert lines[1].split() == ["CapEff:", "0000000000000000"], out
    for expected in ("agent-env-denied", "agent-mem-denied", "mine=1000:1000",
                     f"theirs={NOBODY}", "theirs-denied", "tmp-ok"):
        assert expected in lines, (expected, out, err)
    # Root-started, the sandbox's root is another id than the agent's: its copy-on-write
    # /etc is not the agent's to change. An ordinary user's sandbox has one id, so the
    # agent owns what the sandbox's root does there (its private layers; never the host).
    assert ("etc-denied" if owner == 0 else "etc-written") in lines, out
    assert not Path("/etc/agent-was-here").exists()
    st = (project / "mine").stat()
    assert (st.st_uid, st.st_gid) == (owner, owner)  # the caller's, on the host
    assert (project / "theirs").read_text() == "another user's\n"


def test_the_agent_is_not_root_as_root(base: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    data, project = _setup(base, 0)
    r = ak("run", "-q", "--agent", "claude", "--", "sh", "-c", PROBE, cwd=project,
           env={"AGENTKERNEL_HOME": str(data), "AGENTKERNEL_NO_DAEMON": "1"}, timeout=120)
    _check(r.stdout, r.stderr, r.returncode, project, 0)


def test_the_agent_is_not_root_as_an_ordinary_user(base: Path) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None or \
            not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip("needs root (to become nobody), setpriv and the system's python3")
    data, project = _setup(base, NOBODY)
    proc = ak_as_user(NOBODY, base, "run", "-q", "--agent", "claude", "--", "sh", "-c", PROBE,
                      cwd=project, env={"AGENTKERNEL_HOME": str(data),
                                        "AGENTKERNEL_NO_DAEMON": "1"})
    out, err = proc.communicate(timeout=150)
    _check(out, err, proc.returncode, project, NOBODY)


def _kept(run: Callable[..., tuple[str, str, int]], project: Path) -> None:
    """`create --agent` through a daemon of the caller's: the kept sandbox's commands run
    as the agent's user, the project's files are the caller's, and its HOME survives a
    stop and start."""
    assert run("daemon", "start")[2] == 0
    try:
        out, err, code = run("create", "dev", "--agent", "claude", "--dir", str(project))
        assert code == 0, (out, err)
        out, err, code = run("exec", "dev", "--", "sh", "-c",
                             PROBE + 'echo kept > "$HOME/mark"')
        _check(out, err, code, project, os.stat(project).st_uid)
        assert run("stop", "dev")[2] == 0 and run("start", "dev")[2] == 0
        out, err, code = run("exec", "dev", "--", "sh", "-c", 'id -u; cat "$HOME/mark"')
        assert out.split() == ["1000", "kept"], (out, err)
    finally:
        run("remove", "dev")
        run("daemon", "stop")


def _as_root(base: Path) -> tuple[Callable[..., tuple[str, str, int]], Path]:
    """The CLI as root with its own data and runtime dirs (no autostart, no key), for
    `_kept` and `_kept_gvisor`; and the project."""
    data, project = _setup(base, 0)
    (base / "run").mkdir(mode=0o700)
    env = {"AGENTKERNEL_HOME": str(data), "AGENTKERNEL_RUNTIME_DIR": str(base / "run"),
           "AGENTKERNEL_DAEMON_AUTOSTART": "0", "ANTHROPIC_API_KEY": ""}

    def run(*args: str) -> tuple[str, str, int]:
        r = ak(*args, cwd=project, env=env, timeout=120)
        return r.stdout, r.stderr, r.returncode

    return run, project


def _as_nobody(base: Path) -> tuple[Callable[..., tuple[str, str, int]], Path]:
    """The CLI as host nobody with its own data dir (no key), for `_kept` and
    `_kept_gvisor`; and the project."""
    data, project = _setup(base, NOBODY)

    def run(*args: str) -> tuple[str, str, int]:
        proc = ak_as_user(NOBODY, base, *args, cwd=project,
                          env={"AGENTKERNEL_HOME": str(data), "ANTHROPIC_API_KEY": ""})
        out, err = proc.communicate(timeout=150)
        return out, err, proc.returncode

    return run, project


def test_a_kept_agent_sandbox_is_not_root_as_root(base: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    run, project = _as_root(base)
    _kept(run, project)


def test_a_kept_agent_sandbox_is_not_root_as_an_ordinary_user(base: Path) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None or \
            not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip("needs root (to become nobody), setpriv and the system's python3")
    run, project = _as_nobody(base)
    _kept(run, project)


def test_a_new_install_is_not_served_by_warm_sandboxes_of_the_old(base: Path) -> None:
    """`agents install` puts a new install in place (agents/install._swap): the daemon's
    warm agent sandboxes, bound to the old one, serve no run after it."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    from agentkernel.agents.install import _swap

    data, project = _setup(base, 0)
    final = data / "agents" / "claude"
    (base / "run").mkdir(mode=0o700)
    (base / "daemon.toml").write_text("[daemon]\nadhoc_min = 1\nadhoc_max = 2\npools = []\n")
    env = {"AGENTKERNEL_HOME": str(data), "AGENTKERNEL_RUNTIME_DIR": str(base / "run"),
           "AGENTKERNEL_DAEMON_CONFIG": str(base / "daemon.toml"),
           "AGENTKERNEL_NO_DAEMON": "", "AGENTKERNEL_DAEMON_AUTOSTART": "0",
           "ANTHROPIC_API_KEY": ""}

    def install(version: str) -> None:
        staging = final.with_name(f".claude.new-{version}")
        binary = staging / "node_modules" / ".bin" / "claude"
        binary.parent.mkdir(parents=True)
        binary.write_text(f'#!/bin/sh\necho install={version}\nexec "$@"\n')
        binary.chmod(0o755)
        _swap(staging, final)

    def run() -> str:
        r = ak("run", "-v", "--agent", "claude", "--", "true", cwd=project, env=env,
               timeout=120)
        assert r.returncode == 0 and "via daemon" in r.stderr, (r.stdout, r.stderr)
        return r.stdout.strip()

    assert ak("daemon", "start", env=env).returncode == 0
    try:
        install("v1")
        assert run() == "install=v1"
        assert run() == "install=v1"  # (served warm: the key's sandbox made ahead)
        install("v2")
        assert run() == "install=v2"
        assert run() == "install=v2"
    finally:
        ak("daemon", "stop", env=env)


SETTINGS_PROBE = """
find "$HOME" -type f | sort
stat -c "owner=%u:%g" "$HOME/.claude/CLAUDE.md"
grep -rl -e sk-leak -e PRIVATE "$HOME" /tmp "$PWD" 2>/dev/null || echo clean
"""


def _host_settings(home: Path, owner: int) -> None:
    """A host HOME with Claude Code instructions and a skill (copied), its settings file
    and sign-in (never copied), and a skill's link to a private file (never followed)."""
    claude = home / ".claude"
    (claude / "skills" / "s").mkdir(parents=True)
    (claude / "CLAUDE.md").write_text("be brief\n")
    (claude / "skills" / "s" / "SKILL.md").write_text("---\nname: s\n---\n")
    (claude / "settings.json").write_text('{"env": {"ANTHROPIC_API_KEY": "sk-leak"}}')
    (claude / ".credentials.json").write_text("sk-leak")
    (home / "id_rsa").write_text("PRIVATE\n")
    (claude / "skills" / "s" / "leak").symlink_to(home / "id_rsa")
    for p in (home / "id_rsa", claude, *claude.rglob("*")):
        os.lchown(p, owner, owner)


def _check_settings(out: str, err: str, code: int) -> None:
    assert code == 0, (out, err)
    assert out.splitlines() == [
        "/home/agent/.claude/CLAUDE.md", "/home/agent/.claude/skills/s/SKILL.md",
        "owner=1000:1000", "clean"], (out, err)


@pytest.mark.parametrize("daemon", [False, True])
def test_run_agent_settings_as_root(base: Path, daemon: bool) -> None:
    """`run --agent --settings`, in-process and through a warm sandbox of the daemon: the
    instructions and skill are in the agent's fresh HOME as its files; no settings file,
    sign-in or link target is anywhere inside."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    data, project = _setup(base, 0)
    home = base / "home"
    home.mkdir()
    _host_settings(home, 0)
    (base / "run").mkdir(mode=0o700)
    (base / "daemon.toml").write_text("[daemon]\nadhoc_min = 1\nadhoc_max = 2\npools = []\n")
    env = {"AGENTKERNEL_HOME": str(data), "AGENTKERNEL_RUNTIME_DIR": str(base / "run"),
           "AGENTKERNEL_DAEMON_CONFIG": str(base / "daemon.toml"), "HOME": str(home),
           "AGENTKERNEL_NO_DAEMON": "" if daemon else "1",
           "AGENTKERNEL_DAEMON_AUTOSTART": "0", "ANTHROPIC_API_KEY": ""}
    if daemon:
        assert ak("daemon", "start", env=env).returncode == 0
    try:
        r = ak("run", "-v", "--agent", "claude", "--settings", "--", "sh", "-c",
               SETTINGS_PROBE, cwd=project, env=env, timeout=120)
        _check_settings(r.stdout, r.stderr, r.returncode)
        assert ("via daemon" in r.stderr) == daemon, r.stderr
        assert "agent user: uid 1000, gid 1000, HOME /home/agent" in r.stderr, r.stderr
        # Without --settings the HOME is empty of them (the warm sandbox had none).
        r = ak("run", "--agent", "claude", "--", "sh", "-c", 'ls -A "$HOME" | wc -l',
               cwd=project, env=env, timeout=120)
        assert r.stdout.strip() == "0", (r.stdout, r.stderr)
    finally:
        if daemon:
            ak("daemon", "stop", env=env)


def test_run_agent_settings_as_an_ordinary_user(base: Path) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None or \
            not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip("needs root (to become nobody), setpriv and the system's python3")
    data, project = _setup(base, NOBODY)
    _host_settings(base, NOBODY)  # ak_as_user's HOME is `base`
    proc = ak_as_user(NOBODY, base, "run", "--agent", "claude", "--settings", "--", "sh",
                      "-c", SETTINGS_PROBE, cwd=project,
                      env={"AGENTKERNEL_HOME": str(data), "AGENTKERNEL_NO_DAEMON": "1",
                           "ANTHROPIC_API_KEY": ""})
    out, err = proc.communicate(timeout=150)
    _check_settings(out, err, proc.returncode)


GVISOR_PROBE = """
echo "uid=$(id -u) gid=$(id -g) home=$HOME $(find "$HOME" -maxdepth 0 -printf homeowner=%U:%G)"
grep CapEff /proc/self/status
head -c1 /proc/1/mem >/dev/null 2>&1 && echo agent-mem-read || echo agent-mem-denied
echo x > ./mine && find . -name mine -printf "mine=%U:%G\\n"
find . -name theirs -printf "theirs=%U\\n"
echo y >> ./theirs 2>/dev/null && echo theirs-written || echo theirs-denied
touch /tmp/t && echo tmp-ok
"""


def test_the_agent_is_not_root_on_gvisor_as_root(base: Path) -> None:
    """gVisor started by root: the agent is uid 1000 without capabilities; the project is
    an id-mapped mount of the caller as 1000 (its writes land as the caller's, another
    owner's file is nobody's and not writable). (`find -printf`: this runsc's statx
    fails for coreutils' `stat`.)"""
    from sandbox_helpers import backend_available

    if os.geteuid() != 0 or not backend_available("gvisor"):
        pytest.skip("needs root and the gvisor backend")
    data, project = _setup(base, 0)
    r = ak("run", "-q", "--agent", "claude", "-B", "gvisor", "--", "sh", "-c", GVISOR_PROBE,
           cwd=project, env={"AGENTKERNEL_HOME": str(data), "AGENTKERNEL_NO_DAEMON": "1"},
           timeout=120)
    _check_gvisor(r.stdout, r.stderr, r.returncode, project, 0)


def _check_gvisor(out: str, err: str, code: int, project: Path, owner: int) -> None:
    assert code == 0, (out, err)
    lines = out.splitlines()
    assert lines[0] == "uid=1000 gid=1000 home=/home/agent homeowner=1000:1000", out
    assert lines[1].split() == ["CapEff:", "0000000000000000"], out
    # (gVisor's /proc/PID/environ is 0444 for every task: the in-sandbox agent's holds
    # only PATH. Its memory is closed to its commands, as on Linux.)
    for expected in ("agent-mem-denied", "mine=1000:1000", f"theirs={NOBODY}",
                     "theirs-denied", "tmp-ok"):
        assert expected in lines, (expected, out, err)
    st = (project / "mine").stat()
    assert (st.st_uid, st.st_gid) == (owner, owner)  # the caller's, on the host
    assert (project / "theirs").read_text() == "another user's\n"



def test_the_agent_is_not_root_on_gvisor_as_an_ordinary_user(base: Path) -> None:
    """Rootless runsc maps one host id (the caller's, as gVisor's root): the agent is
    still uid 1000, through a user namespace of its own below gVisor's that shows that
    root as 1000 (`ak-agent --user-ns`): the project is its own, what it writes lands as
    the caller's on the host, another owner's file stays nobody's and closed to it."""
    from sandbox_helpers import backend_available

    if os.geteuid() != 0 or shutil.which("setpriv") is None or \
            not os.access(SYSTEM_PYTHON, os.X_OK) or not backend_available("gvisor"):
        pytest.skip("needs root (to become nobody), setpriv, the system's python3, gvisor")
    data, project = _setup(base, NOBODY)
    proc = ak_as_user(NOBODY, base, "run", "-q", "--agent", "claude", "-B", "gvisor", "--",
                      "sh", "-c", GVISOR_PROBE, cwd=project,
                      env={"AGENTKERNEL_HOME": str(data), "AGENTKERNEL_NO_DAEMON": "1"})
    out, err = proc.communicate(timeout=150)
    _check_gvisor(out, err, proc.returncode, project, NOBODY)


def _kept_gvisor(run: Callable[..., tuple[str, str, int]], project: Path, owner: int) -> None:
    """`create --agent -B gvisor` through a daemon of the caller's: every exec in the kept
    sandbox runs as the agent's user (gVisor keeps its layers in memory: no stop/start)."""
    assert run("daemon", "start")[2] == 0
    try:
        out, err, code = run("create", "dev", "--agent", "claude", "-B", "gvisor",
                             "--dir", str(project))
        assert code == 0, (out, err)
        out, err, code = run("exec", "dev", "--", "sh", "-c", GVISOR_PROBE)
        _check_gvisor(out, err, code, project, owner)
        out, err, code = run("exec", "dev", "--", "sh", "-c", 'echo kept > "$HOME/mark"; '
                             'id -u; cat "$HOME/mark"')
        assert out.split() == ["1000", "kept"], (out, err)
    finally:
        run("remove", "dev")
        run("daemon", "stop")


def test_a_kept_gvisor_agent_sandbox_is_not_root_as_root(base: Path) -> None:
    from sandbox_helpers import backend_available

    if os.geteuid() != 0 or not backend_available("gvisor"):
        pytest.skip("needs root and the gvisor backend")
    run, project = _as_root(base)
    _kept_gvisor(run, project, 0)


def test_a_kept_gvisor_agent_sandbox_is_not_root_as_an_ordinary_user(base: Path) -> None:
    from sandbox_helpers import backend_available

    if os.geteuid() != 0 or shutil.which("setpriv") is None or \
            not os.access(SYSTEM_PYTHON, os.X_OK) or not backend_available("gvisor"):
        pytest.skip("needs root (to become nobody), setpriv, the system's python3, gvisor")
    run, project = _as_nobody(base)
    _kept_gvisor(run, project, NOBODY)
