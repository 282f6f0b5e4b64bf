"""Flow control (PAUSE/RESUME/CANCEL) and bounded reads, against the real ak-agent binary."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentkernel.agent import AgentClient
from agentkernel.agent.client import HARD_LIMIT, HIGH_WATER, LOW_WATER, _ChanQueue
from agentkernel.agent.protocol import Frame, T
from agentkernel.errors import AgentRequestError, Cancelled, TooLarge
from agentkernel.paths import native_binary

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def agent_bin() -> Path:
    subprocess.run(["make", "-s", "-C", str(ROOT / "agent")], check=True)
    return native_binary("ak-agent")


@pytest.fixture
def client(agent_bin: Path) -> Iterator[AgentClient]:
    proc = subprocess.Popen([str(agent_bin)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            bufsize=0)
    assert proc.stdin is not None and proc.stdout is not None
    c = AgentClient(proc.stdout, proc.stdin)
    c.hello()
    try:
        yield c
    finally:
        c.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False


def _drain(execution: Any, want: int, within: float = 60.0) -> int:
    got = 0
    deadline = time.monotonic() + within
    for kind, payload in execution.events():
        if isinstance(payload, bytes):
            got += len(payload)
        if got >= want or kind == "exit" or time.monotonic() > deadline:
            break
    return got


# ---------------------------------------------------------------- the queue alone


def test_queue_asks_for_pause_and_resume_and_bounds_itself() -> None:
    asked: list[str] = []
    q = _ChanQueue(lambda _chan, action: asked.append(action), 7)
    chunk = Frame(T.STDOUT, 7, b"x" * 65536)
    while q.bytes < HIGH_WATER:
        q.put(chunk)
    assert asked == ["pause"]
    while q.bytes + len(chunk.payload) <= HARD_LIMIT:
        q.put(chunk)
    assert asked == ["pause"]  # asked once, not per frame
    blocked = threading.Thread(target=q.put, args=(chunk,), daemon=True)
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive(), "a full queue must hold the reader back"
    q.get(None)
    blocked.join(5)
    assert not blocked.is_alive()
    while q.bytes > LOW_WATER:
        q.get(None)
    assert asked == ["pause", "resume"]
    q.close()
    assert q.get(0) is None  # a closed channel wakes its waiters


# ---------------------------------------------------------------- the real agent


def test_a_reader_that_stops_pauses_its_command_and_nothing_else(client: AgentClient) -> None:
    stalled = client.exec(["yes", "stalled-output"])
    peak = 0
    for _ in range(30):  # ~3 s: the command prints as fast as it can all along
        peak = max(peak, client.queued_bytes())
        time.sleep(0.1)
    assert peak <= HARD_LIMIT
    assert client.flow_control
    # Twice the hard limit through another channel: a stalled channel must not hold the
    # connection (the reader would block on it if PAUSE did not work).
    got: list[int] = []

    def other() -> None:
        out, _err, status = client.exec(["head", "-c", str(2 * HARD_LIMIT), "/dev/zero"]).wait()
        got.append(len(out) if status.code == 0 else -1)

    t = threading.Thread(target=other, daemon=True)
    t.start()
    t.join(60)
    assert got == [2 * HARD_LIMIT], "another command on the connection was held up"
    client.ping()
    # Reading again resumes it.
    assert _drain(stalled, 8 * HARD_LIMIT) >= 8 * HARD_LIMIT
    stalled.cancel()
    assert _gone(stalled.pid)
    with pytest.raises(Cancelled):
        stalled.wait(timeout=5)
    client.ping()


def test_cancel_kills_a_command_without_reading_it(client: AgentClient) -> None:
    execution = client.exec(["sleep", "1000"])
    execution.cancel()
    assert _gone(execution.pid)
    assert client.exec(["true"]).wait(timeout=20)[2].code == 0


def test_an_abandoned_upload_leaves_no_file_and_frees_its_transfer(
        client: AgentClient, tmp_path: Path) -> None:
    class Failing:
        sent = 0

        def read(self, _n: int = -1) -> bytes:
            self.sent += 1
            if self.sent > 3:
                raise OSError(errno.ECONNRESET, "the uploader went away")
            return b"y" * 65536

    for _ in range(70):  # more than the agent's 64 transfers: each one is freed
        with pytest.raises(OSError):
            client.write_file(str(tmp_path / "target"), Failing())  # type: ignore[arg-type]
    deadline = time.monotonic() + 5
    while os.listdir(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert os.listdir(tmp_path) == []
    assert client.write_file(str(tmp_path / "target"), b"done") == 4


def test_an_abandoned_download_frees_its_transfer(client: AgentClient, tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"z" * (4 * 1024 * 1024))

    class Failing:
        def write(self, _b: bytes) -> int:
            raise OSError(errno.EPIPE, "the downloader went away")

    for _ in range(70):
        with pytest.raises(OSError):
            client.read_file_to(str(big), Failing())  # type: ignore[arg-type]
    assert client.read_file(str(big)) == big.read_bytes()


@pytest.mark.parametrize("target", ["/dev/zero", "/dev/null", "/dev/urandom"])
def test_reading_a_device_is_refused_even_through_a_symlink(
        client: AgentClient, tmp_path: Path, target: str) -> None:
    link = tmp_path / "innocent.txt"
    link.symlink_to(target)
    for path in (target, str(link)):
        with pytest.raises(AgentRequestError) as ei:
            client.read_file(path)
        assert ei.value.errno == errno.EINVAL
    (tmp_path / "real").write_bytes(b"ok")
    (tmp_path / "to-real").symlink_to(tmp_path / "real")
    assert client.read_file(str(tmp_path / "to-real")) == b"ok"  # a regular file: fine


def test_read_size_cap(client: AgentClient, tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"0123456789")
    assert client.read_file(str(f), max_bytes=10) == b"0123456789"
    with pytest.raises(TooLarge):
        client.read_file(str(f), max_bytes=9)
    client.ping()


# ---------------------------------------------------------------- the daemon's exec handle


def _handle(client: AgentClient, argv: list[str]) -> Any:
    from agentkernel.daemon.handles import ExecHandle

    return ExecHandle(client.exec(argv), timeout=None, oom=lambda: False, memory_mb=None)


def test_collected_output_stops_at_the_cap_and_says_so(client: AgentClient) -> None:
    script = "head -c 3000000 /dev/zero; head -c 3000000 /dev/zero >&2; echo end"
    result = _handle(client, ["sh", "-c", script]).pump(max_output=1000)
    assert result.exit_code == 0  # the command ran to its end
    assert result.truncated and len(result.stdout) + len(result.stderr) == 1000
    result = _handle(client, ["echo", "small"]).pump(max_output=1000)
    assert (result.stdout, result.truncated) == (b"small\n", False)


def test_abort_ends_a_pump_blocked_on_its_reader(client: AgentClient) -> None:
    handle = _handle(client, ["yes"])
    release = threading.Event()
    errors: list[BaseException] = []

    def slow(_kind: str, _data: bytes) -> None:
        release.wait(10)  # a client that does not read: the pump blocks here

    def pump() -> None:
        try:
            handle.pump(slow, collect=False)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    time.sleep(0.5)
    assert client.queued_bytes() <= HARD_LIMIT
    handle.abort()
    release.set()
    t.join(10)
    assert not t.is_alive() and len(errors) == 1 and isinstance(errors[0], Cancelled)
    assert _gone(handle.execution.pid)
    client.ping()
