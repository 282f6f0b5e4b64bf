"""An agent's run as the planner decides it and the daemon's pool keys it: no sandbox.

`run --agent` and the daemon plan through `with_agent`; the pool key of two runs of one
project is the same (a warm sandbox serves the next run) while their placeholders are
not; the key holds the secrets' slots and never a placeholder; the agent's user is in the
plan of a one-shot run only, and reaches bwrap's and the in-sandbox agent's argv."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_planner import Recorder  # tests/unit

from agentkernel.agents.registry import get
from agentkernel.agents.request import AGENT_USER, key_use
from agentkernel.backends.namespaces import build_bwrap_argv
from agentkernel.daemon.runs import pool_key
from agentkernel.errors import UsageError
from agentkernel.planner import CallerContext, Plan, Resolvers, RunRequest, plan


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data dir whose Claude Code install is a stand-in executable."""
    home = tmp_path / "data"
    binary = home / "agents" / "claude" / "node_modules" / ".bin" / "claude"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("AGENTKERNEL_HOME", str(home))
    project = tmp_path / "project"
    project.mkdir()
    return project


def _plan(project: Path, *, persistent: bool = False, **fields: object) -> Plan:
    rec = Recorder()
    req = RunRequest(argv=[] if persistent else ["-p", "hi"], cwd=project, agent="claude",
                     **fields)  # type: ignore[arg-type]
    return plan(req, CallerContext(), resolvers=Resolvers(rec.choose, rec.rootfs),
                persistent=persistent)


def test_two_runs_share_a_pool_key_not_a_placeholder(installed: Path) -> None:
    one = _plan(installed, agent_key="ANTHROPIC_API_KEY")
    two = _plan(installed, agent_key="ANTHROPIC_API_KEY")
    assert one.secret_env["ANTHROPIC_API_KEY"] != two.secret_env["ANTHROPIC_API_KEY"]
    assert pool_key(one) == pool_key(two)
    key = pool_key(one)
    assert key.egress.secrets and all(g.placeholder == "" for g in key.egress.secrets)
    assert {h for g in key.egress.secrets for h in g.hosts} == {"api.anthropic.com"}
    assert key.user == AGENT_USER and key.workspace_at == one.workspace_at
    assert key.ro_binds == one.ro_binds and one.ro_binds


def test_another_project_is_another_key(installed: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    assert pool_key(_plan(installed)) != pool_key(_plan(other))


def test_the_agent_runs_as_its_user_with_its_home(installed: Path) -> None:
    p = _plan(installed, agent_key="ANTHROPIC_API_KEY")
    assert p.user == AGENT_USER
    assert p.env("x")["HOME"] == AGENT_USER[2]
    assert p.argv[0].endswith("/claude") and p.argv[1:] == ["-p", "hi"]
    argv = build_bwrap_argv("bwrap", p.spec("x"), "/agent", "/bpf", resolv=None, info_fd=-1)
    agent = argv[argv.index("--") + 1:]
    assert agent[agent.index("--user") + 1] == "1000:1000:/home/agent"
    assert agent.index("--user") > agent.index("--drop-caps")
    for cap in ("CAP_SETUID", "CAP_SETGID", "CAP_SETFCAP"):
        assert cap in argv
    assert argv[argv.index("/tmp") - 3:argv.index("/tmp")] == ["--perms", "1777", "--tmpfs"]
    assert argv[argv.index("--uid") + 1] == "0"  # (an ordinary user's: the agent maps 1000)


def test_a_kept_agent_sandbox_runs_as_the_agents_user(installed: Path) -> None:
    p = _plan(installed, persistent=True)
    assert p.user == AGENT_USER and p.argv == [] and p.env("x")["HOME"] == AGENT_USER[2]
    argv = build_bwrap_argv("bwrap", p.spec("x"), "/agent", "/bpf", resolv=None, info_fd=-1)
    agent = argv[argv.index("--") + 1:]
    assert agent[agent.index("--user") + 1] == "1000:1000:/home/agent"


def test_gvisor_agents_user(installed: Path) -> None:
    """gVisor: uid 1000 with HOME /home/agent, one-shot or kept, whoever starts it; the
    agent reaches it by a user namespace of its own where runsc is rootless."""
    from agentkernel.backends.gvisor import build_oci_config

    for persistent in (False, True):
        p = _plan(installed, backend="gvisor", persistent=persistent)
        assert p.user == AGENT_USER and p.env("x")["HOME"] == AGENT_USER[2]
    spec = p.spec("x")
    for user_ns in (False, True):
        args = build_oci_config(spec, "/agent", resolv=None, bpf="/bpf",
                                user_ns=user_ns)["process"]["args"]
        assert args[args.index("--user") + 1] == "1000:1000:/home/agent"
        assert ("--user-ns" in args) == user_ns


def test_a_replaced_install_is_another_pool_key(installed: Path, tmp_path: Path) -> None:
    """`agents install` renames a new install into place: warm sandboxes of the old one
    (another pool key) serve no run after it."""
    before = pool_key(_plan(installed))
    assert pool_key(_plan(installed)) == before  # unchanged: the same key
    final = tmp_path / "data" / "agents" / "claude"
    binary = tmp_path / "copy" / "node_modules" / ".bin" / "claude"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    final.rename(tmp_path / "old")
    (tmp_path / "copy").rename(final)
    assert pool_key(_plan(installed)) != before


def test_settings_are_read_from_the_callers_home(installed: Path, tmp_path: Path) -> None:
    home = tmp_path / "callerhome"
    (home / ".claude").mkdir(parents=True)
    (home / ".claude" / "CLAUDE.md").write_text("be brief\n")
    (home / ".claude" / "settings.json").write_text("{}")
    req = RunRequest(argv=["-p", "hi"], cwd=installed, agent="claude", agent_settings=True)
    rec = Recorder()
    p = plan(req, CallerContext(env={"HOME": str(home)}),
             resolvers=Resolvers(rec.choose, rec.rootfs))
    assert p.home_files == (("/home/agent/.claude/CLAUDE.md", b"be brief\n", 0o644),)
    with pytest.raises(UsageError, match="HOME"):
        plan(req, CallerContext(), resolvers=Resolvers(rec.choose, rec.rootfs))


def test_the_callers_key_variable_must_be_the_agents() -> None:
    assert key_use(get("codex"), "OPENAI_API_KEY").env == "CODEX_API_KEY"
    with pytest.raises(UsageError, match="not a key variable"):
        key_use(get("claude"), "HOME")


def test_no_key_is_read_by_the_plan(installed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan names the caller's variable; its value is nowhere in it."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-never-in-a-plan")
    p = _plan(installed, agent_key="ANTHROPIC_API_KEY")
    assert "sk-ant-never-in-a-plan" not in repr(p) + repr(pool_key(p))
    assert os.environ["ANTHROPIC_API_KEY"] not in str(p.summary())
