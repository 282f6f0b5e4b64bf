"""The stdio server's own transport (mcpserver/stdio.py): lines from a pipe in the event
loop, bounded; writes that wait for a slow reader without blocking the loop; a request line
too long to hold skipped while the next one is served; the SDK's transport where stdin or
stdout is not a pipe; and the spare daemon connection (mcpserver/ops.py) given up when the
daemon it leads to is gone."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from conftest import ROOT
from sandbox_helpers import ak

EXE = str(ROOT / ".venv" / "bin" / "agentkernel")
HANDSHAKE = [
    {"jsonrpc": "2.0", "id": 1, "method": "initialize",
     "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                "clientInfo": {"name": "test", "version": "1"}}},
    {"jsonrpc": "2.0", "method": "notifications/initialized"},
]
LIST = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}


def _lines(*messages: dict[str, Any]) -> bytes:
    return "".join(json.dumps(m) + "\n" for m in messages).encode()


def _answers(out: bytes) -> dict[int, Any]:
    return {m["id"]: m for m in map(json.loads, out.decode().splitlines()) if "id" in m}


def test_lines_from_a_pipe_are_whole_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from agentkernel.mcpserver import stdio

    monkeypatch.setattr(stdio, "MAX_LINE", 64)
    r, w = os.pipe()
    chunks = [b'{"a":', b' 1}\n{"b": 2}\n', b"y" * 50, b"y" * 50, b"\n",  # 100 > 64: skipped
              b'{"c": 3}\n', b"last-without-newline"]

    def writer() -> None:
        for chunk in chunks:
            os.write(w, chunk)
            time.sleep(0.01)
        os.close(w)

    async def main() -> list[str]:
        return [line async for line in stdio.FdLines(r)]

    threading.Thread(target=writer).start()
    try:
        got = anyio.run(main)
    finally:
        os.close(r)
    assert got == ['{"a": 1}\n', '{"b": 2}\n', "\n", '{"c": 3}\n', "last-without-newline\n"]


def test_a_slow_reader_does_not_block_the_loop() -> None:
    """2 MiB through a pipe a reader drains slowly: the writer waits in the event loop
    (another task keeps running meanwhile) and every byte arrives, in order."""
    import fcntl

    from agentkernel.mcpserver.stdio import FdWriter

    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETFL, fcntl.fcntl(w, fcntl.F_GETFL) | os.O_NONBLOCK)
    payload = bytes(range(256)) * 8192
    got = bytearray()

    def reader() -> None:
        while chunk := os.read(r, 65536):
            got.extend(chunk)
            time.sleep(0.005)

    ticks = 0

    async def main() -> None:
        nonlocal ticks

        async def tick() -> None:
            nonlocal ticks
            while True:
                await anyio.sleep(0.005)
                ticks += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(tick)
            out = FdWriter(w)
            await out.write(payload.decode("latin-1"))
            await out.flush()
            tg.cancel_scope.cancel()

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        anyio.run(main)
    finally:
        os.close(w)
        thread.join(10)
        os.close(r)
    assert bytes(got) == payload.decode("latin-1").encode()
    assert ticks > 3


def test_an_over_long_request_line_is_skipped_and_the_next_served(tmp_path: Path) -> None:
    """Over pipes (our transport): a 33 MiB line (over MAX_LINE) is dropped as it comes,
    the server's memory never holds it, and the request after it is answered."""
    data = _lines(*HANDSHAKE) + b"x" * (33 * 1024 * 1024) + b"\n" + _lines(LIST)
    proc = subprocess.run([EXE, "mcp-server"], input=data, capture_output=True, timeout=120,
                          check=False, env={**os.environ,
                                            "AGENTKERNEL_RUNTIME_DIR": str(tmp_path / "r")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = _answers(proc.stdout)
    assert "sandbox_run" in {t["name"] for t in answers[2]["result"]["tools"]}


def test_files_get_the_sdk_transport(tmp_path: Path) -> None:
    """stdin and stdout that are regular files (no event-loop waiting on them) are served
    by the SDK's own transport."""
    (tmp_path / "in").write_bytes(_lines(*HANDSHAKE, LIST))
    with open(tmp_path / "in", "rb") as stdin, open(tmp_path / "out", "wb") as stdout:
        proc = subprocess.run([EXE, "mcp-server"], stdin=stdin, stdout=stdout,
                              stderr=subprocess.PIPE, timeout=120, check=False,
                              env={**os.environ, "AGENTKERNEL_RUNTIME_DIR": str(tmp_path / "r")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = _answers((tmp_path / "out").read_bytes())
    assert "sandbox_run" in {t["name"] for t in answers[2]["result"]["tools"]}


def test_the_spare_connection_of_a_gone_daemon_is_not_used(tmp_path: Path) -> None:
    """A daemon stopped and started again between two calls: the spare connection made
    after the first leads to the old one (closed), so the second call makes a new one."""
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters

    (tmp_path / "run").mkdir(mode=0o700)
    (tmp_path / "daemon.toml").write_text("[daemon]\npool_min = 0\nadhoc_min = 0\npools = []\n")
    env = {"AGENTKERNEL_HOME": str(tmp_path / "home"),
           "AGENTKERNEL_RUNTIME_DIR": str(tmp_path / "run"),
           "AGENTKERNEL_DAEMON_CONFIG": str(tmp_path / "daemon.toml")}
    (tmp_path / "proj").mkdir()
    assert ak("daemon", "start", env=env).returncode == 0
    params = StdioServerParameters(command=EXE, args=["mcp-server"], env={**os.environ, **env},
                                   cwd=str(tmp_path / "proj"))

    async def main() -> list[Any]:
        results = []
        async with Client(params) as client:
            args = {"command": ["sh", "-c", "echo ran"], "image": "host"}
            results.append(await client.call_tool("sandbox_run", args))
            await anyio.sleep(0.3)  # the spare is made
            for op in ("stop", "start"):
                r = await anyio.to_thread.run_sync(lambda op=op: ak("daemon", op, env=env))
                assert r.returncode == 0, r.stderr
            results.append(await client.call_tool("sandbox_run", args))
        return results

    try:
        results = anyio.run(main)
    finally:
        ak("daemon", "stop", env=env)
    for result in results:
        assert not result.is_error, result.content
        assert result.structured_content["stdout"] == "ran\n"
