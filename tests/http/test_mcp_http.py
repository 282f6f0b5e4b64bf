"""`/mcp` on the HTTP API: the SDK's streamable HTTP client, behind the API's key and guards."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from akhttp import API_KEY
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from agentkernel.http.serve import RunningServer

INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                   "clientInfo": {"name": "t", "version": "0"}}}
HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


def call(srv: RunningServer, body: Any) -> Any:
    async def main() -> Any:
        http = httpx2.AsyncClient(headers={"authorization": f"Bearer {API_KEY}"},
                                  timeout=120)
        async with http, Client(streamable_http_client(f"{srv.url}/mcp", http_client=http)) \
                as client:
            return await body(client)

    return anyio.run(main)


def test_mcp_over_http_with_the_key(server: RunningServer) -> None:
    progress: list[float] = []

    async def on_progress(p: float, _t: float | None, _m: str | None) -> None:
        progress.append(p)

    async def body(c: Client) -> Any:
        tools = await c.list_tools()
        ran = await c.call_tool("sandbox_run", {
            "command": ["sh", "-c", "echo $A; pwd; sleep 1.2"], "env": {"A": "b"},
            "cwd": "/tmp", "timeout_s": 60}, progress_callback=on_progress)
        bad = await c.call_tool("sandbox_exec", {"name": "../x", "command": ["true"]})
        return tools, ran, bad

    tools, ran, bad = call(server, body)
    assert "sandbox_run" in {t.name for t in tools.tools}
    assert not ran.is_error, ran.content
    assert ran.structured_content["stdout"] == "b\n/tmp\n"
    assert progress and progress[0] == 0
    assert bad.is_error


@pytest.mark.parametrize("headers,status", [
    ({}, 401),
    ({"authorization": "Bearer wrong"}, 401),
    ({"authorization": f"Bearer {API_KEY}", "origin": "https://evil.example"}, 403),
    ({"authorization": f"Bearer {API_KEY}", "origin": "null"}, 403),
    ({"authorization": f"Bearer {API_KEY}", "host": "evil.example"}, 421),
])
def test_mcp_refuses_what_the_api_refuses(server: RunningServer, headers: dict[str, str],
                                          status: int) -> None:
    """A web page (Origin, rebinding Host) or a caller without the key gets nothing."""
    r = httpx.post(f"{server.url}/mcp", content=json.dumps(INIT),
                   headers={**HEADERS, **headers}, timeout=30)
    assert r.status_code == status, r.text
    assert "agentkernel" not in r.text


def test_mcp_sdk_client_without_key_fails(server: RunningServer) -> None:
    async def main() -> None:
        async with httpx2.AsyncClient(timeout=30) as http, \
                Client(streamable_http_client(f"{server.url}/mcp", http_client=http)) as c:
            await c.list_tools()

    with pytest.raises(BaseException):  # noqa: B017 - whatever the SDK raises for a 401
        anyio.run(main)


def test_mcp_with_key_and_local_origin_is_served(server: RunningServer) -> None:
    r = httpx.post(f"{server.url}/mcp", content=json.dumps(INIT),
                   headers={**HEADERS, "authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert r.status_code == 200, r.text
    assert "agentkernel" in r.text
