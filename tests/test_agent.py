"""The real ak-agent binary driven over pipes and sockets (no sandbox around it)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import platform
import queue
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel.agent import AgentClient, ExitStatus
from agentkernel.agent.protocol import (
    FEATURE_QUERY,
    HEADER_SIZE,
    MAX_PAYLOAD,
    Frame,
    T,
    Tag,
    decode_header,
    encode_exec,
    encode_frame,
    encode_tlvs,
    tlv_dict,
)
from agentkernel.errors import (
    AgentRequestError,
    CommandNotExecutable,
    CommandNotFound,
    ProtocolError,
)
from agentkernel.paths import native_binary

ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="session")
def agent_bin() -> Path:
    subprocess.run(["make", "-s", "-C", str(ROOT / "agent")], check=True)
    return native_binary("ak-agent")


class Agent:
    """An ak-agent child process on pipes with a client attached."""

    def __init__(self, binary: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(binary), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.client = AgentClient(self.proc.stdout, self.proc.stdin)

    def stop(self) -> int:
        self.client.close()
        try:
            return self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@pytest.fixture
def agent(agent_bin: Path) -> Iterator[Agent]:
    a = Agent(agent_bin)
    a.client.hello()
    yield a
    assert a.stop() == 0


@pytest.fixture
def client(agent: Agent) -> AgentClient:
    return agent.client


def run(client: AgentClient, argv: list[str], **kw: object) -> tuple[bytes, bytes, ExitStatus]:
    return client.exec(argv, **kw).wait(timeout=20)  # type: ignore[arg-type]


def gone(pid: int, within: float = 30.0) -> bool:
    """True once pid no longer runs (absent, or a zombie nobody reaped yet); the bound is
    generous for a loaded machine (a passing check returns at once)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False


# ---------------------------------------------------------------- hello, ping, exec


def test_hello_describes_the_agent(agent: Agent) -> None:
    info = agent.client.hello()
    assert info.version == 1
    assert info.pid == agent.proc.pid
    assert info.name.startswith("ak-agent ")
    assert info.uid == os.getuid()
    assert info.features & FEATURE_QUERY


def test_ping(client: AgentClient) -> None:
    assert 0 < client.ping() < 1


def test_exec_collects_stdout_stderr_and_exit_code(client: AgentClient) -> None:
    out, err, st = run(client, ["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (out, err) == (b"out\n", b"err\n")
    assert st == ExitStatus(code=7, signal=None)
    assert st.shell_code == 7


def test_environment_is_exactly_what_was_given(client: AgentClient) -> None:
    out, _, st = run(client, ["env"], env={"A": "1", "B": "two words"})
    assert st.code == 0
    assert sorted(out.decode().splitlines()) == ["A=1", "B=two words"]


def test_path_search_uses_the_commands_env(client: AgentClient, tmp_path: Path) -> None:
    tool = tmp_path / "mytool"
    tool.write_text("#!/bin/sh\necho from-mytool\n")
    tool.chmod(0o755)
    out, _, st = run(client, ["mytool"], env={"PATH": f"/nonexistent:{tmp_path}"})
    assert (out, st.code) == (b"from-mytool\n", 0)
    with pytest.raises(CommandNotFound):
        client.exec(["mytool"], env={"PATH": "/bin"})


def test_cwd_umask_and_rlimit(client: AgentClient) -> None:
    out, _, st = run(
        client,
        ["sh", "-c", "pwd; umask; ulimit -n"],
        cwd="/tmp",
        umask=0o027,
        rlimits=[(7, 64, 64)],  # RLIMIT_NOFILE
    )
    assert st.code == 0
    assert out.decode().split() == ["/tmp", "0027", "64"]


def test_child_has_own_process_group_and_clean_signal_state(client: AgentClient) -> None:
    # `cat` exec'd directly reads its own state (a shell blocks signals while it waits and
    # Python ignores SIGPIPE/SIGXFSZ by itself, so neither can be the probe).
    out, _, _ = run(client, ["cat", "/proc/self/stat", "/proc/self/status"])
    lines = out.decode().split("\n")
    stat = lines[0].rsplit(")", 1)[1].split()  # fields after the command name
    pid, pgid = lines[0].split()[0], stat[2]
    assert pid == pgid
    assert "SigBlk:\t0000000000000000" in lines
    assert "SigIgn:\t0000000000000000" in lines


def test_child_fds_are_fresh(client: AgentClient) -> None:
    out, _, _ = run(
        client, ["sh", "-c", "ls -l /proc/self/fd/ | tail -n +2; readlink /proc/$$/fd/0"]
    )
    text = out.decode()
    assert text.strip().endswith("/dev/null")
    # Only 0, 1, 2 (and ls's own directory fd 3) are open: nothing of the agent leaks.
    fds = {line.split()[-3] for line in text.splitlines() if " -> " in line}
    assert fds <= {"0", "1", "2", "3"}


def test_command_not_found_and_not_executable(client: AgentClient, tmp_path: Path) -> None:
    with pytest.raises(CommandNotFound) as nf:
        client.exec(["definitely-not-a-command-xyz"])
    assert nf.value.exit_code == 127 and nf.value.errno == errno.ENOENT
    with pytest.raises(CommandNotFound):
        client.exec([str(tmp_path / "missing")])
    script = tmp_path / "noexec.sh"
    script.write_text("echo hi\n")
    script.chmod(0o644)  # even root cannot exec a file without any x bit
    with pytest.raises(CommandNotExecutable) as ne:
        client.exec([str(script)])
    assert ne.value.exit_code == 126
    with pytest.raises(CommandNotExecutable):
        client.exec([str(tmp_path)])


def test_bad_cwd_is_a_request_error_not_command_not_found(client: AgentClient) -> None:
    with pytest.raises(AgentRequestError) as ei:
        client.exec(["true"], cwd="/nonexistent-dir")
    assert not isinstance(ei.value, CommandNotFound)
    assert ei.value.errno == errno.ENOENT
    assert "chdir" in ei.value.message


def test_exec_rejects_bad_arguments_locally(client: AgentClient) -> None:
    with pytest.raises(ValueError):
        client.exec([])
    with pytest.raises(ValueError):
        client.exec(["echo", "a\0b"])


# ---------------------------------------------------------------- streaming and stdin


def test_output_streams_before_exit(client: AgentClient) -> None:
    ex = client.exec(["sh", "-c", "echo first; sleep 1.5; echo second"])
    start = time.monotonic()
    events = ex.events()
    assert next(events) == ("stdout", b"first\n")
    assert time.monotonic() - start < 1.0
    rest = list(events)
    assert rest[-1][0] == "exit"
    assert b"".join(v for k, v in rest if k == "stdout") == b"second\n"  # type: ignore[misc]


def test_stdin_roundtrip_large(client: AgentClient) -> None:
    data = os.urandom(5 * 1024 * 1024)
    ex = client.exec(["cat"], stdin=True)
    result: list[tuple[bytes, bytes, ExitStatus]] = []
    t = threading.Thread(target=lambda: result.append(ex.wait(30)))
    t.start()  # read while writing: cat's output must not block its input
    for i in range(0, len(data), 100_000):
        ex.write_stdin(data[i : i + 100_000])
    ex.close_stdin()
    t.join(30)
    out, _, st = result[0]
    assert st.code == 0
    assert hashlib.sha256(out).digest() == hashlib.sha256(data).digest()


def test_stdin_is_devnull_unless_requested(client: AgentClient) -> None:
    out, _, st = run(client, ["cat"])
    assert (out, st.code) == (b"", 0)


def test_closing_absent_stdin_sends_nothing(client: AgentClient) -> None:
    """A command started without stdin has /dev/null: its EOF frame would be a write and
    a wake-up of the agent on every run's path for nothing."""
    sent: list[int] = []
    send = client._send

    def spy(ftype: int, chan: int, payload: bytes | memoryview = b"") -> None:
        sent.append(ftype)
        send(ftype, chan, payload)

    client._send = spy  # type: ignore[method-assign]
    ex = client.exec(["cat"])
    ex.close_stdin()
    assert ex.wait(5)[2].code == 0
    assert T.STDIN not in sent
    ex = client.exec(["cat"], stdin=True)
    ex.write_stdin(b"x")
    ex.close_stdin()  # with stdin, EOF is what ends cat
    assert ex.wait(5)[0] == b"x"
    assert sent.count(T.STDIN) == 2


def test_interactive_stdin(client: AgentClient) -> None:
    ex = client.exec(["sh", "-c", "while read l; do echo got:$l; done"], stdin=True)
    ev = ex.events()
    ex.write_stdin(b"one\n")
    assert next(ev) == ("stdout", b"got:one\n")
    ex.write_stdin(b"two\n")
    assert next(ev) == ("stdout", b"got:two\n")
    ex.close_stdin()
    assert ex.wait(5)[2].code == 0


# ---------------------------------------------------------------- signals, timeout, kill


def test_signal_reaches_whole_process_group(client: AgentClient) -> None:
    ex = client.exec(["sh", "-c", "sleep 30 & echo $!; wait"])
    kind, data = next(ex.events())
    assert kind == "stdout"
    grandchild = int(data)  # type: ignore[arg-type]
    ex.signal(signal.SIGTERM)
    _, _, st = ex.wait(5)
    assert st.signal == signal.SIGTERM and st.code is None
    assert st.shell_code == 128 + signal.SIGTERM
    assert gone(grandchild)


def test_kill(client: AgentClient) -> None:
    ex = client.exec(["sleep", "30"])
    ex.kill()
    assert ex.wait(5)[2].signal == signal.SIGKILL


def test_timeout(client: AgentClient) -> None:
    start = time.monotonic()
    _, _, st = run(client, ["sleep", "30"], timeout=0.3)
    assert st.timed_out and st.signal == signal.SIGKILL
    assert time.monotonic() - start < 3


def test_fast_command_is_not_marked_timed_out(client: AgentClient) -> None:
    _, _, st = run(client, ["true"], timeout=5)
    assert st == ExitStatus(code=0, signal=None, timed_out=False)


def test_background_grandchild_does_not_hold_up_exit(client: AgentClient) -> None:
    # The grandchild outlives run()'s bound (20 s) by far: the exit came without it.
    # (Was: a 5 s grandchild and an exit within 2 s, a timing a loaded machine can miss.)
    out, _, st = run(client, ["sh", "-c", "sleep 600 & echo $!"])
    assert st.code == 0 and not st.timed_out, st
    with contextlib.suppress(ProcessLookupError):
        os.kill(int(out), signal.SIGKILL)


def test_wait_timeout_raises(client: AgentClient) -> None:
    ex = client.exec(["sleep", "30"])
    with pytest.raises(TimeoutError):
        ex.wait(timeout=0.2)
    ex.kill()
    assert ex.wait(5)[2].signal == signal.SIGKILL


def test_core_flag_and_signal_death(client: AgentClient) -> None:
    _, _, st = run(client, ["sh", "-c", "kill -SEGV $$"], rlimits=[(4, 0, 0)])  # RLIMIT_CORE 0
    assert st.signal == signal.SIGSEGV and not st.core


# ---------------------------------------------------------------- concurrency


def test_many_concurrent_commands(client: AgentClient) -> None:
    execs = [client.exec(["sh", "-c", "sleep 0.3; echo $0", str(i)]) for i in range(60)]
    start = time.monotonic()
    for i, ex in enumerate(execs):
        out, _, st = ex.wait(20)
        assert (out, st.code) == (f"{i}\n".encode(), 0)
    assert time.monotonic() - start < 10  # they ran side by side, not one after another


def test_concurrent_clients_threads(client: AgentClient) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for j in range(10):
                out, _, _ = run(client, ["echo", f"{n}-{j}"])
                assert out == f"{n}-{j}\n".encode()
                client.ping()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors


def test_slow_reader_of_one_command_does_not_starve_others(client: AgentClient) -> None:
    noisy = client.exec(["sh", "-c", "head -c 20000000 /dev/zero"])
    quick = client.exec(["echo", "hi"])
    assert quick.wait(10)[0] == b"hi\n"
    out, _, st = noisy.wait(30)
    assert (len(out), st.code) == (20_000_000, 0)


# ---------------------------------------------------------------- PTY


def test_pty_size_and_tty(client: AgentClient) -> None:
    out, _, st = run(
        client, ["sh", "-c", "stty size; test -t 0 && test -t 1 && echo tty"], pty=(30, 100)
    )
    assert st.code == 0
    assert out.replace(b"\r\n", b"\n") == b"30 100\ntty\n"


def test_pty_resize_sends_sigwinch(client: AgentClient) -> None:
    ex = client.exec(
        ["sh", "-c", "trap 'stty size; exit 0' WINCH; echo ready; while :; do sleep 0.05; done"],
        pty=(24, 80),
    )
    ev = ex.events()
    assert next(ev)[1] == b"ready\r\n"
    ex.resize(50, 132)
    out = b""
    for kind, value in ev:
        if kind == "stdout":
            out += value  # type: ignore[operator]
        elif kind == "exit":
            assert value.code == 0  # type: ignore[union-attr]
    assert b"50 132" in out


def test_pty_input(client: AgentClient) -> None:
    ex = client.exec(["sh", "-c", "read x; echo got:$x"], pty=(24, 80))
    ex.write_stdin(b"hello\n")
    out, _, st = ex.wait(5)
    assert st.code == 0
    assert b"got:hello" in out


# ---------------------------------------------------------------- files


def test_write_read_roundtrip_and_mode(client: AgentClient, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "f.txt"
    assert client.write_file(str(path), b"hello", mode=0o600, mkdirs=True) == 5
    assert path.read_bytes() == b"hello"
    assert path.stat().st_mode & 0o7777 == 0o600
    assert client.read_file(str(path)) == b"hello"
    assert client.write_file(str(path), b" world", append=True) == 6
    assert client.read_file(str(path)) == b"hello world"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.txt"]  # no temp files left


def test_partial_read(client: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"0123456789")
    buf = io.BytesIO()
    assert client.read_file_to(str(tmp_path / "f"), buf, offset=3, length=4) == 4
    assert buf.getvalue() == b"3456"


def test_twenty_mib_file_both_ways(client: AgentClient, tmp_path: Path) -> None:
    data = os.urandom(20 * 1024 * 1024)
    path = tmp_path / "big.bin"
    assert client.write_file(str(path), io.BytesIO(data)) == len(data)
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()
    out = io.BytesIO()
    assert client.read_file_to(str(path), out) == len(data)
    assert out.getvalue() == data


def test_file_transfer_while_command_streams(client: AgentClient, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(3 * 1024 * 1024))
    ex = client.exec(["sh", "-c", "for i in 1 2 3 4 5; do echo $i; sleep 0.05; done"])
    assert client.read_file(str(path)) == path.read_bytes()
    assert ex.wait(10)[0] == b"1\n2\n3\n4\n5\n"


def test_file_errors(client: AgentClient, tmp_path: Path) -> None:
    with pytest.raises(AgentRequestError) as ei:
        client.read_file(str(tmp_path / "missing"))
    assert ei.value.errno == errno.ENOENT
    with pytest.raises(AgentRequestError) as ei:
        client.read_file(str(tmp_path))
    assert ei.value.errno == errno.EISDIR
    with pytest.raises(AgentRequestError) as ei:
        client.write_file(str(tmp_path), b"x")
    assert ei.value.errno == errno.EISDIR
    with pytest.raises(AgentRequestError) as ei:
        client.write_file(str(tmp_path / "no" / "parent"), b"x")
    assert ei.value.errno == errno.ENOENT
    with pytest.raises(ValueError):
        client.read_file("relative/path")


def test_atomic_write_replaces_symlink_not_its_target(client: AgentClient, tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(target)
    client.write_file(str(link), b"new")
    assert target.read_text() == "keep"
    assert not link.is_symlink() and link.read_text() == "new"
    link2 = tmp_path / "link2"
    link2.symlink_to(target)
    with pytest.raises(AgentRequestError) as ei:
        client.write_file(str(link2), b"x", append=True)  # O_NOFOLLOW
    assert ei.value.errno == errno.ELOOP


def test_stat_and_list(client: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    (tmp_path / "d").mkdir()
    (tmp_path / "l").symlink_to("f")
    st = client.stat(str(tmp_path / "f"))
    assert (st.type, st.size, st.mode) == ("file", 3, (tmp_path / "f").stat().st_mode & 0o7777)
    assert st.mtime_ns == (tmp_path / "f").stat().st_mtime_ns
    assert st.uid == os.getuid()
    ls = client.stat(str(tmp_path / "l"), follow=False)
    assert (ls.type, ls.link_target) == ("symlink", "f")
    assert client.stat(str(tmp_path / "l")).type == "file"
    entries = {e.name: e for e in client.list_dir(str(tmp_path))}
    assert {n: e.type for n, e in entries.items()} == {"f": "file", "d": "dir", "l": "symlink"}
    assert entries["f"].size == 3
    with pytest.raises(AgentRequestError) as ei:
        client.stat(str(tmp_path / "nope"))
    assert ei.value.errno == errno.ENOENT


def test_list_large_directory(client: AgentClient, tmp_path: Path) -> None:
    names = {f"file-{i:05d}-{'x' * 40}" for i in range(3000)}
    for n in names:
        (tmp_path / n).touch()
    assert {e.name for e in client.list_dir(str(tmp_path))} == names


def test_mkdir_and_remove(client: AgentClient, tmp_path: Path) -> None:
    client.mkdir(str(tmp_path / "a"), mode=0o700)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o700
    with pytest.raises(AgentRequestError) as ei:
        client.mkdir(str(tmp_path / "a"))
    assert ei.value.errno == errno.EEXIST
    client.mkdir(str(tmp_path / "a" / "b" / "c"), parents=True)
    client.mkdir(str(tmp_path / "a" / "b" / "c"), parents=True)  # like mkdir -p: no error
    (tmp_path / "a" / "b" / "c" / "f").write_text("x")
    with pytest.raises(AgentRequestError) as ei:
        client.remove(str(tmp_path / "a"))
    assert ei.value.errno == errno.ENOTEMPTY
    client.remove(str(tmp_path / "a"), recursive=True)
    assert not (tmp_path / "a").exists()
    (tmp_path / "f").write_text("x")
    client.remove(str(tmp_path / "f"))
    assert not (tmp_path / "f").exists()


def test_recursive_remove_does_not_follow_symlinks(client: AgentClient, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "escape").symlink_to(outside)
    (tree / "dirlink").symlink_to(outside)
    client.remove(str(tree), recursive=True)
    assert not tree.exists()
    assert (outside / "precious").read_text() == "keep me"
    link = tmp_path / "toplink"
    link.symlink_to(outside)
    client.remove(str(link), recursive=True)
    assert not link.is_symlink() and (outside / "precious").exists()


# ---------------------------------------------------------------- hostile input


class Raw:
    """Speak raw frames to an agent, bypassing the client; a thread keeps reading replies."""

    def __init__(self, binary: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(binary), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        self.frames: queue.Queue[Frame | None] = queue.Queue()
        threading.Thread(target=self._reader, daemon=True).start()
        hello = self.recv()
        assert hello.type == T.HELLO

    def _reader(self) -> None:
        assert self.proc.stdout is not None
        buf = b""
        while chunk := os.read(self.proc.stdout.fileno(), 1 << 20):
            buf += chunk
            while len(buf) >= HEADER_SIZE:
                length, ftype, flags, chan = decode_header(buf[:HEADER_SIZE])
                if len(buf) < HEADER_SIZE + length:
                    break
                self.frames.put(Frame(ftype, chan, buf[HEADER_SIZE : HEADER_SIZE + length], flags))
                buf = buf[HEADER_SIZE + length :]
        self.frames.put(None)

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)

    def recv(self, timeout: float = 5.0) -> Frame:
        frame = self.frames.get(timeout=timeout)
        if frame is None:
            self.frames.put(None)
            raise EOFError("agent closed its output")
        return frame

    def ping(self, chan: int = 77) -> None:
        self.send(encode_frame(T.PING, chan, b"alive?"))
        while True:  # skip replies to earlier garbage
            f = self.recv()
            if f.type == T.PONG and f.chan == chan:
                assert f.payload == b"alive?"
                return

    def close(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(5)


def errno_of(frame: Frame) -> int:
    assert frame.type == T.ERROR
    return int.from_bytes(tlv_dict(frame.payload)[Tag.ERRNO], "little")


def test_unknown_type_gets_error_on_chan0_and_agent_carries_on(agent_bin: Path) -> None:
    raw = Raw(agent_bin)
    raw.send(encode_frame(0x3F, 5, b"zzz"))
    f = raw.recv()
    assert (f.type, f.chan) == (T.ERROR, 0)
    raw.ping()
    assert raw.close() == 0


@pytest.mark.parametrize(
    ("ftype", "payload"),
    [
        (T.EXEC, b"\x01\x00\xff\x00\x00\x00ab"),  # TLV longer than the payload
        (T.EXEC, encode_tlvs([(Tag.ARGV, b"a\0b")])),  # NUL in a string
        (T.EXEC, encode_tlvs([(Tag.ENV, b"NOEQUALS")])),
        (T.EXEC, encode_tlvs([(Tag.ARGV, b"true"), (Tag.UID, b"\1")])),  # wrong width
        (T.EXEC, b""),  # no argv
        (T.EXEC, encode_tlvs([(Tag.ARGV, b"x")] * 4097)),  # too many argv
        (T.STAT, encode_tlvs([(Tag.PATH, b"relative")])),
        (T.STAT, encode_tlvs([(Tag.PATH, b"/" + b"a" * 5000)])),
        (T.LIST, b"\x14\x00"),
        (T.SIGNAL, b"\1\2"),
        (T.RESIZE, b"\1"),
        (T.PING, b"x" * 2000),
        (T.QUERY, b"\0\0\0\0"),  # QUERY's payload is empty
    ],
)
def test_malformed_request_gets_error_and_agent_carries_on(
    agent_bin: Path, ftype: int, payload: bytes
) -> None:
    raw = Raw(agent_bin)
    raw.send(encode_frame(ftype, 9, payload))
    f = raw.recv()
    assert (f.type, f.chan) == (T.ERROR, 9)
    assert errno_of(f) in (errno.EINVAL, errno.EMSGSIZE)
    raw.ping()
    assert raw.close() == 0


def test_oversize_frame_drops_the_connection(agent_bin: Path) -> None:
    raw = Raw(agent_bin)
    raw.send(struct.pack("<IHHI", MAX_PAYLOAD + 1, T.PING, 0, 1))
    f = raw.recv()
    assert (f.type, f.chan) == (T.ERROR, 0) and errno_of(f) == errno.EMSGSIZE
    assert raw.proc.wait(5) == 0


def test_random_garbage_does_not_crash(agent_bin: Path) -> None:
    import random

    rng = random.Random(1234)
    raw = Raw(agent_bin)
    safe_types = [
        T.PING,
        T.EXEC,
        T.STDIN,
        T.SIGNAL,
        T.RESIZE,
        T.STAT,
        T.LIST,
        T.FILE_CHUNK,
        T.FILE_CLOSE,
        T.QUERY,
        0x00,
        0x0F,
        0x41,
        0x7FFF,
        0xFFFF,
    ]
    for _ in range(3000):
        payload = rng.randbytes(rng.choice([0, 1, 5, 6, 7, 20, 200]))
        if rng.random() < 0.3:  # structurally valid TLVs with random contents
            payload = encode_tlvs(
                [
                    (
                        rng.choice([1, 2, 3, 4, 8, 9, 20, 27, 0xFFFF]),
                        rng.randbytes(rng.randrange(9)),
                    )
                    for _ in range(rng.randrange(4))
                ]
            )
        raw.send(encode_frame(rng.choice(safe_types), rng.randrange(1, 2**32), payload))
    raw.send(encode_frame(T.EXEC, 4242, encode_exec(["echo", "still here"])))
    raw.ping()
    out = b""
    while True:
        f = raw.recv()
        if f.chan == 4242 and f.type == T.STDOUT:
            out += f.payload
        if f.chan == 4242 and f.type == T.EXIT:
            break
    assert out == b"still here\n"
    assert raw.close() == 0


def test_exec_on_busy_channel_is_refused(agent_bin: Path) -> None:
    raw = Raw(agent_bin)
    raw.send(encode_frame(T.EXEC, 3, encode_exec(["sleep", "30"])))
    assert raw.recv().type == T.STARTED
    raw.send(encode_frame(T.EXEC, 3, encode_exec(["true"])))
    f = raw.recv()
    assert f.chan == 3 and errno_of(f) == errno.EBUSY
    raw.send(encode_frame(T.SIGNAL, 3, struct.pack("<I", 9)))
    f = raw.recv()
    assert (f.type, f.chan) == (T.EXIT, 3)
    assert raw.close() == 0


def _pid_of(frame: Frame) -> int:
    if frame.type == T.STARTED:
        return int.from_bytes(frame.payload, "little")
    return int.from_bytes(tlv_dict(frame.payload)[Tag.PID], "little")


def test_query_answers_for_a_running_an_ended_and_an_unknown_command(agent_bin: Path) -> None:
    raw = Raw(agent_bin)
    raw.send(encode_frame(T.EXEC, 3, encode_exec(["sleep", "30"])))
    started = raw.recv()
    assert started.type == T.STARTED
    raw.send(encode_frame(T.QUERY, 3))
    f = raw.recv()
    assert (f.type, f.chan, f.payload) == (T.STARTED, 3, started.payload)  # it runs
    raw.send(encode_frame(T.QUERY, 4))
    f = raw.recv()
    assert f.chan == 4 and errno_of(f) == errno.ESRCH
    for chan, payload in ((3, b"x"), (0, b"")):  # strict: empty, a command's channel
        raw.send(encode_frame(T.QUERY, chan, payload))
        f = raw.recv()
        assert f.chan == chan and errno_of(f) == errno.EINVAL
    raw.send(encode_frame(T.SIGNAL, 3, struct.pack("<I", 9)))
    exit_ = raw.recv()
    assert (exit_.type, exit_.chan) == (T.EXIT, 3) and _pid_of(exit_) == _pid_of(started)
    raw.send(encode_frame(T.QUERY, 3))
    assert raw.recv() == exit_  # the same EXIT again, as often as asked
    # A new command on the channel: the old one's answer is gone, the new one's is given.
    raw.send(encode_frame(T.EXEC, 3, encode_exec(["sh", "-c", "exit 5"])))
    second = raw.recv()
    assert second.type == T.STARTED and second.payload != started.payload
    while (f := raw.recv()).type != T.EXIT:
        pass
    raw.send(encode_frame(T.QUERY, 3))
    again = raw.recv()
    assert again == f and _pid_of(again) == _pid_of(second)
    assert tlv_dict(again.payload)[Tag.CODE] == struct.pack("<i", 5)
    assert raw.close() == 0


def test_query_remembers_the_last_256_ended_commands(client: AgentClient) -> None:
    first = client.exec(["true"])
    first.wait(20)
    for _ in range(256):
        client.exec(["true"]).wait(20)
    last = client.exec(["true"])
    last.wait(20)
    answers = {}
    for ex in (first, last):
        chan, q = client._open_chan(ex.id)
        client._send(T.QUERY, chan)
        answers[ex.id] = client._get(q, 20, "QUERY")
        client._close_chan(chan)
    assert errno_of(answers[first.id]) == errno.ESRCH  # the oldest went
    assert answers[last.id].type == T.EXIT


def test_an_adopted_command_whose_exit_was_lost_is_answered(agent_bin: Path,
                                                            tmp_path: Path) -> None:
    from agentkernel.daemon.handles import AdoptingClient

    path = tmp_path / "agent.sock"
    proc = subprocess.Popen([str(agent_bin), "--listen", str(path)], stdin=subprocess.DEVNULL)
    try:
        for _ in range(500):
            if path.exists():
                break
            time.sleep(0.01)
        c1 = AdoptingClient.connect(path, set())
        c1.hello()
        ended = c1.exec(["sh", "-c", "exit 7"])
        ended.wait(20)  # the EXIT went to this host, which "dies" with it
        running = c1.exec(["sleep", "30"])
        c1.close()
        chans = {ended.id, running.id, 12345}
        c2 = AdoptingClient.connect(path, chans)
        assert c2.hello().features & FEATURE_QUERY and c2.answers_query
        lost = c2.adopt(ended.id, ended.pid)
        assert lost.ask_ended()
        assert lost.wait(20)[2].code == 7
        unknown = c2.adopt(12345, 99)
        assert unknown.ask_ended()
        with pytest.raises(AgentRequestError) as exc:
            unknown.wait(20)
        assert exc.value.errno == errno.ESRCH
        still = c2.adopt(running.id, running.pid)
        assert still.ask_ended()  # (answered STARTED: skipped, it runs on)
        still.kill()
        assert still.wait(20)[2].signal == signal.SIGKILL
        # Another pid than the command's: the channel holds another command.
        other = c2.adopt(ended.id, ended.pid + 1)
        assert other.ask_ended()
        with pytest.raises(ProtocolError, match="another command"):
            other.wait(20)
        c2.shutdown()
        assert proc.wait(5) == 0
        c2.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- lifecycle and channels


def test_eof_kills_everything(agent_bin: Path) -> None:
    a = Agent(agent_bin)
    ex = a.client.exec(["sh", "-c", "sleep 30 & echo $!; wait"])
    grandchild = int(next(ex.events())[1])  # type: ignore[arg-type]
    assert a.stop() == 0
    assert gone(ex.pid) and gone(grandchild)


def test_channel_death_fails_waiters_promptly(agent_bin: Path) -> None:
    a = Agent(agent_bin)
    ex = a.client.exec(["sleep", "30"])
    a.proc.kill()
    start = time.monotonic()
    with pytest.raises(ProtocolError):
        ex.wait(10)
    with pytest.raises(ProtocolError):
        a.client.exec(["true"])
    assert time.monotonic() - start < 3
    assert not a.client.alive
    a.proc.wait()
    a.client.close()
    os.kill(ex.pid, signal.SIGKILL)


def test_shutdown(agent_bin: Path) -> None:
    a = Agent(agent_bin)
    ex = a.client.exec(["sleep", "30"])
    a.client.shutdown()
    assert a.proc.wait(5) == 0
    assert gone(ex.pid)
    a.client.close()


def test_fd_channel(agent_bin: Path) -> None:
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [str(agent_bin), "--fd", str(theirs.fileno())],
        pass_fds=[theirs.fileno()],
        stdin=subprocess.DEVNULL,
    )
    theirs.close()
    client = AgentClient.from_socket(ours)
    assert client.hello().pid == proc.pid
    assert run(client, ["echo", "via fd"])[0] == b"via fd\n"
    client.close()
    assert proc.wait(5) == 0


def test_listen_survives_disconnects(agent_bin: Path, tmp_path: Path) -> None:
    path = str(tmp_path / "agent.sock")
    proc = subprocess.Popen([str(agent_bin), "--listen", path], stdin=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if os.path.exists(path):
                break
            time.sleep(0.01)

        def connect() -> AgentClient:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            c = AgentClient.from_socket(s)
            c.hello()
            return c

        c1 = connect()
        ex = c1.exec(["sleep", "30"])
        c1.close()
        time.sleep(0.2)
        c2 = connect()
        assert not gone(ex.pid, within=0.3)  # still running after the first host left
        assert run(c2, ["echo", "second"])[0] == b"second\n"
        c2.shutdown()
        assert proc.wait(5) == 0
        assert gone(ex.pid)
        c2.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def zombies_of(pid: int) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == pid:
                found.append(int(d.name))
    return found


def test_init_reaps_orphans_and_forwards_signals(agent_bin: Path) -> None:
    a = Agent(agent_bin, "--init")
    c = a.client
    out, _, _ = run(c, ["sh", "-c", "(sleep 0.2 & echo $!)"])
    orphan = int(out)
    assert gone(orphan)  # (a zombie counts: its reaping is what is checked next)
    deadline = time.monotonic() + 30
    while zombies_of(a.proc.pid):
        assert time.monotonic() < deadline, f"unreaped: {zombies_of(a.proc.pid)}"
        time.sleep(0.05)
    ex = c.exec(["sleep", "30"])
    a.proc.send_signal(signal.SIGTERM)
    assert ex.wait(5)[2].signal == signal.SIGTERM
    c.ping()  # the agent itself is unaffected
    assert a.stop() == 0


def test_plain_agent_terminates_on_sigterm(agent_bin: Path) -> None:
    a = Agent(agent_bin)
    ex = a.client.exec(["sleep", "30"])
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(5) == 0
    assert gone(ex.pid)
    a.client.close()


@pytest.mark.parametrize(
    "args",
    [
        ["--bogus"],
        ["--overlay", "only:two"],
        ["--seccomp", "/nonexistent"],
        ["--fd"],
        ["--fd", "3", "--listen", "/tmp/x"],
    ],
)
def test_bad_setup_exits_125(agent_bin: Path, args: list[str]) -> None:
    p = subprocess.run(
        [str(agent_bin), *args],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=10,
        check=False,
    )
    assert p.returncode == 125
    assert p.stderr.startswith(b"ak-agent: ")


@pytest.mark.skipif(not IS_ROOT, reason="needs root to change uid and drop real capabilities")
def test_uid_gid_switch(client: AgentClient) -> None:
    out, _, st = run(client, ["sh", "-c", "id -u; id -g; id -G"], uid=65534, gid=65534)
    assert st.code == 0
    assert out.decode().split() == ["65534", "65534", "65534"]


@pytest.mark.skipif(not IS_ROOT, reason="needs root to have capabilities to drop")
def test_drop_caps(agent_bin: Path) -> None:
    a = Agent(agent_bin, "--drop-caps")
    out, _, _ = run(a.client, ["grep", "^Cap\\|NoNewPrivs", "/proc/self/status"])
    status = dict(line.split(":\t") for line in out.decode().splitlines())
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[key], 16) == 0, key
    assert status["NoNewPrivs"] == "1"
    assert a.stop() == 0


@pytest.mark.skipif(platform.machine() != "x86_64", reason="filter below hardcodes x86_64 numbers")
def test_seccomp_filter_applies_to_commands(agent_bin: Path, tmp_path: Path) -> None:
    def insn(code: int, jt: int, jf: int, k: int) -> bytes:
        return struct.pack("<HBBI", code, jt, jf, k)

    nr_mkdir, nr_mkdirat = 83, 258
    prog = b"".join(
        [
            insn(0x20, 0, 0, 0),  # ld [nr]
            insn(0x15, 2, 0, nr_mkdir),  # jeq mkdir -> deny
            insn(0x15, 1, 0, nr_mkdirat),  # jeq mkdirat -> deny
            insn(0x06, 0, 0, 0x7FFF0000),  # ret ALLOW
            insn(0x06, 0, 0, 0x00050000 | errno.EPERM),  # ret ERRNO(EPERM)
        ]
    )
    (tmp_path / "filter.bpf").write_bytes(prog)
    a = Agent(agent_bin, "--seccomp", str(tmp_path / "filter.bpf"))
    _, err, st = run(a.client, ["mkdir", str(tmp_path / "d")])
    assert st.code != 0 and b"Operation not permitted" in err
    assert run(a.client, ["echo", "ok"])[0] == b"ok\n"
    assert a.stop() == 0


def test_seccomp_rejects_malformed_program(agent_bin: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.bpf").write_bytes(b"\0" * 12)
    p = subprocess.run(
        [str(agent_bin), "--seccomp", str(tmp_path / "bad.bpf")],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=10,
        check=False,
    )
    assert p.returncode == 125 and b"seccomp" in p.stderr


def test_connect_channel(agent_bin: Path, tmp_path: Path) -> None:
    path = str(tmp_path / "host.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    proc = subprocess.Popen([str(agent_bin), "--connect", path], stdin=subprocess.DEVNULL)
    srv.settimeout(5)
    conn, _ = srv.accept()
    srv.close()
    client = AgentClient.from_socket(conn)
    assert client.hello().pid == proc.pid
    assert run(client, ["echo", "dialled in"])[0] == b"dialled in\n"
    client.close()
    assert proc.wait(5) == 0


def test_reading_a_fifo_is_refused_instead_of_hanging(client: AgentClient, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(AgentRequestError) as ei:
        client.read_file(str(fifo))
    assert ei.value.errno == errno.EINVAL
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so a blocking open would succeed
    try:
        with pytest.raises(AgentRequestError) as ei:
            client.write_file(str(fifo), b"x", append=True)
        assert ei.value.errno == errno.EINVAL
    finally:
        os.close(reader)
    client.ping()


@pytest.mark.skipif(
    not IS_ROOT or shutil.which("unshare") is None, reason="needs root and unshare(1)"
)
def test_mounts_and_overlay_as_pid1(agent_bin: Path, tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "orig.txt").write_text("from lower\n")
    target, upper, work = tmp_path / "merged", tmp_path / "upper", tmp_path / "work"
    a = Agent(
        Path("/usr/bin/unshare"), "-mpf", str(agent_bin), "--mount-proc", "--mount-dev",
        "--overlay", f"{target}:{lower}+/etc:{upper}:{work}",
    )  # fmt: skip
    info = a.client.hello()
    assert info.pid == 1  # in its own pid namespace, so init automatically
    script = (
        f"cat {target}/orig.txt; test -f {target}/hostname && echo has-etc; echo new > {target}/n"
    )
    out, err, st = run(a.client, ["sh", "-c", script + "; ls /proc/1/exe >/dev/null && echo proc"])
    assert st.code == 0, err
    assert out == b"from lower\nhas-etc\nproc\n"
    assert (upper / "n").read_text() == "new\n"  # writes land in the upper dir
    assert not (lower / "n").exists()
    assert a.stop() == 0
    # --mount-tmp comes before the overlays, so it is checked on its own (tmp_path is in /tmp).
    a = Agent(Path("/usr/bin/unshare"), "-m", str(agent_bin), "--mount-tmp")
    out, _, _ = run(a.client, ["stat", "-f", "-c", "%T", "/tmp"])
    assert out == b"tmpfs\n"
    assert a.stop() == 0
