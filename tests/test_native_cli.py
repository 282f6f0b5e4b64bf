"""The native `agentkernel` command against a scripted daemon: field for field the Python
client's request, its messages, output bytes and exit codes; its fallbacks; its JSON reader
under libFuzzer. (tests/daemon/test_native_cli_daemon.py: the same against a real daemon.)"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from native_cli_helpers import (
    NO_PYTHON,
    PY_CLI,
    ROOT,
    both,
    clean_env,
    native_binary,
    on_a_terminal,
    run_cli,
)

# What the scripted daemon says in its `started` event: every kind of value the CLI prints.
INFO = {"sandbox": "pool-0123456789", "pooled": True, "backend": "namespaces",
        "isolation": "Linux namespaces", "image": "host", "image_reason": "--image",
        "rootfs": "host userland", "profile": "moderate", "network": "egress",
        "workspace": "cow", "memory_mb": None, "pids": 512, "cpus": 1.5,
        "warnings": ["w1 é", "w2"], "notes": ["n1"], "skipped": ["gvisor: no runsc", 7],
        "user": [1000, 1000, "/home/agent"]}
OUTPUT = [(1, "out é \x00\x01\xff\n"), (2, "err \\ \"q\"\n"), (1, "more\n")]


class ScriptedDaemon:
    """A unix socket speaking the daemon's JSON lines from a script: records each request."""

    def __init__(self, path: Path, result: dict[str, Any], info: dict[str, Any]) -> None:
        self.requests: list[dict[str, Any]] = []
        self.controls: list[dict[str, Any]] = []
        self.result, self.info = result, info
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o600)
        self.sock.listen(16)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _send(self, f: Any, obj: dict[str, Any]) -> None:
        f.write((json.dumps(obj, ensure_ascii=False) + "\n").encode())
        f.flush()

    def _one(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            line = f.readline()
            if not line:
                return
            req = json.loads(line)
            self.requests.append(req)
            args = req["args"]
            if req["op"] == "agent_keys":  # (the native client's table holds the same)
                self._send(f, {"ok": True, "data": {"keys": claude_keys(),
                                                    "stored": False,
                                                    "missing": "no key for it: set one"}})
                return
            if args.get("argv") == ["fail-now"]:
                self._send(f, {"ok": False, "error": {"type": "UsageError", "exit_code": 2,
                                                      "message": "bad request é"}})
                return
            self._send(f, {"ev": "started", "pid": 1, "info": self.info})
            for stream, text in OUTPUT:
                self._send(f, {"ev": "out", "s": stream, "d": text})
            got = b""
            if args.get("tty"):  # a terminal: wait for its resize, then end
                while True:
                    msg = json.loads(f.readline())
                    self.controls.append(msg)
                    if msg["op"] == "resize":
                        break
            elif args.get("stdin_open"):
                while True:
                    msg = json.loads(f.readline())
                    self.controls.append(msg)
                    if msg["op"] == "eof":
                        break
                    got += msg["d"].encode("latin-1")
                self._send(f, {"ev": "out", "s": 1, "d": got.decode("latin-1")})
            self._send(f, {"ev": "exit", "result": self.result})

    def close(self) -> None:
        self.sock.close()


def claude_keys() -> list[str]:
    from agentkernel.agents.registry import get

    return [k.env for k in get("claude").keys]


def without_agent_keys(env: dict[str, str]) -> dict[str, str]:
    """`env` without any agent's key variable (the caller's shell may hold one)."""
    from agentkernel.agents.registry import agents

    names = {k.env for a in agents() for k in a.keys}
    return {k: v for k, v in env.items() if k not in names}


@pytest.fixture(scope="module")
def native() -> Path:
    return native_binary()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """A caller's environment with every context key set and a user config, and a project."""
    (tmp_path / "run").mkdir(mode=0o700)
    (tmp_path / "xdg" / "agentkernel").mkdir(parents=True)
    (tmp_path / "xdg" / "agentkernel" / "config.toml").write_text("")
    (tmp_path / "proj" / "sub").mkdir(parents=True)
    env = clean_env(AGENTKERNEL_HOME=str(tmp_path / "home"),
                    AGENTKERNEL_RUNTIME_DIR=str(tmp_path / "run"),
                    AGENTKERNEL_DAEMON_AUTOSTART="0", XDG_CONFIG_HOME=str(tmp_path / "xdg"),
                    AGENTKERNEL_REGISTRY_MIRROR="http://mirror.example", LANG="C.UTF-8",
                    TERM="xterm-test", COLORTERM="truecolor", HOST_VALUE="from host ü")
    yield without_agent_keys(env), tmp_path / "proj"


@pytest.fixture
def scripted(world: tuple[dict[str, str], Path]) -> Iterator[ScriptedDaemon]:
    env, _ = world
    d = ScriptedDaemon(Path(env["AGENTKERNEL_RUNTIME_DIR"]) / "daemon.sock",
                       {"exit_code": 7, "message": "the end", "egress": ["refused x.example"]},
                       INFO)
    yield d
    d.close()


RUNS = [
    ["run", "--", "true"],
    ["run", "-q", "--timeout=30", "echo", "hi"],
    ["run", "-v", "-i", "img", "-p", "moderate", "-B", "namespaces", "-e", "A=1", "-e",
     "HOST_VALUE", "--env=B=x=y", "-e", "A=2", "-w", "/tmp", "-t", "1.5", "--cpus", "2",
     "--no-network", "-c", "sub/../cfg.toml", "--", "sh", "-c", "echo é \"$A\""],
    ["run", "--verbose", "--image=", "--timeout", "100000", "--", "fail-now"],
    ["run", "--agent", "claude", "--", "--version"],
    ["run", "-v", "--agent", "claude", "-e", "X=1", "--timeout", "0.25"],
    ["run", "-q", "-v", "--agent", "claude", "--", "-p", "hi"],
    ["exec", "box-1", "--", "cat", "x"],
    ["exec", "-e", "X=1", "-w", "/", "--timeout", "3", "box-1", "echo", "x"],
]


@pytest.mark.parametrize("args", RUNS, ids=[" ".join(a)[:60] for a in RUNS])
@pytest.mark.parametrize("key", [None, "  sk-test-key\t"])
def test_same_request_output_and_exit_code(native: Path, world: tuple[dict[str, str], Path],
                                           scripted: ScriptedDaemon, args: list[str],
                                           key: str | None) -> None:
    env, proj = world
    if key is not None:
        if "--agent" not in args:
            pytest.skip("the key matters to --agent runs only")
        env = {**env, claude_keys()[1]: key}  # (the second of its variables)
    py, nat = both(native, args, env, proj)
    runs = [r for r in scripted.requests if r["op"] != "agent_keys"]
    assert len(runs) % 2 == 0 and runs, scripted.requests
    half = len(runs) // 2
    assert runs[half:] == runs[:half]  # field for field
    # The key's variable names are the native client's own (its build's table): it asks
    # the daemon only whether a stored secret covers an agent it holds no key for.
    asks = len(scripted.requests) - len(runs)
    assert asks == (0 if "--agent" not in args else 1 if key else 2), scripted.requests
    assert (nat.code, nat.out, nat.err) == (py.code, py.out, py.err)
    assert py.code == (2 if "fail-now" in args else 7)


@pytest.mark.parametrize("code", [0, 1, 124, 125, 126, 127, 137, 143, 300, -1, 2.7, True, None])
def test_exit_codes_as_python_leaves_with_them(native: Path, world: tuple[dict[str, str], Path],
                                               scripted: ScriptedDaemon, code: Any) -> None:
    env, proj = world
    scripted.result = {"exit_code": code, "message": "" if code else "m", "signal": 15}
    if code is None:
        scripted.result = {"message": None}  # no exit code at all: 125
    py, nat = both(native, ["run", "--", "x"], env, proj)
    assert (nat.code, nat.out, nat.err) == (py.code, py.out, py.err)
    assert py.code == (125 if code is None else int(code) & 0xFF)


def test_stdin_is_forwarded_as_the_python_client_does(
        native: Path, world: tuple[dict[str, str], Path], scripted: ScriptedDaemon) -> None:
    env, proj = world
    data = bytes(range(256)) * 300  # more than one read, every byte value
    for args in (["run", "--", "cat"], ["exec", "-i", "box-1", "--", "cat"],
                 ["run", "--agent", "claude"]):
        scripted.requests.clear()
        scripted.controls.clear()
        py, nat = both(native, args, env, proj, stdin=data)
        assert (nat.code, nat.out, nat.err) == (py.code, py.out, py.err)
        assert py.out.endswith(data)
        requests = [r for r in scripted.requests if r["op"] != "agent_keys"]
        assert requests[0] == requests[1] and requests[0]["args"]["stdin_open"] is True


TERMINAL_RUNS = [["run", "-v", "--agent", "claude", "--", "--version"],
                 ["exec", "-t", "-i", "box-1", "--", "sh"], ["exec", "-t", "box-1", "top"],
                 ["exec", "-t", "-e", "TERM=dumb", "box-1", "top"]]


@pytest.mark.parametrize("args", TERMINAL_RUNS, ids=[" ".join(a) for a in TERMINAL_RUNS])
def test_terminal_runs_as_the_python_client(
        native: Path, world: tuple[dict[str, str], Path], scripted: ScriptedDaemon,
        args: list[str]) -> None:
    """`run --agent` and `exec -t` on a terminal: raw as Python makes it (and restored
    after), its size in the request, a resize forwarded, the same bytes on the terminal."""
    env, proj = world
    py = on_a_terminal([*PY_CLI, *args], env, proj)
    nat = on_a_terminal([str(native), *args], {**env, "AGENTKERNEL_PYTHON": NO_PYTHON}, proj)
    assert nat == py, (nat, py)
    assert py[0] == 7 and py[2][0] == py[2][1]  # the terminal as it was
    runs = [r for r in scripted.requests if r["op"] != "agent_keys"]
    assert len(runs) == 2 and runs[0] == runs[1] and runs[0]["args"]["tty"] == [40, 100]
    assert runs[0]["args"]["stdin_open"] is ("-t" not in args or "-i" in args)
    resizes = [c for c in scripted.controls if c["op"] == "resize"]
    assert resizes == [{"op": "resize", "rows": 50, "cols": 120}] * 2


def test_bad_lines_from_the_daemon_never_crash_it(native: Path,
                                                  world: tuple[dict[str, str], Path]) -> None:
    env, proj = world
    env = {**env, "AGENTKERNEL_PYTHON": NO_PYTHON}
    sock_path = Path(env["AGENTKERNEL_RUNTIME_DIR"]) / "daemon.sock"
    answers = [b"{\"ev\":\"out\",\"s\":1,\"d\":\"\\u0100\"}\n", b"[1,2]\n", b"{" * 5000 + b"\n",
               b"{\"ev\":\"started\",\"info\":" + b"[" * 70 + b"\n", b"\xff\xfe\n",
               b"{\"ev\":\"out\",\"s\":1,\"d\":\"" + b"x" * (3 << 20), b"", b"nul\x00\n",
               b"{\"ok\":false,\"error\":{\"message\":\"\\ud800 lone\",\"exit_code\":3}}\n"]
    for answer in answers:
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock_path.unlink(missing_ok=True)
        srv.bind(str(sock_path))
        srv.listen(1)

        def serve(srv: socket.socket = srv, answer: bytes = answer) -> None:
            conn, _ = srv.accept()
            with conn, contextlib.suppress(OSError):  # (the client may hang up at once)
                conn.recv(1 << 16)
                for i in range(0, len(answer), 1 << 16):
                    conn.sendall(answer[i:i + (1 << 16)])
                conn.shutdown(socket.SHUT_WR)
                conn.recv(1)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        r = run_cli([str(native), "run", "--", "true"], env, proj, timeout=30)
        t.join(10)
        srv.close()
        assert r.code in (3, 125), (answer[:40], r)  # an answer, never a signal
        assert "agentkernel: " in r.err, (answer[:40], r.err)
        if answer.startswith(b"{\"ok\":false"):
            assert r.err == "agentkernel: \\ud800 lone\n"  # as Python prints it


def test_anything_unsure_goes_to_the_python_cli(native: Path,
                                                world: tuple[dict[str, str], Path]) -> None:
    """No daemon socket, options it does not parse, --json, limits, help, a bad name:
    the Python CLI runs (its fallback is pointed at nothing here, so it fails visibly)."""
    env, proj = world
    env = {**env, "AGENTKERNEL_PYTHON": NO_PYTHON}
    for args in (["run", "--", "true"], ["run", "--json", "--", "true"], ["--version"],
                 ["run", "--keep", "--", "true"], ["run", "-m", "1g", "--", "true"],
                 ["run", "-qv", "--", "true"], ["run", "-h"], ["exec", "-t", "b", "--", "sh"],
                 ["exec", "bad--name", "--", "true"], ["exec", "b", "-e", "X=1", "--", "true"],
                 ["run", "-t", "1e3", "--", "true"], ["run", "-t", "0", "--", "true"],
                 ["run", "-e", "NOT_SET_ANYWHERE", "--", "true"], ["run", "--", "\udcff"],
                 ["list"], []):
        r = run_cli([str(native), *args], env, proj)
        assert r.code == 125 and "cannot start $AGENTKERNEL_PYTHON" in r.err, (args, r)


def test_fallback_is_the_python_cli_with_the_same_argv(
        native: Path, world: tuple[dict[str, str], Path], tmp_path: Path) -> None:
    """Beside an installed copy, the fallback is `agentkernel-py` there (the installed Python
    launcher); through $AGENTKERNEL_PYTHON, `python -m agentkernel`: same output either way."""
    env, proj = world
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shutil.copy(native, bindir / "agentkernel")
    record = bindir / "argv.json"
    (bindir / "agentkernel-py").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump([sys.argv[1:], os.environ.get('ONLY_HERE')], open({str(record)!r}, 'w'))\n"
        "sys.exit(3)\n")
    (bindir / "agentkernel-py").chmod(0o755)
    args = ["run", "--json", "-e", "A=b c", "--", "sh", "-c", "x y"]
    r = run_cli([str(bindir / "agentkernel"), *args], {**env, "ONLY_HERE": "1"}, proj)
    assert r.code == 3 and json.loads(record.read_text()) == [args, "1"]
    py, nat = both(native, ["run", "--bogus-option"], env, proj, handled=False)
    assert (nat.code, nat.out, nat.err) == (py.code, py.out, py.err) and py.code == 2
    py, nat = both(native, ["--version"], env, proj, handled=False)
    assert (nat.code, nat.out, nat.err) == (py.code, py.out, py.err) and py.code == 0


def test_tables_come_from_the_python_sources(native: Path) -> None:
    """The generated header is what gen_tables.py renders from this checkout's modules."""
    sys.path.insert(0, str(ROOT / "launcher"))
    try:
        import gen_tables
    finally:
        sys.path.remove(str(ROOT / "launcher"))
    header = (ROOT / "launcher" / "build" / "tables.h").read_text()
    assert header == gen_tables.render()
    from agentkernel.cli import fast

    for option in (*fast._RUN_VALUES, *fast._RUN_FLAGS):
        assert f'{{"{option}", ' in header


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("clang") is None, reason="clang (libFuzzer) is not installed")
def test_json_reader_survives_fuzzing(tmp_path: Path) -> None:
    subprocess.run(["make", "-s", "-C", str(ROOT / "launcher"), "fuzz"], check=True)
    corpus = tmp_path / "corpus"
    shutil.copytree(ROOT / "launcher" / "fuzz" / "corpus", corpus)
    proc = subprocess.run([str(ROOT / "launcher" / "build" / "fuzz-json"),
                           "-max_total_time=15", "-rss_limit_mb=2048",
                           f"-artifact_prefix={tmp_path}/", str(corpus)],
                          capture_output=True, text=True, timeout=200, check=False)
    crashes = [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "leak-",
                                                                        "oom-", "timeout-"))]
    assert proc.returncode == 0 and not crashes, proc.stderr[-4000:]
    assert re.search(r"Done \d+ runs", proc.stderr), proc.stderr[-2000:]

