"""What one command or client can take from the daemon: memory, threads, sandboxes, files.

Floods through a real daemon and real sandboxes (namespaces backend); the daemon's memory is
read from /proc/PID/status (VmRSS, and VmHWM after resetting it through clear_refs).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon
from sandbox_helpers import backend_available

HOST = ("-i", "host", "-B", "namespaces")
RSS_LIMIT_KIB = 256 * 1024
GIB = 1024 ** 3


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


class _Sampler:
    """VmRSS of a pid, sampled on a thread until stopped; the peak seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _kib(self.pid, "VmRSS"))

    def stop(self) -> int:
        self._stop.set()
        self._t.join(5)
        return max(self.peak, _kib(self.pid, "VmHWM"))


def _daemon_pid(daemon: Daemon) -> int:
    daemon.ensure_up()
    pid = daemon.pid()
    assert pid is not None
    return pid


def _open(daemon: Daemon, op: str, args: dict[str, Any]) -> tuple[socket.socket, Any]:
    """A raw client: one request, the reply lines readable from the returned file."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(str(daemon.run_dir / "daemon.sock"))
    s.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
    return s, s.makefile("rb")


def _hang_up(s: socket.socket, lines: Any) -> None:
    """Close the client's end for real (the file object holds the fd open too)."""
    lines.close()
    s.close()


def _running(marker: str) -> bool:
    return subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 0


def _wait_gone(marker: str, within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while _running(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _running(marker)


def _run_args(argv: list[str], cwd: Path) -> dict[str, Any]:
    return {"argv": argv, "image": "host", "backend": "namespaces", "cwd": str(cwd)}


@pytest.fixture
def box(daemon: Daemon) -> Iterator[str]:
    name = f"box-{secrets.token_hex(3)}"
    r = daemon.ak("create", name, *HOST)
    assert r.returncode == 0, r.stderr
    yield name
    daemon.ak("remove", name)


# ---------------------------------------------------------------- R5: output floods


def test_daemon_memory_stays_bounded_while_a_run_prints_2_gib(daemon: Daemon,
                                                               tmp_path: Path) -> None:
    pid = _daemon_pid(daemon)
    _reset_peak(pid)
    sampler = _Sampler(pid)
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentkernel", "run", *HOST, "--", "sh", "-c",
         "head -c 2G /dev/zero | tr '\\0' a"],
        cwd=tmp_path, env={**os.environ, **daemon.env}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    got = 0
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and (chunk := proc.stdout.read(1 << 20)):
        got += len(chunk)
    if time.monotonic() > deadline:
        proc.kill()
    code = proc.wait(60)
    peak = sampler.stop()
    assert (code, got) == (0, 2 * GIB)
    assert peak < RSS_LIMIT_KIB, f"daemon peaked at {peak // 1024} MiB"


def test_a_client_that_stops_reading_pauses_its_command_not_the_daemon(
        daemon: Daemon, tmp_path: Path) -> None:
    pid = _daemon_pid(daemon)
    marker = f"ak-flood-{secrets.token_hex(4)}"
    s, lines = _open(daemon, "run", _run_args(["yes", marker],
                                              tmp_path))
    try:
        assert json.loads(lines.readline())["ev"] == "started"
        lines.readline()  # output flows...
        _reset_peak(pid)
        sampler = _Sampler(pid)
        for _ in range(50):  # ...and then nobody reads it, for ~10 s
            time.sleep(0.2)
            assert daemon.ak("daemon", "status").returncode == 0  # the daemon still answers
        peak = sampler.stop()
        assert peak < RSS_LIMIT_KIB, f"daemon peaked at {peak // 1024} MiB"
        # The command was paused, not dropped: reading again gets its output going.
        got = sum(len(lines.readline()) for _ in range(2000))
        assert got > 2000 and _running(marker)
    finally:
        _hang_up(s, lines)
    assert _wait_gone(marker), "the command outlived its client"


def test_a_stalled_exec_does_not_hold_up_others_on_the_same_sandbox(
        daemon: Daemon, box: str, tmp_path: Path) -> None:
    marker = f"ak-stall-{secrets.token_hex(4)}"
    s, lines = _open(daemon, "exec", {"name": box, "argv": ["yes", marker]})
    try:
        assert json.loads(lines.readline())["ev"] == "started"
        time.sleep(1)  # its output backs up into the daemon's queue for that channel
        # 16 MiB through the same agent connection: far more than any channel may queue.
        r = daemon.ak("exec", box, "--", "sh", "-c", "head -c 16777216 /dev/zero | wc -c",
                      timeout=120)
        assert (r.returncode, r.stdout.strip()) == (0, "16777216"), r.stderr
        r = daemon.ak("exec", box, "--", "sh", "-c", "head -c 16777216 /dev/zero | tr '\\0' b",
                      timeout=120)
        assert r.returncode == 0 and len(r.stdout) == 16777216
        assert daemon.ak("exec", box, "--", "sh", "-c",
                         "head -c 3000000 /dev/urandom > /tmp/blob").returncode == 0
        assert daemon.ak("cp", f"{box}:/tmp/blob", str(tmp_path / "blob")).returncode == 0
        assert (tmp_path / "blob").stat().st_size == 3000000
    finally:
        _hang_up(s, lines)
    assert _wait_gone(marker), "the stalled command outlived its client"


# ---------------------------------------------------------------- R2: clients that leave


def test_an_exec_whose_client_leaves_is_killed(daemon: Daemon, box: str) -> None:
    marker = f"ak-left-{secrets.token_hex(4)}"
    s, lines = _open(daemon, "exec", {"name": box, "argv": ["sh", "-c",
                                                            f"sleep 1000 && echo {marker}"]})
    assert json.loads(lines.readline())["ev"] == "started"
    assert _running(marker)
    _hang_up(s, lines)
    assert _wait_gone(marker)


def test_a_command_whose_sandbox_is_stopped_is_answered(daemon: Daemon, box: str) -> None:
    s, lines = _open(daemon, "exec", {"name": box, "argv": ["sleep", "1000"]})
    try:
        assert json.loads(lines.readline())["ev"] == "started"
        assert daemon.ak("stop", box).returncode == 0
        last = json.loads(lines.readline())  # not a bare hang-up
    finally:
        _hang_up(s, lines)
    assert last.get("ev") == "exit" or last.get("ok") is False, last


def test_abandoned_runs_free_their_sandboxes(daemon: Daemon, tmp_path: Path) -> None:
    daemon.ensure_up()
    marker = f"ak-many-{secrets.token_hex(4)}"
    for _ in range(3):
        socks = []
        for _ in range(8):
            s, lines = _open(daemon, "run", _run_args(
                ["sh", "-c", f"sleep 1000 && echo {marker}"], tmp_path))
            assert json.loads(lines.readline())["ev"] == "started"
            socks.append((s, lines))
        for s, lines in socks:
            _hang_up(s, lines)
        assert _wait_gone(marker, 30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = json.loads(daemon.ak("daemon", "status", "--json").stdout)
        if all(p["in_use"] == 0 for p in st["pools"]) and st["connections"] <= 1:
            break
        time.sleep(0.2)
    assert all(p["in_use"] == 0 for p in st["pools"]), st["pools"]
    assert st["connections"] <= 1  # just the status request itself
    assert daemon.ak("run", *HOST, "--", "echo", "still-serving",
                     cwd=tmp_path).stdout == "still-serving\n"


def test_a_sandbox_created_for_a_client_that_left_is_removed(daemon: Daemon) -> None:
    daemon.ensure_up()
    name = f"box-{secrets.token_hex(3)}"
    s, lines = _open(daemon, "create", {"name": name, "image": "host",
                                        "backend": "namespaces"})
    _hang_up(s, lines)  # before the answer
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until the daemon is done with the request
        st = json.loads(daemon.ak("daemon", "status", "--json").stdout)
        if st["connections"] <= 1:
            break
        time.sleep(0.1)
    assert st["connections"] <= 1
    names = [row["name"] for row in json.loads(daemon.ak("list", "--json").stdout)]
    assert name not in names
    assert not (daemon.home / "sandboxes" / name).exists()


def test_an_upload_whose_client_leaves_leaves_nothing(daemon: Daemon, box: str) -> None:
    s, lines = _open(daemon, "cp_in", {"name": box, "path": "/tmp/up/partial", "mode": 420})
    s.sendall(json.dumps({"d": "x" * 100000}).encode() + b"\n")
    time.sleep(0.5)
    _hang_up(s, lines)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = daemon.ak("exec", box, "--", "ls", "-A", "/tmp/up")
        if r.stdout == "":
            break
        time.sleep(0.1)
    assert r.stdout == "", f"left behind: {r.stdout!r}"


def test_connections_beyond_the_limit_get_an_answer(daemon: Daemon) -> None:
    daemon.ensure_up()
    st = json.loads(daemon.ak("daemon", "status", "--json").stdout)
    limit = int(st["max_connections"])
    held = []
    try:
        for _ in range(limit):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(daemon.run_dir / "daemon.sock"))
            held.append(s)
        time.sleep(0.3)
        r = daemon.ak("list")
        assert r.returncode != 0 and "busy" in r.stderr, r.stderr
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 10
    while daemon.ak("list").returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert daemon.ak("list").returncode == 0


# ---------------------------------------------------------------- R3: errors are answered


@pytest.mark.skipif(not backend_available("gvisor"), reason="needs runsc")
def test_a_fifo_in_the_project_is_left_out_not_a_hang_up(daemon: Daemon,
                                                         tmp_path: Path) -> None:
    """A persistent gVisor sandbox copies a `moderate` project dir: the copy meets a FIFO,
    which it leaves out (as any file that is not a dir, a regular file or a link:
    `paths.plain_entries_only`), instead of hanging on it or failing the create."""
    project = tmp_path / "proj"
    project.mkdir()
    os.mkfifo(project / "pipe")
    (project / "kept.txt").write_text("kept\n")
    name = f"gv-{secrets.token_hex(3)}"
    r = daemon.ak("create", name, "-i", "host", "-B", "gvisor", "--dir", str(project))
    try:
        assert r.returncode == 0, r.stderr
        assert "closed the connection" not in r.stderr
        # (A glob, not ls: this host's runsc fails coreutils' statx.)
        r = daemon.ak("exec", name, "--", "sh", "-c", "echo /workspace/*")
        assert (r.returncode, r.stdout) == (0, "/workspace/kept.txt\n"), r.stderr
    finally:
        daemon.ak("rm", name)


# ---------------------------------------------------------------- R6: reading files


def test_reading_a_device_or_fifo_from_a_sandbox_is_refused(daemon: Daemon, box: str,
                                                           tmp_path: Path) -> None:
    from agentkernel.ipc import client

    setup = "ln -s /dev/zero /tmp/zero; mkfifo /tmp/fifo; head -c 5000 /dev/zero > /tmp/big"
    assert daemon.ak("exec", box, "--", "sh", "-c", setup).returncode == 0
    with daemon.use():
        for path in ("/tmp/zero", "/dev/zero", "/dev/urandom", "/tmp/fifo"):
            with pytest.raises(client.DaemonError) as ei:
                client.call("read_file", {"name": box, "path": path})
            assert "Invalid argument" in ei.value.message, path
        with pytest.raises(client.DaemonError) as ei:
            client.call("read_file", {"name": box, "path": "/tmp/big", "max_bytes": 4999})
        assert ei.value.kind == "TooLarge"
        assert len(client.call("read_file", {"name": box, "path": "/tmp/big",
                                             "max_bytes": 5000})) == 5000
    r = daemon.ak("cp", f"{box}:/tmp/zero", str(tmp_path / "zero"), timeout=30)
    assert r.returncode != 0 and "Invalid argument" in r.stderr
    assert not (tmp_path / "zero").exists()


# ---------------------------------------------------------------- caps on what is kept


def test_detached_logs_stop_at_the_cap(daemon: Daemon, box: str) -> None:
    """A detached command's log keeps at most the cap (the newest output, behind a marker),
    and a read of it at most max_bytes per stream."""
    from agentkernel.daemon.quota import DEFAULT_LOG_BYTES, LOG_MARKER
    from agentkernel.ipc import client

    cap = DEFAULT_LOG_BYTES
    with daemon.use():
        det = client.call("exec_detached", {
            "name": box, "argv": ["sh", "-c", f"head -c {cap + 4096} /dev/zero | tr '\\0' c; "
                                              "echo done >&2"]})
        deadline = time.monotonic() + 120
        while det["status"] == "running" and time.monotonic() < deadline:
            time.sleep(0.2)
            det = client.call("detached_status", {"name": box, "cmd_id": det["id"]})
        assert det["status"] == "completed" and det["exit_code"] == 0
        assert det["truncated"] is True
        out, err = client.call("detached_logs", {"name": box, "cmd_id": det["id"],
                                                 "max_bytes": 100})
        marker = LOG_MARKER.decode()
        assert out == marker + "c" * (100 - len(marker)) and err == "done\n"
    logs = daemon.home / "sandboxes" / box / "exec"
    kept = sum(p.stat().st_size for p in logs.glob(f"{det['id']}.stdout*")
               if not p.name.endswith(".dropped"))
    assert kept <= cap


# ---------------------------------------------------------------- S6: cp's temporary file


def test_cp_out_never_writes_through_a_planted_symlink(daemon: Daemon, box: str,
                                                       tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from agentkernel.cli import main
    from agentkernel.cli import sandboxes as commands

    assert daemon.ak("exec", box, "--", "sh", "-c", "echo payload > /tmp/p").returncode == 0
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    dest = tmp_path / "dest"
    old_name = tmp_path / f"dest.ak-{os.getpid()}.tmp"  # what cp used to open, plainly
    old_name.symlink_to(victim)
    guessed = "0123456789abcdef"
    planted = tmp_path / f".dest.ak-{guessed}.tmp"
    planted.symlink_to(victim)
    dangling = tmp_path / ".dest.ak-fedcba9876543210.tmp"
    dangling.symlink_to(tmp_path / "created-through-link")
    tokens = iter([guessed, "fedcba9876543210"])
    monkeypatch.setattr(commands, "_random_token", lambda: next(tokens, secrets.token_hex(8)))
    with daemon.use():
        assert main(["cp", f"{box}:/tmp/p", str(dest)]) == 0
    assert dest.read_text() == "payload\n" and not dest.is_symlink()
    assert stat.S_ISREG(dest.lstat().st_mode)
    assert victim.read_text() == "precious\n"
    assert not (tmp_path / "created-through-link").exists()
    assert old_name.is_symlink() and planted.is_symlink() and dangling.is_symlink()


# ---------------------------------------------------------------- malformed requests


def _one_reply(daemon: Daemon, line: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(str(daemon.run_dir / "daemon.sock"))
        s.sendall(line)
        with s.makefile("rb") as f:
            reply = json.loads(f.readline())
    assert isinstance(reply, dict)
    return reply


@pytest.mark.parametrize("line", [
    b"[" * 100_000 + b"]" * 100_000 + b"\n",
    b'{"op": "ping", "args": {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}\n",
], ids=["array", "in-args"])
def test_json_nested_too_deeply_is_a_usage_error(daemon: Daemon, line: bytes) -> None:
    """`[[[[…` deeper than the JSON parser recurses is the client's mistake (UsageError:
    exit code 2), not an internal error, and the daemon serves the next request."""
    reply = _one_reply(daemon, line)
    assert reply["ok"] is False
    assert (reply["error"]["type"], reply["error"]["exit_code"]) == ("UsageError", 2), reply
    assert "nests too deeply" in reply["error"]["message"]
    assert _one_reply(daemon, b'{"op": "ping"}\n')["ok"] is True


def test_a_stream_line_nested_too_deeply_ends_only_its_stream(daemon: Daemon,
                                                              box: str) -> None:
    """The control lines of a running exec (stdin, signals) are read the same way: one that
    cannot be read ends its command (as a client gone would), not the control thread
    alone with the command left running unattended; the daemon serves on."""
    marker = f"3{secrets.randbelow(10**6):06d}"
    s, lines = _open(daemon, "exec", {"name": box, "argv": ["sleep", marker]})
    try:
        assert json.loads(lines.readline())["ev"] == "started"
        s.sendall(b"[" * 100_000 + b"]" * 100_000 + b"\n")
        last = json.loads(lines.readline())
        assert (last["ok"], last["error"]["type"]) == (False, "Cancelled"), last
    finally:
        _hang_up(s, lines)
    assert _wait_gone(f"sleep {marker}")
    assert _one_reply(daemon, b'{"op": "ping"}\n')["ok"] is True
    log = (daemon.home / "daemon.log").read_text(errors="replace")
    assert "RecursionError" not in log, log[-2000:]


def test_a_request_line_over_the_cap_is_refused(daemon: Daemon) -> None:
    from agentkernel.daemon.server import MAX_LINE

    reply = _one_reply(daemon, b'{"op": "ping", "pad": "' + b"x" * MAX_LINE + b'"}\n')
    assert (reply["error"]["type"], reply["error"]["exit_code"]) == ("UsageError", 2), reply
    assert _one_reply(daemon, b'{"op": "ping"}\n')["ok"] is True


# ---------------------------------------------------------------- cp of special files


def test_cp_refuses_a_host_fifo_device_or_socket_without_waiting(daemon: Daemon, box: str,
                                                                 tmp_path: Path) -> None:
    """`cp FIFO box:/…` waited for a writer forever. Anything but a regular file (a FIFO,
    a link to one, a device, a socket) is refused at once, naming what it is, and nothing
    is written into the sandbox."""
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "to-fifo").symlink_to(tmp_path / "fifo")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "sock"))
    cases = {tmp_path / "fifo": "a FIFO", tmp_path / "to-fifo": "a FIFO",
             Path("/dev/zero"): "a character device", tmp_path / "sock": "a socket"}
    try:
        for src, kind in cases.items():
            r = daemon.ak("cp", str(src), f"{box}:/tmp/copied", timeout=30)
            assert r.returncode == 2, (src, r.stderr)
            assert f"is {kind}, not a regular file" in r.stderr, (src, r.stderr)
    finally:
        sock.close()
    r = daemon.ak("exec", box, "--", "sh", "-c", "test -e /tmp/copied && echo there; true")
    assert r.stdout == "", r.stdout
    (tmp_path / "plain").write_text("plain\n")
    assert daemon.ak("cp", str(tmp_path / "plain"), f"{box}:/tmp/copied").returncode == 0


def test_cp_out_of_a_sandbox_fifo_or_device_is_refused(daemon: Daemon, box: str,
                                                      tmp_path: Path) -> None:
    """The other way: a FIFO (or a device) the sandbox offers as the file to copy out is
    refused by its agent, not waited on, and nothing is left on the host."""
    assert daemon.ak("exec", box, "--", "sh", "-c",
                     "mkfifo /tmp/out-fifo; ln -s /tmp/out-fifo /tmp/to-fifo").returncode == 0
    for src in ("/tmp/out-fifo", "/tmp/to-fifo", "/dev/zero"):
        r = daemon.ak("cp", f"{box}:{src}", str(tmp_path / "out"), timeout=30)
        assert r.returncode != 0 and "not a regular file" in r.stderr, (src, r.stderr)
        assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_cp_into_a_sandbox_fifo_does_not_wait(daemon: Daemon, box: str,
                                             tmp_path: Path) -> None:
    """A FIFO at the destination inside the sandbox is replaced (the agent writes a new
    file and renames it over the name), never opened and waited on."""
    assert daemon.ak("exec", box, "--", "mkfifo", "/tmp/in-fifo").returncode == 0
    (tmp_path / "plain").write_text("plain\n")
    r = daemon.ak("cp", str(tmp_path / "plain"), f"{box}:/tmp/in-fifo", timeout=30)
    assert r.returncode == 0, r.stderr
    r = daemon.ak("exec", box, "--", "cat", "/tmp/in-fifo", timeout=30)
    assert r.stdout == "plain\n", r.stderr
