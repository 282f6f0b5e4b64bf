"""Ours beyond the SDKs' contract: GET /agents, and `agent` / `egress` on POST /sandboxes,
planned like `create --agent` (planner.with_agent) on real sandboxes."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from akhttp import API_KEY, ROOT

from agentkernel.http.serve import RunningServer

AUTH = {"Authorization": f"Bearer {API_KEY}"}
AGENTS = ROOT / ".cache" / "agents-home" / "agents"  # scripts/install-agents.sh


@pytest.fixture
def http(server: RunningServer) -> Iterator[httpx.Client]:
    if not (AGENTS / "claude" / "node_modules" / ".bin" / "claude").exists():
        pytest.skip("agent CLIs not installed (scripts/install-agents.sh)")
    home = Path(os.environ["AGENTKERNEL_HOME"])  # the session's service's (conftest)
    if not (home / "agents").exists():
        (home / "agents").symlink_to(AGENTS)
    from agentkernel.secrets_store import save

    save("anth", ["api.anthropic.com"], "x-api-key", "ANTHROPIC_API_KEY", "sk-ant-http-test")
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as client:
        yield client


def _stream(http: httpx.Client, path: str, body: dict[str, object]
            ) -> list[tuple[str, dict[str, object]]]:
    """The named events of an SSE answer, their JSON data parsed."""
    events: list[tuple[str, dict[str, object]]] = []
    name = ""
    with http.stream("POST", path, json=body) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


def test_get_agents(http: httpx.Client) -> None:
    resp = http.get("/agents")
    assert resp.status_code == 200, resp.text
    rows = {a["id"]: a for a in resp.json()["data"]["agents"]}
    assert set(rows) >= {"claude", "codex", "gemini", "opencode"}
    claude = rows["claude"]
    assert claude["installed"] is True and claude["version"] == "2.1.332", claude
    assert claude["key"] == "secret:anth" and "api.anthropic.com" in claude["hosts"], claude
    assert rows["codex"]["key"] == "missing"


def test_create_an_agent_sandbox(http: httpx.Client) -> None:
    body = {"name": "http-agent", "agent": "claude", "egress": {"allow": ["example.org"]}}
    resp = http.post("/sandboxes", json=body)
    assert resp.status_code == 201, resp.text
    try:
        data = resp.json()["data"]
        assert data["agent"] == "claude" and data["backend"] == "namespaces", data
        script = ("echo key=$ANTHROPIC_API_KEY; command -v claude; "
                  "claude --version; id -u; pwd")
        resp = http.post("/sandboxes/http-agent/exec",
                         json={"command": ["sh", "-c", script]})
        assert resp.status_code == 200, resp.text
        out = resp.json()["data"]["output"]
        lines = out.splitlines()
        assert lines[0].startswith("key=ak-secret-"), out  # the placeholder, not the key
        assert "sk-ant-http-test" not in out
        assert lines[1] == "/run/agentkernel/claude/node_modules/.bin/claude", out
        assert "(Claude Code)" in lines[2], out
        # The agent's user, starting in its home (no project: it cannot enter /root).
        assert lines[3:5] == ["1000", "/home/agent"], out
        events = _stream(http, "/sandboxes/http-agent/exec/stream",
                         {"command": ["claude", "--version"]})
        assert events[0][0] == "started" and events[-1][0] == "done", events
        assert "(Claude Code)" in "".join(str(d.get("data", "")) for e, d in events
                                          if e == "output"), events
        assert events[-1][1]["exit_code"] == 0, events
        events = _stream(http, "/sandboxes/http-agent/exec/stream",
                         {"command": ["sh", "-c", "exit 3"]})
        assert events[-1] == ("done", events[-1][1]) and events[-1][1]["exit_code"] == 3
        listed = {s["name"]: s for s in http.get("/sandboxes").json()["data"]}
        assert listed["http-agent"]["agent"] == "claude"
    finally:
        http.delete("/sandboxes/http-agent")
    # A plain sandbox's JSON is the SDKs' own: no `agent` key.
    assert all("agent" not in s for s in http.get("/sandboxes").json()["data"])


@pytest.mark.parametrize("body", [
    {"name": "bad-agent", "agent": "nosuch"},
    {"name": "bad-agent", "agent": "claude", "backend": "microvm"},  # refused, with why
    {"name": "bad-agent", "egress": {"allow": ["bad host!"]}},
    {"name": "bad-agent", "egress": {"allow": ["x"] * 300}},
])
def test_bad_agent_requests_are_400(http: httpx.Client, body: dict[str, object]) -> None:
    resp = http.post("/sandboxes", json=body)
    assert resp.status_code == 400, resp.text
    assert http.get("/sandboxes/bad-agent").status_code == 404
