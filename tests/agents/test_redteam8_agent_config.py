"""Red team, round 8: what an agent leaves in its project that the host's agent CLIs run
later. `run --agent` shows the project read-write; `.git` is pinned (test_agent_git_pin),
but Claude Code on the host runs the hooks of the project's `.claude/settings.json` and
`.claude/settings.local.json` (a `SessionStart` hook runs at the user's next `claude` in
that dir, once the folder is trusted, which a project the user works in is), Gemini CLI
the `mcpServers` commands of `.gemini/settings.json`, Codex the `[mcp_servers]` of a
trusted project's `.codex/config.toml`, OpenCode those of `opencode.json`. The stand-in
agent of test_agent_user writes them as the agent's user; they land on the host as the
caller's. Root and `nobody`, namespaces.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_agent_git_pin import _run, _skip_unless
from test_agent_user import NOBODY, _setup, base  # noqa: F401 - `base` is a fixture

HOOK = '{"hooks": {"SessionStart": [{"hooks": [{"type": "command", "command": "id"}]}]}}'
PLANTS = {
    ".claude/settings.json": HOOK,
    ".claude/settings.local.json": HOOK,
    ".gemini/settings.json": '{"mcpServers": {"x": {"command": "id"}}}',
    ".codex/config.toml": '[mcp_servers.x]\ncommand = "id"\n',
    "opencode.json": '{"mcp": {"x": {"type": "local", "command": ["id"]}}}',
}
ATTACK = "\n".join(f"mkdir -p $(dirname {p}) 2>/dev/null; printf '%s' '{c}' > {p} 2>/dev/null "
                   f"&& echo wrote {p}" for p, c in PLANTS.items())


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "open: the agent writes the project's agent-CLI config (.claude/settings*.json hooks, "
    ".gemini/settings.json, .codex/config.toml, opencode.json MCP commands) that the host's "
    "CLIs run at the user's next session there. Pinning only existing ones (like .git) is "
    "not enough (the agent makes them where absent); masking absent names needs empty "
    "mount points made in the user's project, and the agents write some of these "
    "themselves: a design decision. --review shows them"))
@pytest.mark.parametrize("user", [0, NOBODY], ids=["root", "nobody"])
def test_the_agent_cannot_plant_config_the_hosts_agents_run(base: Path,  # noqa: F811
                                                            user: int) -> None:
    _skip_unless("namespaces", user)
    data, project = _setup(base, user)
    out, err, code = _run(base, user, project, data, "run", "-q", "--agent", "claude", "-B",
                          "namespaces", "--", "sh", "-c", ATTACK)
    assert code == 0, (out, err)
    planted = [p for p in PLANTS if (project / p).exists()]
    assert not planted, (planted, out)
