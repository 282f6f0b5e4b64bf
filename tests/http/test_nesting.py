"""A body nested too deeply for json (`[[[[…]]]]`, 100k levels) is the client's mistake: a
400 through the one error hierarchy (UsageError), not a 500, on every route that reads a
JSON body, and the server answers the next request as before."""

from __future__ import annotations

import httpx
import pytest
from akhttp import API_KEY

from agentkernel.http.serve import RunningServer

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
DEEP = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECT = b'{"argv":' + DEEP + b"}"


@pytest.mark.parametrize("path", ["/run", "/sandboxes", "/run/stream", "/batch/run",
                                  "/sandboxes/nest-x/exec"])
@pytest.mark.parametrize("body", [DEEP, DEEP_OBJECT], ids=["array", "in-a-field"])
def test_deep_nesting_is_a_usage_error(server: RunningServer, path: str, body: bytes) -> None:
    resp = httpx.post(server.url + path, content=body, headers=AUTH, timeout=60)
    assert resp.status_code == 400, (resp.status_code, resp.text[:300])
    assert "nests too deeply" in resp.json()["error"], resp.text[:300]
    assert httpx.get(server.url + "/health", headers=AUTH, timeout=30).status_code == 200


def test_deep_nesting_at_mcp_is_refused(server: RunningServer) -> None:
    """/mcp parses JSON-RPC with the MCP SDK: a client's error there too, never a 500."""
    headers = {**AUTH, "Accept": "application/json, text/event-stream"}
    resp = httpx.post(server.url + "/mcp", content=DEEP, headers=headers, timeout=60)
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])
    assert httpx.get(server.url + "/health", headers=AUTH, timeout=30).status_code == 200
