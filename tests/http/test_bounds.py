"""What one HTTP client can make the server hold or leave behind: output floods (capped and
flagged), stalled stream readers (back-pressure), dropped connections (command and one-shot
sandbox gone), and file reads of devices, FIFOs and huge files (refused, capped)."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from akhttp import API_KEY, prefix

from agentkernel.daemon.manager import SandboxManager
from agentkernel.errors import AgentRequestError
from agentkernel.http.commands import Capped, envelope_pieces, file_pieces, result_pieces
from agentkernel.http.limits import DEFAULT_MAX_OUTPUT, Limits
from agentkernel.http.serve import RunningServer, ServeOptions, start_in_thread

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MIB = 1024 * 1024
GROWTH = 256 * MIB  # the server process may grow by this much under a flood, no more
SMALL = 64 * 1024
# Processes of a namespaces sandbox are visible on the host (gVisor's live in its sentry):
# the tests look for the command's own process, so they pick that backend.
NS = {"backend": "namespaces"}


@pytest.fixture(scope="module")
def small(service: SandboxManager) -> Iterator[RunningServer]:
    """A server with 64 KiB output and file limits (fast to hit)."""
    srv = start_in_thread(service, options=ServeOptions(
        "127.0.0.1", 0, API_KEY, limits=Limits(max_output=SMALL, max_file=SMALL)))
    yield srv
    srv.stop()


@pytest.fixture
def sandbox(server: RunningServer) -> Iterator[str]:
    name = prefix() + "-bnd"
    resp = httpx.post(server.url + "/sandboxes", json={"name": name}, headers=AUTH, timeout=60)
    assert resp.status_code == 201, resp.text
    yield name
    httpx.delete(f"{server.url}/sandboxes/{name}", headers=AUTH, timeout=60)


# -- memory of this process (the server runs on a thread of it) --

def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def reset_peak() -> int:
    """Reset the peak RSS (VmHWM) to now; returns the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def peak_growth(baseline: int) -> int:
    return _status("VmHWM") - baseline


# -- clients in other processes (their memory is not the server's) --

CLIENT = """
import json, os, sys, httpx
url, body = sys.argv[1], json.loads(sys.argv[2])
key = os.environ["AK_TEST_KEY"]
r = httpx.post(url, json=body, headers={"Authorization": "Bearer " + key}, timeout=600)
d = r.json()["data"]
print(json.dumps({"status": r.status_code, "len": len(d["output"]),
                  "rest": {k: v for k, v in d.items() if k != "output"}}))
"""

HANGING = """
import os, sys, time, httpx
url, body = sys.argv[1], sys.argv[2]
with httpx.Client(timeout=600) as c:
    with c.stream("POST", url, content=body, headers={
            "Authorization": "Bearer " + os.environ["AK_TEST_KEY"],
            "content-type": "application/json"}) as r:
        if sys.argv[3] == "stream":
            raw = r.iter_raw()  # (kept: a dropped iterator closes the connection)
            next(raw)  # the first event, then stop reading
        print("sent", flush=True)
        time.sleep(600)
"""
ENV = {**os.environ, "AK_TEST_KEY": API_KEY}


def post_from_another_process(url: str, body: dict[str, object]) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", CLIENT, url, json.dumps(body)],
                         capture_output=True, text=True, timeout=600, check=True,
                         env=ENV).stdout
    result: dict[str, object] = json.loads(out)
    return result


def hanging_client(url: str, body: dict[str, object], mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", HANGING, url, json.dumps(body), mode],
                            stdout=subprocess.PIPE, text=True, env=ENV)


def pids_with(mark: str) -> list[int]:
    """Processes whose command line holds `mark` (but not our hanging clients)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                if mark.encode() in cmdline and b"AK_TEST_KEY" not in cmdline:
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def wait_for(what: str, check: object, deadline: float = 120) -> None:
    end = time.monotonic() + deadline
    while not check():  # type: ignore[operator]
        assert time.monotonic() < end, f"gave up waiting: {what}"
        time.sleep(0.1)


def ancestors(pid: int) -> set[int]:
    seen = set()
    while pid > 1:
        seen.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return seen


def sandbox_of(service: SandboxManager, pid: int) -> str:
    """The one-shot (ephemeral) sandbox a process runs in."""
    chain = ancestors(pid)
    for row in service.store.ephemerals():
        if row["pid"] in chain:
            return str(row["name"])
    raise AssertionError(f"process {pid} is in no one-shot sandbox")


def ephemeral_names(service: SandboxManager) -> set[str]:
    return {r["name"] for r in service.store.ephemerals()}


# -- R5: output floods --

def test_run_flood_is_truncated_and_the_server_stays_small(server: RunningServer) -> None:
    baseline = reset_peak()
    got = post_from_another_process(server.url + "/run",
                                    {"command": ["head", "-c", "200M", "/dev/zero"]})
    growth = peak_growth(baseline)
    rest = got["rest"]
    assert got["status"] == 200 and got["len"] == DEFAULT_MAX_OUTPUT, got
    assert isinstance(rest, dict) and rest["truncated"] is True and rest["success"] is False
    assert "output truncated" in rest["stderr"] and "max_output_bytes" in rest["message"]
    assert growth < GROWTH, f"server grew by {growth // MIB} MiB"


def test_endless_output_is_cut_off(small: RunningServer, sandbox: str) -> None:
    """`yes` never ends by itself: the cap kills it, for /run, exec and batch alike."""
    h = httpx.Client(base_url=small.url, headers=AUTH, timeout=120)
    run = h.post("/run", json={"command": ["sh", "-c", "echo to-stderr >&2; exec yes"]})
    data = run.json()["data"]
    assert data["truncated"] is True and data["signal"] == 9, data
    # stdout and stderr share the cap; the agent reads the two pipes as data comes, so
    # `yes` may fill it before the earlier line on stderr is read (then that is dropped).
    kept_err = data["stderr"].split("\n[agentkernel: output truncated", 1)[0]
    assert kept_err in ("", "to-stderr\n"), data["stderr"][:200]
    assert len(data["output"]) + len(kept_err) == SMALL
    data = h.post(f"/sandboxes/{sandbox}/exec", json={"command": ["yes", "x"]}).json()["data"]
    assert data["truncated"] is True and set(data["output"]) == {"x", "\n"}
    batch = h.post("/batch/run", json={"commands": [{"command": ["yes"]},
                                                    {"command": ["echo", "small"]}]})
    first, second = batch.json()["data"]["results"]
    assert first["truncated"] is True and len(first["output"]) == SMALL // 2  # shared
    assert second["output"] == "small\n" and "truncated" not in second
    from agentkernel import AgentKernel

    with AgentKernel(base_url=small.url, api_key=API_KEY) as ours:
        out = ours.run(["yes"])
        assert out.truncated is True and out.success is False and len(out.output) == SMALL
    # The sandbox is still usable after its command was killed.
    ok = h.post(f"/sandboxes/{sandbox}/exec", json={"command": ["echo", "alive"]})
    assert ok.json()["data"]["output"] == "alive\n"


def test_stalled_stream_reader_bounds_memory_and_leaving_cancels(
        server: RunningServer, service: SandboxManager) -> None:
    """A client that stops reading /run/stream: the command waits, the server does not
    buffer; when the client goes, the command and its sandbox go."""
    mark = "ak-stall-" + secrets.token_hex(4)
    baseline = reset_peak()
    client = hanging_client(server.url + "/run/stream", {**NS, "command": [
        "sh", "-c", f"head -c 4G /dev/zero; : {mark}"]}, "stream")
    try:
        assert client.stdout is not None and client.stdout.readline() == "sent\n"
        wait_for("the command", lambda: pids_with(mark))
        name = sandbox_of(service, pids_with(mark)[0])
        # Unbounded, the server buffered ~60 MiB/s here (2 GiB in 25 s in the review).
        time.sleep(8)
        growth = peak_growth(baseline)
        assert growth < GROWTH, f"server grew by {growth // MIB} MiB under a stalled reader"
    finally:
        client.kill()
        client.wait()
    wait_for("the command to be killed", lambda: not pids_with(mark))
    wait_for("the sandbox to be removed", lambda: name not in ephemeral_names(service))


# -- R2: a client that leaves cancels its command --

def test_dropped_run_kills_command_and_removes_sandbox(server: RunningServer,
                                                       service: SandboxManager) -> None:
    mark = "ak-drop-" + secrets.token_hex(4)
    client = hanging_client(server.url + "/run",
                            {**NS, "command": ["sh", "-c", f"sleep 600; : {mark}"]}, "plain")
    try:
        wait_for("the command", lambda: pids_with(mark))
        name = sandbox_of(service, pids_with(mark)[0])
    finally:
        client.kill()
        client.wait()
    wait_for("the command to be killed", lambda: not pids_with(mark))
    wait_for("the sandbox to be removed", lambda: name not in ephemeral_names(service))


def test_dropped_exec_kills_command_and_keeps_sandbox(server: RunningServer,
                                                      sandbox: str) -> None:
    mark = "ak-dropx-" + secrets.token_hex(4)
    client = hanging_client(f"{server.url}/sandboxes/{sandbox}/exec",
                            {"command": ["sh", "-c", f"sleep 600; : {mark}"]}, "plain")
    try:
        wait_for("the command", lambda: pids_with(mark))
    finally:
        client.kill()
        client.wait()
    wait_for("the command to be killed", lambda: not pids_with(mark))
    ok = httpx.post(f"{server.url}/sandboxes/{sandbox}/exec", headers=AUTH, timeout=60,
                    json={"command": ["echo", "still-here"]})
    assert ok.json()["data"]["output"] == "still-here\n"


def test_dropped_batch_releases_its_sandboxes(server: RunningServer,
                                              service: SandboxManager) -> None:
    """Batch items run on the default backend (gVisor's processes are not visible here):
    the pool's count of sandboxes in use shows them taken and given back."""
    def in_use() -> int:
        return sum(p.in_use for p in service.pool_status())

    before = in_use()
    client = hanging_client(server.url + "/batch/run", {"commands": [
        {"command": ["sh", "-c", "sleep 600"]} for _ in range(2)]}, "plain")
    try:
        wait_for("the batch's sandboxes", lambda: in_use() >= before + 2)
        time.sleep(2)  # let the commands start (either way, leaving must cancel them)
    finally:
        client.kill()
        client.wait()
    wait_for("the sandboxes to be given back", lambda: in_use() <= before)


# -- R6: files --

def test_files_only_regular_and_capped(server: RunningServer, small: RunningServer,
                                       sandbox: str, service: SandboxManager) -> None:
    h = httpx.Client(headers=AUTH, timeout=60)
    setup = ("ln -s /dev/zero /tmp/z && mkfifo /tmp/fifo && head -c 100000 /dev/zero > "
             "/tmp/big && ln -s /tmp/big /tmp/link && printf ok > /tmp/fine")
    res = h.post(f"{server.url}/sandboxes/{sandbox}/exec", json={"command": ["sh", "-c", setup]})
    assert res.json()["data"]["exit_code"] == 0, res.text
    for path in ("/tmp/z", "/tmp/fifo", "/dev/null", "/dev/zero", "/tmp", "/proc/self/fd/0"):
        resp = h.get(f"{server.url}/sandboxes/{sandbox}/files/{path}")
        assert resp.status_code == 400, (path, resp.status_code, resp.text)
        assert resp.json()["success"] is False
        assert "regular" in resp.json()["error"] or "directory" in resp.json()["error"]
    got = h.get(f"{server.url}/sandboxes/{sandbox}/files//tmp/fine").json()["data"]
    assert got == {"content": "ok", "encoding": "utf8", "size": 2}
    whole = h.get(f"{server.url}/sandboxes/{sandbox}/files//tmp/link").json()["data"]
    assert whole["size"] == 100000 and whole["encoding"] == "utf8"  # NULs are valid UTF-8
    for path in ("/tmp/big", "/tmp/link"):
        resp = h.get(f"{small.url}/sandboxes/{sandbox}/files/{path}")
        assert resp.status_code == 413 and "max_file_bytes" in resp.json()["error"], resp.text

    # The agent's own check, on the descriptor it reads (a swap after the stat gains
    # nothing), and its own stop after `limit` bytes.
    class Sink:
        size = 0

        def write(self, data: bytes) -> int:
            self.size += len(data)
            return len(data)

    for max_bytes in (10, None):  # the HTTP API's reads and cp's alike
        with pytest.raises(AgentRequestError, match="not a regular file"):
            service.read_file_to(sandbox, "/tmp/z", Sink(), max_bytes=max_bytes)


# -- the JSON written in pieces --

def test_pieces_make_the_same_json() -> None:
    cap = Capped(10)
    cap("stdout", b"\x00\xc3")
    cap("stdout", b"\xa9\xff")  # an é split over two chunks, then an invalid byte
    cap("stderr", b'"\\\n' + b"x" * 20)
    from agentkernel.daemon.api import ExecResult

    doc = json.loads(b"".join(result_pieces(ExecResult(137, b"", b"", signal=9), cap)))
    assert doc["success"] is True and doc["error"] is None
    data = doc["data"]
    assert data["output"] == "\x00é\ufffd" and data["stderr"].startswith('"\\\nxxx')
    assert data["truncated"] is True and data["exit_code"] == 137
    assert json.loads(b"".join(envelope_pieces({}, {"a": iter([b"x"])})))["data"] == {"a": "x"}
    blob = os.urandom(600_000)
    doc = json.loads(b"".join(file_pieces(bytearray(blob))))
    assert doc["data"]["encoding"] == "base64" and doc["data"]["size"] == len(blob)
    assert base64.b64decode(doc["data"]["content"]) == blob
    text = ("é" * 300_000).encode()
    doc = json.loads(b"".join(file_pieces(bytearray(text))))
    assert doc["data"]["content"] == text.decode() and doc["data"]["encoding"] == "utf8"
