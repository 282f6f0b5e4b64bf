"""The wasm worker's protocol, spoken to it directly (unconfined here: tests/test_wasm*.py
run it in its sandbox): jobs in a row get fresh instances, stdin is each job's own,
traps, exit codes and unknown modules are answered and the worker serves on; a bad frame
ends it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from wasm_modules import CAT, COUNTER, ENV, EXIT7, FLOOD, FLOOD_CHUNKS, HELLO

wasmtime = pytest.importorskip("wasmtime")
from agentkernel.backends import wasm_worker as ww  # noqa: E402

TRAP = '(module (func (export "_start") unreachable))'


class Worker:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, ww.__file__], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.read() == (b"R", b"")
        self.engine = wasmtime.Engine()

    def read(self) -> tuple[bytes, bytes]:
        assert self.proc.stdout is not None
        head = self.proc.stdout.read(ww.HEAD)
        assert len(head) == ww.HEAD, head
        return head[:1], self.proc.stdout.read(int.from_bytes(head[1:], "big"))

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(ww.frame(kind, payload))
        self.proc.stdin.flush()

    def load(self, wat: str) -> str:
        key = os.urandom(32).hex()
        compiled = wasmtime.Module(self.engine, wasmtime.wat2wasm(wat)).serialize()
        self.send(b"M", key.encode() + bytes(compiled))
        return key

    def job(self, key: str, stdin: bytes | None = None, **extra: Any) -> tuple[bytes, bytes,
                                                                           dict[str, int]]:
        job = {"key": key, "argv": ["m.wasm"], "env": [], "stdin": stdin is not None,
               "shown": "m.wasm", **extra}
        self.send(b"J", json.dumps(job).encode())
        if stdin is not None:
            self.send(b"I", stdin)
            self.send(b"C")
        out, err = b"", b""
        while True:
            kind, data = self.read()
            if kind == b"X":
                return out, err, json.loads(data)
            if kind == b"O":
                out += data
            else:
                assert kind == b"E", kind
                err += data


@pytest.fixture
def worker() -> Iterator[Worker]:
    w = Worker()
    yield w
    w.proc.kill()
    w.proc.communicate()


def test_jobs_in_a_row_get_fresh_instances(worker: Worker) -> None:
    key = worker.load(COUNTER)
    for _ in range(3):
        assert worker.job(key) == (b"1111\n", b"", {"code": 0})
    hello = worker.load(HELLO)
    out, err, end = worker.job(hello, env=[["A", "B"]])
    assert (out, err, end) == (b"hello\n", b"oops\n", {"code": 0})


def test_a_store_made_ahead_serves_only_a_request_sent_as_the_last(worker: Worker) -> None:
    """After a job the worker makes a Store for a next one sent the same way: a next job
    that differs (its environment, its module, its memory limit) gets its own, and one
    sent the same way still starts from a fresh instance."""
    env = worker.load(ENV)
    assert worker.job(env, env=[["A", "1"]])[0] == b"A=1\0"
    assert worker.job(env, env=[["A", "2"]])[0] == b"A=2\0"  # not the store made for A=1
    assert worker.job(env, env=[["A", "2"]])[0] == b"A=2\0"  # the one made ahead
    assert worker.job(env, env=[["A", "2"]], memory_bytes=1 << 20)[0] == b"A=2\0"
    counter = worker.load(COUNTER)
    for _ in range(2):
        assert worker.job(counter) == (b"1111\n", b"", {"code": 0})
    assert worker.job(env, env=[])[0] == b""


def test_stdin_is_each_jobs_own(worker: Worker) -> None:
    cat = worker.load(CAT)
    assert worker.job(cat, stdin=b"first")[0] == b"first"
    assert worker.job(cat)[0] == b""  # no stdin: not the worker's own, nothing
    big = os.urandom(300_000)  # several pipe buffers
    assert worker.job(cat, stdin=big)[0] == big


def test_output_beyond_the_pipes_arrives_whole_before_the_end(worker: Worker) -> None:
    """The module writes into pipes: more than they hold is read while it runs, and all
    of it leaves before the job's end (job() takes no frame after X)."""
    flood = worker.load(FLOOD)
    for _ in range(2):
        out, err, end = worker.job(flood)
        assert end == {"code": 0}
        assert (len(out), len(err)) == (FLOOD_CHUNKS << 16, FLOOD_CHUNKS << 16)
        assert out == b"o" * len(out) and err == b"e" * len(err)
    assert worker.job(worker.load(HELLO)) == (b"hello\n", b"oops\n", {"code": 0})


def test_output_streams_while_the_job_runs(worker: Worker) -> None:
    """What a job writes reaches us while it still runs (here: waiting for more stdin)."""
    cat = worker.load(CAT)
    job = {"key": cat, "argv": ["m"], "env": [], "stdin": True, "shown": "m"}
    worker.send(b"J", json.dumps(job).encode())
    for word in (b"ping", b"pong"):
        worker.send(b"I", word)
        assert worker.read() == (b"O", word)
    worker.send(b"C")
    assert worker.read() == (b"X", b'{"code": 0}')


def test_traps_exits_and_unknown_modules(worker: Worker) -> None:
    trap = worker.load(TRAP)
    _out, err, end = worker.job(trap)
    assert end == {"signal": 6} and b"wasm trap" in err
    assert worker.job(worker.load(EXIT7))[2] == {"code": 7}
    _out, err, end = worker.job("0" * 64)
    assert end == {"code": ww.EXIT_FAILED} and b"not loaded" in err
    worker.send(b"D", trap.encode())
    assert worker.job(trap)[2] == {"code": ww.EXIT_FAILED}
    assert worker.job(worker.load(HELLO))[2] == {"code": 0}  # it serves on


def test_a_bad_frame_ends_the_worker(worker: Worker) -> None:
    assert worker.proc.stdin is not None
    worker.proc.stdin.write(b"J" + (ww.MAX_HEADER + 1).to_bytes(4, "big"))
    worker.proc.stdin.flush()
    assert worker.proc.wait(timeout=30) == ww.EXIT_FAILED


@pytest.mark.skipif(os.path.exists("/workspace"), reason="needs a host without /workspace")
@pytest.mark.parametrize("stdin", [False, True], ids=["inline", "threaded"])
def test_an_unforeseen_failure_ends_the_worker(worker: Worker, stdin: bool) -> None:
    """Here the preopen fails (no /workspace outside the sandbox): whichever thread ran
    the job, the worker ends rather than leave a job without an end."""
    cat = worker.load(CAT)
    job = {"key": cat, "argv": ["m"], "env": [], "stdin": stdin, "workspace": True}
    worker.send(b"J", json.dumps(job).encode())
    _out, err = worker.proc.communicate(timeout=30)
    assert worker.proc.returncode == ww.EXIT_FAILED
    assert b"preopen" in err


_READ_FRAMES = """
import sys
sys.path.insert(0, sys.argv[1])
import wasm_worker as ww
while True:
    try:
        got = ww.read_frame()
    except (EOFError, ValueError) as exc:
        print(type(exc).__name__, len(ww._IN))
        break
    if got is None:
        print("end")
        break
    print(got[0].decode(), len(got[1]), got[1][:4].hex(), len(ww._IN) < ww.READ_AHEAD)
"""


def test_frames_read_ahead_and_exactly() -> None:
    """Frames that come in one write are taken from one read; a frame longer than the
    read-ahead is read exactly, across it; a frame over its limit is refused before its
    payload is read; stdin's end inside a frame is an error, at a frame's start the end."""
    big = os.urandom(3 * ww.READ_AHEAD + 7)
    stream = b"".join([ww.frame(b"J", b"{}"), ww.frame(b"I", b"ab"), ww.frame(b"M", big),
                       ww.frame(b"C"), ww.frame(b"D", b"k" * 64)])

    def frames(data: bytes) -> list[str]:
        out = subprocess.run([sys.executable, "-c", _READ_FRAMES,
                              os.path.dirname(ww.__file__)], input=data,
                             capture_output=True, check=True, timeout=60).stdout
        return out.decode().splitlines()

    assert frames(stream) == [
        "J 2 7b7d True", "I 2 6162 True", f"M {len(big)} {big[:4].hex()} True", "C 0  True",
        f"D 64 {(b'k' * 4).hex()} True", "end"]
    assert frames(stream[:-3]) == [
        "J 2 7b7d True", "I 2 6162 True", f"M {len(big)} {big[:4].hex()} True", "C 0  True",
        "EOFError 0"]
    over = b"J" + (ww.MAX_HEADER + 1).to_bytes(4, "big")
    assert frames(ww.frame(b"C") + over + b"x" * 10) == ["C 0  True", "ValueError 10"]
