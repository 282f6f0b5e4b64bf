"""`agents` and `plugin` with the real agent CLIs from npm, in an isolated HOME and project."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from agentkernel.agents.registry import agents, get
from agentkernel.plugins import formats
from agentkernel.plugins.formats import ConfigFileError
from conftest import ROOT, Env

EXE = str(ROOT / ".venv" / "bin" / "agentkernel")


def agent(e: Env, *argv: str, extra: dict[str, str] | None = None,
          stdout_only: bool = False) -> str:
    """An agent CLI's output (they exit 0 even when a server fails: read the text)."""
    proc = subprocess.run(list(argv), cwd=e.project, env={**e.env, **(extra or {})},
                          capture_output=True, text=True, timeout=180, check=False)
    return proc.stdout if stdout_only else proc.stdout + proc.stderr


def test_agents_detects_versions_and_auth(agent_env: Env) -> None:
    (agent_env.home / ".codex").mkdir()
    (agent_env.home / ".codex" / "auth.json").write_text("{}")
    agent_env.env.update(ANTHROPIC_API_KEY="sk-test", GEMINI_API_KEY="g-test")
    r = agent_env.ak("agents", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["id"]: row for row in json.loads(r.stdout)}
    assert set(rows) == {"claude", "codex", "gemini", "opencode"}
    for spec in agents():
        assert rows[spec.id]["version"] == spec.version, rows[spec.id]
    assert rows["claude"]["auth"] == "env:ANTHROPIC_API_KEY"
    assert rows["gemini"]["auth"] == "env:GEMINI_API_KEY"
    assert rows["codex"]["auth"] == "oauth:~/.codex/auth.json"
    assert "sk-test" not in r.stdout and "g-test" not in r.stdout
    table = agent_env.ak("agents")
    assert table.returncode == 0 and "AGENT" in table.stdout and "2.1.332" in table.stdout


def test_claude_plugin_round_trip(agent_env: Env) -> None:
    r = agent_env.ak("plugin", "install", "claude")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "plugin:agentkernel:agentkernel" in agent(agent_env, "claude", "mcp", "list")
    listed = agent(agent_env, "claude", "mcp", "list")
    line = next(x for x in listed.splitlines() if "plugin:agentkernel:agentkernel" in x)
    assert "Connected" in line and EXE in line, listed
    plugins = json.loads(agent(agent_env, "claude", "plugin", "list", "--json",
                               stdout_only=True))
    assert any(p["id"] == "agentkernel@agentkernel" and p["enabled"] for p in plugins)
    again = agent_env.ak("plugin", "install", "claude")
    assert again.returncode == 0 and "unchanged" in again.stdout
    status = json.loads(agent_env.ak("agents", "--json").stdout)
    assert next(s for s in status if s["id"] == "claude")["plugin"] == "user"
    gone = agent_env.ak("plugin", "uninstall", "claude")
    assert gone.returncode == 0, gone.stderr
    assert "agentkernel" not in agent(agent_env, "claude", "mcp", "list")


def test_repository_marketplace_validates(agent_env: Env) -> None:
    out = agent(agent_env, "claude", "plugin", "validate", str(ROOT))
    assert "Validation passed" in out, out


@pytest.mark.parametrize("target,scope", [("gemini", "project"), ("gemini", "user"),
                                          ("opencode", "project"), ("codex", "user")])
def test_mcp_entry_round_trip(agent_env: Env, target: str, scope: str) -> None:
    r = agent_env.ak("plugin", "install", target, "--scope", scope)
    assert r.returncode == 0, r.stdout + r.stderr
    if target == "codex":
        rows = json.loads(agent(agent_env, "codex", "mcp", "list", "--json",
                                stdout_only=True))
        ours = next(x for x in rows if x["name"] == "agentkernel")
        assert ours["transport"]["command"] == EXE
        assert ours["transport"]["args"] == ["mcp-server"]
    else:
        listed = agent(agent_env, target, "mcp", "list",
                       extra={"GEMINI_CLI_TRUST_WORKSPACE": "true"})
        line = next(x for x in listed.splitlines() if "agentkernel" in x)
        assert "onnected" in line and "isconnected" not in line, listed
    gone = agent_env.ak("plugin", "uninstall", target, "--scope", scope)
    assert gone.returncode == 0, gone.stdout + gone.stderr
    spec = get(target)
    assert formats.current(spec, formats.config_path(spec, scope, agent_env.project)) is None


def test_merges_keep_foreign_keys_refuse_differing_and_dry_run(agent_env: Env) -> None:
    """Through the file merge (no agent CLI on PATH): every format keeps what is not ours."""
    agent_env.env["PATH"] = "/usr/bin:/bin"
    codex = agent_env.home / ".codex" / "config.toml"
    codex.parent.mkdir()
    codex.write_text('# mine\nmodel = "o3"\n\n[mcp_servers.other]\ncommand = "x"\n'
                     '[mcp_servers.other.env]\nK = "v"\n\n[profiles.fast]\nmodel = "m"\n')
    gemini = agent_env.project / ".gemini" / "settings.json"
    gemini.parent.mkdir()
    gemini.write_text(json.dumps({"theme": "dark", "mcpServers": {
        "agentkernel": {"command": "/somewhere/else", "args": []}, "other": {"command": "y"}}}))
    opencode = agent_env.project / "opencode.json"
    opencode.write_text(json.dumps({"$schema": "https://opencode.ai/config.json",
                                    "model": "x/y", "mcp": {"o": {"type": "remote"}}}))
    before = {p: p.read_text() for p in (codex, gemini, opencode)}

    dry = agent_env.ak("plugin", "install", "codex", "--dry-run")
    assert dry.returncode == 0 and "+[mcp_servers.agentkernel]" in dry.stdout, dry.stdout
    refused = agent_env.ak("plugin", "install", "gemini", "--scope", "project")
    assert refused.returncode != 0 and "--force" in refused.stderr
    assert {p: p.read_text() for p in before} == before  # dry run and refusal wrote nothing

    for target, scope in (("codex", "user"), ("opencode", "project")):
        r = agent_env.ak("plugin", "install", target, "--scope", scope)
        assert r.returncode == 0, r.stderr
    forced = agent_env.ak("plugin", "install", "gemini", "--scope", "project", "--force")
    assert forced.returncode == 0, forced.stderr

    import tomllib

    c = tomllib.loads(codex.read_text())
    assert c["model"] == "o3" and c["profiles"] == {"fast": {"model": "m"}}
    assert c["mcp_servers"]["other"] == {"command": "x", "env": {"K": "v"}}
    assert c["mcp_servers"]["agentkernel"] == {"command": EXE, "args": ["mcp-server"]}
    assert codex.read_text().startswith("# mine\n")
    g = json.loads(gemini.read_text())
    assert g["theme"] == "dark" and g["mcpServers"]["other"] == {"command": "y"}
    assert g["mcpServers"]["agentkernel"] == {"command": EXE, "args": ["mcp-server"]}
    o = json.loads(opencode.read_text())
    assert o["model"] == "x/y" and o["mcp"]["o"] == {"type": "remote"}
    assert o["mcp"]["agentkernel"] == {"type": "local", "command": [EXE, "mcp-server"],
                                       "enabled": True}
    listing = json.loads(agent_env.ak("plugin", "list", "--json").stdout)
    assert {r["target"]: r["mcp"] for r in listing}["codex"] == ["user"]

    for target, scope in (("codex", "user"), ("opencode", "project"), ("gemini", "project")):
        r = agent_env.ak("plugin", "uninstall", target, "--scope", scope)
        assert r.returncode == 0, r.stderr
    c = tomllib.loads(codex.read_text())
    assert "agentkernel" not in c["mcp_servers"] and c["mcp_servers"]["other"]["env"]
    assert "agentkernel" not in json.loads(gemini.read_text())["mcpServers"]
    assert "agentkernel" not in json.loads(opencode.read_text())["mcp"]


def test_claude_without_cli_merges_mcp_json_and_a_skill(agent_env: Env) -> None:
    agent_env.env["PATH"] = "/usr/bin:/bin"
    mcp = agent_env.project / ".mcp.json"
    mcp.write_text(json.dumps({"mcpServers": {"db": {"command": "pg"}}}))
    r = agent_env.ak("plugin", "install", "claude", "--scope", "project")
    assert r.returncode == 0, r.stderr
    data = json.loads(mcp.read_text())
    assert data["mcpServers"]["db"] == {"command": "pg"}
    assert data["mcpServers"]["agentkernel"]["command"] == EXE
    skill = agent_env.project / ".claude" / "skills" / "agentkernel-sandbox" / "SKILL.md"
    assert "name: agentkernel-sandbox" in skill.read_text()
    r = agent_env.ak("plugin", "uninstall", "claude", "--scope", "project")
    assert r.returncode == 0 and not skill.exists()
    assert json.loads(mcp.read_text()) == {"mcpServers": {"db": {"command": "pg"}}}


def test_odd_toml_layouts_are_refused_not_mangled(tmp_path: Path) -> None:
    spec = get("codex")
    path = tmp_path / "config.toml"
    inline = 'mcp_servers = { agentkernel = { command = "x" } }\n'
    with pytest.raises(ConfigFileError):
        formats.with_entry(spec, path, inline, {"command": "y", "args": []})
    with pytest.raises(ConfigFileError):
        formats.with_entry(spec, path, "not = [valid", {"command": "y", "args": []})
    text = '[mcp_servers.agentkernel]\ncommand = "old"\n[mcp_servers.agentkernel.env]\nA = "1"\n' \
           '[z]\nk = 1\n'
    new = formats.with_entry(spec, path, text, {"command": "new", "args": ["mcp-server"]})
    import tomllib

    assert tomllib.loads(new) == {"z": {"k": 1}, "mcp_servers": {
        "agentkernel": {"command": "new", "args": ["mcp-server"]}}}
