"""The stdio server's own transport (mcpserver/stdio.py): lines from a pipe in the event
loop, bounded; writes that wait for a slow reader without blocking the loop; a request line
too long to hold skipped while the next one is served; the SDK's transport where stdout
is not a pipe; and the spare daemon connection (mcpserver/ops.py) given up when the
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
    """The JSON-RPC answers among the whole lines of `out`, by id."""
    found = {}
    for line in out.decode(errors="replace").split("\n")[:-1]:  # (the last: unfinished)
        message = json.loads(line)
        if "id" in message:
            found[message["id"]] = message
    return found


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


def _serve(data: bytes, tmp_path: Path, stdout: Any) -> subprocess.Popen[bytes]:
    """`mcp-server` reading `data` from a pipe kept open (at EOF the server ends, maybe
    before it answered), its stdout `stdout`."""
    proc = subprocess.Popen([EXE, "mcp-server"], stdin=subprocess.PIPE, stdout=stdout,
                            stderr=subprocess.PIPE,
                            env={**os.environ, "AGENTKERNEL_RUNTIME_DIR": str(tmp_path / "r")})
    assert proc.stdin is not None
    proc.stdin.write(data)
    proc.stdin.flush()
    return proc


def _tools_listed(out: bytes) -> bool:
    answer = _answers(out).get(2)
    return answer is not None and "sandbox_run" in {
        t["name"] for t in answer["result"]["tools"]}


def _finish(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0, proc.stderr.read()[-2000:] if proc.stderr else ""


def test_an_over_long_request_line_is_skipped_and_the_next_served(tmp_path: Path) -> None:
    """Over pipes (our transport): a 33 MiB line (over MAX_LINE) is dropped as it comes,
    the server's memory never holds it, and the request after it is answered."""
    data = _lines(*HANDSHAKE) + b"x" * (33 * 1024 * 1024) + b"\n" + _lines(LIST)
    out = b""
    proc = _serve(data, tmp_path, subprocess.PIPE)
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    while not _tools_listed(out) and time.monotonic() < deadline:
        chunk = proc.stdout.readline()
        if not chunk:
            break
        out += chunk
    _finish(proc)
    assert _tools_listed(out), out[-2000:]


def test_a_file_gets_the_sdk_transport(tmp_path: Path) -> None:
    """A stdout that is a regular file (the event loop cannot wait on it) is served by
    the SDK's own transport."""
    with open(tmp_path / "out", "wb") as stdout:
        proc = _serve(_lines(*HANDSHAKE, LIST), tmp_path, stdout)
        deadline = time.monotonic() + 120
        while not _tools_listed((tmp_path / "out").read_bytes()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        _finish(proc)


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
