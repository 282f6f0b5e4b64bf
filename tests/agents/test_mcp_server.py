"""The MCP server through the official SDK's own client, over stdio, on real sandboxes."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from conftest import ROOT, Daemon

EXE = str(ROOT / ".venv" / "bin" / "agentkernel")
TOOLS = {"sandbox_run", "sandbox_exec", "sandbox_create", "sandbox_list", "sandbox_remove",
         "sandbox_start", "sandbox_stop", "sandbox_file_write", "sandbox_file_read",
         "agents_list", "sandbox_egress_log"}


def with_client(daemon: Daemon, project: Path,
                body: Callable[[Client], Awaitable[Any]]) -> Any:
    """Run `body` against `agentkernel mcp-server` started as an agent would start it."""
    env = {**os.environ, **daemon.env}
    params = StdioServerParameters(command=EXE, args=["mcp-server"], env=env, cwd=str(project))

    async def main() -> Any:
        async with Client(params) as client:
            return await body(client)

    return anyio.run(main)


@pytest.fixture
def proj(tmp_path: Path) -> Path:
    p = tmp_path / "proj"
    (p / "sub").mkdir(parents=True)
    (p / "hello.txt").write_text("hello from the host\n")
    return p


def test_tools_schemas_and_annotations(daemon: Daemon, proj: Path) -> None:
    async def body(c: Client) -> Any:
        return (await c.list_tools()).tools

    tools = {t.name: t for t in with_client(daemon, proj, body)}
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool.output_schema and tool.output_schema.get("type") == "object", tool.name
        assert tool.annotations is not None, tool.name
        assert tool.description, tool.name
    run = tools["sandbox_run"].input_schema["properties"]
    assert run["command"]["minItems"] == 1 and run["command"]["maxItems"] == 1024
    assert {"cwd", "env", "timeout_s", "stdin", "max_output_bytes"} <= set(run)
    name = tools["sandbox_exec"].input_schema["properties"]["name"]
    assert name["maxLength"] == 63 and name["pattern"]
    ann = {n: t.annotations for n, t in tools.items()}
    assert ann["sandbox_list"].read_only_hint and ann["sandbox_list"].idempotent_hint
    assert ann["sandbox_file_read"].read_only_hint
    assert ann["sandbox_remove"].destructive_hint and ann["sandbox_remove"].idempotent_hint
    assert ann["sandbox_run"].open_world_hint and not ann["sandbox_run"].read_only_hint
    assert not ann["sandbox_create"].open_world_hint
    assert set(tools["sandbox_run"].output_schema["properties"]) >= {
        "exit_code", "stdout", "stderr", "truncated", "timed_out", "duration_ms"}


def test_run_honours_cwd_env_stdin_timeout_and_reports_progress(daemon: Daemon,
                                                                  proj: Path) -> None:
    progress: list[tuple[float, str | None]] = []

    async def on_progress(p: float, _total: float | None, msg: str | None) -> None:
        progress.append((p, msg))

    async def body(c: Client) -> Any:
        script = "pwd; echo \"FOO=$FOO\"; cat; cat /workspace/hello.txt; sleep 1.5; exit 3"
        ran = await c.call_tool("sandbox_run", {
            "command": ["sh", "-c", script], "cwd": "sub", "env": {"FOO": "bar baz"},
            "stdin": "from-stdin\n", "timeout_s": 60, "image": "host"},
            progress_callback=on_progress)
        slow = await c.call_tool("sandbox_run", {"command": ["sleep", "60"], "timeout_s": 1,
                                                 "image": "host"})
        absolute = await c.call_tool("sandbox_run", {"command": ["pwd"], "cwd": "/tmp",
                                                     "image": "host"})
        return ran, slow, absolute

    ran, slow, absolute = with_client(daemon, proj, body)
    assert not ran.is_error, ran.content
    out = ran.structured_content
    assert out["exit_code"] == 3  # a failing command is a result, not a tool error
    assert out["stdout"].splitlines() == ["/workspace/sub", "FOO=bar baz", "from-stdin",
                                          "hello from the host"]
    assert not out["timed_out"] and not out["truncated"]
    assert "exit code 3" in ran.content[0].text and "/workspace/sub" in ran.content[0].text
    assert progress and progress[0] == (0, "started")
    assert [p for p, _ in progress] == sorted(p for p, _ in progress)
    assert slow.structured_content["timed_out"] is True
    assert slow.structured_content["exit_code"] == 124
    assert absolute.structured_content["stdout"].strip() == "/tmp"


def test_output_is_bounded(daemon: Daemon, proj: Path) -> None:
    async def body(c: Client) -> Any:
        return await c.call_tool("sandbox_run", {
            "command": ["sh", "-c", "head -c 300000 /dev/zero | tr '\\0' a; echo END"],
            "max_output_bytes": 4096, "image": "host"})

    r = with_client(daemon, proj, body)
    out = r.structured_content
    assert out["truncated"] is True and out["exit_code"] == 0
    assert len(out["stdout"]) == 4096 and out["stdout"].endswith("END\n")


def test_named_sandbox_files_and_lifecycle(daemon: Daemon, proj: Path) -> None:
    async def body(c: Client) -> dict[str, Any]:
        r: dict[str, Any] = {}
        r["create"] = await c.call_tool("sandbox_create", {"name": "mcp-box", "image": "host"})
        r["write"] = await c.call_tool("sandbox_file_write", {
            "name": "mcp-box", "path": "/tmp/d/note.txt", "content": "written by mcp\n"})
        r["bin"] = await c.call_tool("sandbox_file_write", {
            "name": "mcp-box", "path": "/tmp/d/blob", "encoding": "base64",
            "content": base64.b64encode(b"\x00\xff\x01").decode(), "mode": "0600"})
        r["exec"] = await c.call_tool("sandbox_exec", {
            "name": "mcp-box", "command": ["sh", "-c", "cat note.txt; stat -c %a blob; "
                                                      "echo $X"],
            "cwd": "/tmp/d", "env": {"X": "y"}})
        r["read"] = await c.call_tool("sandbox_file_read", {"name": "mcp-box",
                                                            "path": "/tmp/d/note.txt"})
        r["readbin"] = await c.call_tool("sandbox_file_read", {"name": "mcp-box",
                                                               "path": "/tmp/d/blob"})
        r["toolarge"] = await c.call_tool("sandbox_file_read", {
            "name": "mcp-box", "path": "/tmp/d/note.txt", "max_bytes": 3})
        r["list"] = await c.call_tool("sandbox_list", {})
        r["stop"] = await c.call_tool("sandbox_stop", {"name": "mcp-box"})
        r["start"] = await c.call_tool("sandbox_start", {"name": "mcp-box"})
        r["remove"] = await c.call_tool("sandbox_remove", {"name": "mcp-box"})
        r["again"] = await c.call_tool("sandbox_remove", {"name": "mcp-box"})
        r["gone"] = await c.call_tool("sandbox_exec", {"name": "mcp-box", "command": ["true"]})
        return r

    r = with_client(daemon, proj, body)
    for key in ("create", "write", "bin", "exec", "read", "readbin", "list", "stop", "start",
                "remove", "again"):
        assert not r[key].is_error, (key, r[key].content)
    assert r["create"].structured_content["name"] == "mcp-box"
    assert r["write"].structured_content == {"path": "/tmp/d/note.txt", "bytes": 15}
    assert r["exec"].structured_content["stdout"] == "written by mcp\n600\ny\n"
    assert r["read"].structured_content["content"] == "written by mcp\n"
    assert r["read"].structured_content["encoding"] == "utf8"
    assert base64.b64decode(r["readbin"].structured_content["content"]) == b"\x00\xff\x01"
    assert r["toolarge"].is_error
    assert "mcp-box" in [s["name"] for s in r["list"].structured_content["sandboxes"]]
    assert r["stop"].structured_content["status"] == "stopped"
    assert r["start"].structured_content["status"] == "running"
    assert r["remove"].structured_content["removed"] is True
    assert r["again"].structured_content["removed"] is False  # idempotent
    assert r["gone"].is_error and "mcp-box" in r["gone"].content[0].text


def test_egress_log_says_what_was_refused_and_why(daemon: Daemon, proj: Path) -> None:
    """A named sandbox (moderate: its egress gate) tries a private address; the tool shows
    the refusal and its rule, structured and as text; a sandbox without a gate is a tool
    error."""
    probe = ("import socket\ns = socket.socket(); s.settimeout(5)\n"
             "try:\n    s.connect(('10.1.2.3', 80)); s.sendall(b'x'); s.recv(1)\n"
             "except OSError as e:\n    print('refused', type(e).__name__)\n")

    async def body(c: Client) -> dict[str, Any]:
        r: dict[str, Any] = {}
        r["create"] = await c.call_tool("sandbox_create", {"name": "mcp-egress",
                                                           "image": "host"})
        r["exec"] = await c.call_tool("sandbox_exec", {
            "name": "mcp-egress", "command": ["python3", "-c", probe]})
        r["log"] = await c.call_tool("sandbox_egress_log", {"name": "mcp-egress"})
        r["none"] = await c.call_tool("sandbox_egress_log", {"name": "no-such-box"})
        r["bad"] = await c.call_tool("sandbox_egress_log", {"name": "../etc"})
        await c.call_tool("sandbox_remove", {"name": "mcp-egress"})
        return r

    r = with_client(daemon, proj, body)
    assert not r["create"].is_error, r["create"].content
    assert "refused" in r["exec"].structured_content["stdout"], r["exec"].structured_content
    log = r["log"].structured_content
    assert not r["log"].is_error and log["name"] == "mcp-egress", r["log"].content
    refusals = [e for e in log["entries"] if e["host"] == "10.1.2.3"]
    assert refusals and refusals[0]["allowed"] is False and refusals[0]["rule"], log
    assert "10.1.2.3" in r["log"].content[0].text and "REFUSED" in r["log"].content[0].text
    assert r["none"].is_error and r["bad"].is_error


HOSTILE_NAMES = ["../etc", "a/b", "x" * 64, "-lead", "tab\tname", "ünï", "", "a--b",
                 "name\x00nul"]


def test_hostile_input_is_a_tool_error_never_a_protocol_error(daemon: Daemon,
                                                               proj: Path) -> None:
    async def body(c: Client) -> list[Any]:
        calls: list[tuple[str, dict[str, Any]]] = [
            *(("sandbox_exec", {"name": n, "command": ["true"]}) for n in HOSTILE_NAMES),
            *(("sandbox_create", {"name": n}) for n in HOSTILE_NAMES[:4]),
            ("sandbox_file_read", {"name": "ok", "path": "/a/../../etc/shadow"}),
            ("sandbox_file_read", {"name": "ok", "path": "relative"}),
            ("sandbox_file_write", {"name": "ok", "path": "/x", "content": "!!",
                                    "encoding": "base64"}),
            ("sandbox_run", {"command": []}),
            ("sandbox_run", {"command": ["true"], "timeout_s": 0}),
            ("sandbox_run", {"command": ["true"], "env": {"BAD-KEY": "x"}}),
            ("sandbox_run", {"command": ["true"], "cwd": "../../etc"}),
            ("sandbox_run", {"command": ["true"], "profile": "root"}),
            ("sandbox_run", {"command": ["true"], "stdin": "x" * (1024 * 1024 + 1)}),
            ("no_such_tool", {}),
        ]
        return [(name, args, await c.call_tool(name, args)) for name, args in calls]

    for name, args, result in with_client(daemon, proj, body):
        assert result.is_error, (name, str(args)[:100], result.content)
    listing = daemon.ak("list", "--json")
    assert listing.returncode == 0
    assert not [r for r in json.loads(listing.stdout) if r["name"] != "mcp-box"]


def test_cancelled_call_stops_its_command(daemon: Daemon, proj: Path) -> None:
    """A call the client gives up on (its read timeout) takes its sandbox with it."""
    marker = f"mcp-cancel-{os.getpid()}"

    async def body(c: Client) -> Any:
        with pytest.raises(Exception):  # noqa: B017 - the SDK's timeout error type varies
            await c.call_tool("sandbox_run", {"command": ["sh", "-c", f"sleep 300 # {marker}"],
                                              "image": "host"}, read_timeout_seconds=2)
        await anyio.sleep(1)
        return None

    with_client(daemon, proj, body)
    for _ in range(100):
        left = subprocess.run(["pgrep", "-f", marker], capture_output=True, check=False)
        if left.returncode != 0:
            break
        time.sleep(0.2)
    assert left.returncode != 0, f"the command still runs: {left.stdout!r}"


def test_server_stays_import_light_until_the_first_call(tmp_path: Path) -> None:
    """Listing tools neither imports the daemon side nor starts a daemon."""
    code = """
import sys, anyio
from pathlib import Path
from agentkernel.mcpserver.ops import DaemonOps
from agentkernel.mcpserver.tools import build_server
from mcp import Client
server = build_server(DaemonOps, Path.cwd())
async def main():
    async with Client(server) as c:
        await c.list_tools()
anyio.run(main)
heavy = [m for m in ("agentkernel.daemon.manager", "agentkernel.engine", "fastapi",
                     "agentkernel.ipc.client", "agentkernel.backends") if m in sys.modules]
print(heavy)
"""
    env = {**os.environ, "AGENTKERNEL_HOME": str(tmp_path / "h"),
           "AGENTKERNEL_RUNTIME_DIR": str(tmp_path / "r")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert not (tmp_path / "r" / "daemon.sock").exists()
