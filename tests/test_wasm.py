"""The wasm backend through the real CLI: in-process and through a daemon, as root and as
nobody. Modules are built here from WebAssembly text (tests/wasm_modules.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_helpers import Result, ak, ak_as_user
from wasm_modules import FLOOD_CHUNKS, open_module, write_modules

pytest.importorskip("wasmtime")

NOBODY = 65534


class Env:
    """A project dir with the test modules, private data/runtime dirs, and a mode."""

    def __init__(self, root: Path, daemon: bool) -> None:
        self.root = root
        self.proj = root / "proj"
        self.daemon = daemon
        self.env = {"AGENTKERNEL_HOME": str(root / "home"),
                    "AGENTKERNEL_RUNTIME_DIR": str(root / "run"),
                    "AGENTKERNEL_DAEMON_AUTOSTART": "0"}
        if not daemon:
            self.env["AGENTKERNEL_NO_DAEMON"] = "1"

    def run(self, *args: str, input: bytes | None = None) -> Result:
        return ak("run", *args, cwd=self.proj, env=self.env, input=input, timeout=60)


def _make_root(prefix: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    root.chmod(0o755)
    (root / "run").mkdir(mode=0o700)
    (root / "proj").mkdir(mode=0o755)
    write_modules(root / "proj")
    (root / "proj" / "hello.txt").write_text("hello file\n")
    (root / "secret.txt").write_text("outside the project\n")
    return root


@pytest.fixture(scope="module", params=["in-process", "daemon"])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    root = _make_root("ak-wasm-")
    e = Env(root, request.param == "daemon")
    if e.daemon:
        r = ak("daemon", "start", env=e.env)
        assert r.returncode == 0, r.stderr
    try:
        yield e
    finally:
        if e.daemon:
            ak("daemon", "stop", env=e.env)
        shutil.rmtree(root, ignore_errors=True)


def test_hello_args_and_streams(env: Env) -> None:
    r = env.run("--json", "hello.wat", "a1", "two words")
    out = json.loads(r.stdout)
    assert out["exit_code"] == 0, r.stderr
    assert out["stdout"] == "hello\na1\0two words\0"
    assert out["stderr"] == "oops\n"
    assert out["backend"] == "wasm"
    assert out["rootfs"].startswith("none")
    if env.daemon:
        assert "pooled" in out  # it went through the daemon


def test_binary_module_and_verbose(env: Env) -> None:
    r = env.run("-v", "hello.wasm")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello\n"
    assert "backend wasm: WebAssembly (wasmtime" in r.stderr


def test_env_is_only_what_the_run_gives(env: Env) -> None:
    r = env.run("-e", "FOO=bar baz", "env.wat")
    assert r.returncode == 0, r.stderr
    pairs = r.stdout.split("\0")
    assert "FOO=bar baz" in pairs
    # Not the host's environment: what a run gives any sandbox, no more.
    assert not any(p.startswith("AGENTKERNEL_HOME=") for p in pairs)


def test_exit_code(env: Env) -> None:
    assert env.run("exit7.wat").returncode == 7


def test_stdin_is_streamed(env: Env) -> None:
    data = os.urandom(200_000).hex().encode()  # several pipe buffers' worth
    r = ak("run", "cat.wat", cwd=env.proj, env=env.env, input=data)
    assert r.returncode == 0, r.stderr
    assert r.stdout.encode() == data


def test_timeout_stops_an_endless_loop(env: Env) -> None:
    r = env.run("--timeout", "0.5", "loop.wat")
    assert r.returncode == 124, r.stderr
    assert "timed out" in r.stderr


def test_memory_limit(env: Env) -> None:
    # The module grows its memory until refused and exits with the MiB it got.
    assert env.run("--memory", "32m", "grow.wat").returncode == 32
    assert env.run("--memory", "64m", "grow.wat").returncode == 64


def test_limits_hold_run_after_run(env: Env) -> None:
    """Through a daemon each of these runs after the first is a job in a worker that ran
    the one before (same user, profile, project): every job gets its limits anew."""
    target = env.proj / "out-again.txt"
    write = env.proj / "write-again.wat"
    write.write_text(open_module(target.name, write=True))
    for _ in range(3):
        assert env.run("--memory", "32m", "grow.wat").returncode == 32
        assert env.run("-p", "restrictive", write.name).returncode != 0
        assert not target.exists()
        assert env.run("fds.wat").returncode == 0
    for _ in range(2):  # a worker that timed out is never used again: the next one is new
        r = env.run("--timeout", "0.5", "loop.wat")
        assert r.returncode == 124 and "timed out" in r.stderr, r.stderr
        assert env.run("hello.wat").returncode == 0


def test_output_beyond_the_workers_pipes_arrives_whole(env: Env) -> None:
    r = env.run("flood.wat")
    assert r.returncode == 0, r.stderr[-300:]
    assert r.stdout == "o" * (FLOOD_CHUNKS << 16)
    assert r.stderr.endswith("e" * (FLOOD_CHUNKS << 16))


def test_nothing_but_the_workspace_and_no_sockets(env: Env) -> None:
    r = env.run("fds.wat")
    assert r.returncode == 0, (r.returncode, r.stderr)


@pytest.mark.parametrize("profile, writable", [("permissive", True), ("moderate", False),
                                               ("restrictive", False)])
def test_workspace_per_profile(env: Env, profile: str, writable: bool) -> None:
    target = env.proj / f"out-{profile}.txt"
    mod = env.proj / f"write-{profile}.wat"
    mod.write_text(open_module(target.name, write=True))
    r = env.run("-p", profile, mod.name)
    if writable:
        assert r.returncode == 0, r.stderr
        assert target.read_text() == "written\n"
    else:
        assert r.returncode != 0  # a WASI errno: read-only preopen
        assert not target.exists()
    read = env.proj / "read.wat"
    read.write_text(open_module("hello.txt"))
    r = env.run("-p", profile, read.name)
    assert (r.returncode, r.stdout) == (0, "hello file\n"), r.stderr


@pytest.mark.parametrize("path", ["../secret.txt", "/etc/passwd", "link-out",
                                  "link-abs", "proj/../../secret.txt"])
def test_no_path_leaves_the_workspace(env: Env, path: str) -> None:
    for name, target in (("link-out", "../secret.txt"), ("link-abs", "/etc/passwd")):
        if not (env.proj / name).is_symlink():
            (env.proj / name).symlink_to(target)
    mod = env.proj / "escape.wat"
    for write in (False, True):
        mod.write_text(open_module(path, write=write))
        r = env.run("-p", "permissive", mod.name)
        assert r.returncode != 0, (path, write, r.stdout)
        assert "outside" not in r.stdout and "root:" not in r.stdout
    assert (env.root / "secret.txt").read_text() == "outside the project\n"


def test_bad_modules_fail_like_commands(env: Env) -> None:
    (env.proj / "bad.wat").write_text("(module (func $oops")
    r = env.run("bad.wat")
    assert r.returncode == 126 and "not a valid WebAssembly module" in r.stderr
    (env.proj / "nostart.wat").write_text("(module)")
    r = env.run("nostart.wat")
    assert r.returncode == 126 and "_start" in r.stderr
    r = env.run("missing.wasm")
    assert r.returncode == 127 and "no such WebAssembly module" in r.stderr


def test_hyperlight_says_it_ran_on_wasm(env: Env) -> None:
    r = env.run("--json", "-B", "hyperlight", "hello.wat")
    out = json.loads(r.stdout)
    assert out["exit_code"] == 0 and out["backend"] == "wasm"
    assert "hyperlight unavailable" in r.stderr
    if not env.daemon:
        assert "hyperlight unavailable" in out["isolation"]


def test_a_project_holding_the_control_plane_is_refused(env: Env) -> None:
    # The data and runtime dirs under the project: a preopen cannot hide them.
    r = ak("run", "proj/hello.wat", cwd=env.root, env=env.env)
    assert r.returncode != 0 and "cannot hide" in r.stderr, r.stderr


def test_no_persistent_wasm_sandbox(env: Env) -> None:
    if not env.daemon:
        pytest.skip("create goes through the daemon")
    r = ak("create", "wbox", "--backend", "wasm", cwd=env.proj, env=env.env)
    assert r.returncode == 125 and "keeps no sandbox" in r.stderr


# ---------------------------------------------------------------- the compiled-module cache


def _cache(env: Env) -> Path:
    return Path(env.env["AGENTKERNEL_HOME"]) / "wasm-cache"


def test_cache_is_private_and_distrusted_when_not(env: Env) -> None:
    if env.daemon:
        pytest.skip("the in-process run reads the cache afresh each time")
    assert env.run("hello.wat").returncode == 0
    cache = _cache(env)
    assert cache.stat().st_mode & 0o777 == 0o700
    entries = list(cache.glob("*.cwasm"))
    assert entries and all(e.stat().st_mode & 0o777 == 0o600 for e in entries)
    # Garbage in every entry: refused by the engine, recompiled, the run still works.
    for e in entries:
        e.write_bytes(b"\x7fELF" + os.urandom(4096))
    r = env.run("hello.wat")
    assert (r.returncode, r.stdout) == (0, "hello\n"), r.stderr
    # A cache dir others may write to is neither read nor written.
    shutil.rmtree(cache)
    cache.mkdir(mode=0o777)
    cache.chmod(0o777)
    assert env.run("hello.wat").returncode == 0
    assert not list(cache.iterdir())
    shutil.rmtree(cache)


def test_cache_entries_of_another_owner_are_ignored(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from agentkernel.backends import wasm_cache

    monkeypatch.setenv("AGENTKERNEL_HOME", str(tmp_path / "home"))
    wasm_cache.store("k", b"compiled")
    assert wasm_cache.load("k") == b"compiled"
    entry = tmp_path / "home" / "wasm-cache" / "k.cwasm"
    entry.chmod(0o644)
    assert wasm_cache.load("k") is None  # readable by others: maybe written by others too
    entry.chmod(0o600)
    if os.geteuid() == 0:
        os.chown(entry, NOBODY, NOBODY)
        assert wasm_cache.load("k") is None
    link = tmp_path / "home" / "wasm-cache" / "l.cwasm"
    link.symlink_to(entry)
    assert wasm_cache.load("l") is None


def test_cache_is_bounded(tmp_path: Path) -> None:
    from agentkernel.backends import wasm_cache

    for i in range(5):
        (tmp_path / f"{i}.cwasm").write_bytes(b"x" * 1000)
        os.utime(tmp_path / f"{i}.cwasm", (i, i))
    wasm_cache.trim(tmp_path, cap=2500)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3.cwasm", "4.cwasm"]


# ---------------------------------------------------------------- as an ordinary user


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root (to become nobody) and setpriv")
def test_as_nobody() -> None:
    root = _make_root("ak-wasm-nobody-")
    try:
        home = root / "nobody"
        home.mkdir()
        os.chown(home, NOBODY, NOBODY)
        os.chown(root / "proj", NOBODY, NOBODY)
        (root / "proj" / "w.wat").write_text(open_module("w.txt", write=True))

        def run(*args: str) -> tuple[int, str, str]:
            proc = ak_as_user(NOBODY, home, "run", *args, cwd=root / "proj", timeout=60)
            out, err = proc.communicate(timeout=90)
            return proc.returncode, out, err

        code, out, err = run("hello.wat", "x")
        assert (code, out) == (0, "hello\nx\0"), err
        assert run("--timeout", "0.5", "loop.wat")[0] == 124
        assert run("--memory", "32m", "grow.wat")[0] == 32
        assert run("-p", "restrictive", "w.wat")[0] != 0
        assert not (root / "proj" / "w.txt").exists()
        code, _out, err = run("-p", "permissive", "w.wat")
        assert code == 0, err
        assert (root / "proj" / "w.txt").stat().st_uid == NOBODY
        cache = home / "data" / "wasm-cache"
        assert cache.stat().st_uid == NOBODY and cache.stat().st_mode & 0o777 == 0o700
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)


def test_worker_finds_start_by_name_alone() -> None:
    """The worker's lookup of `_start` (by its name, without wrapping every export) finds
    the function, and nothing where a module has none or exports `_start` as another
    kind of thing."""
    import wasmtime

    from agentkernel.backends.wasm_worker import _start_of
    from wasm_modules import HELLO

    engine = wasmtime.Engine()
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    for text, found in ((HELLO, True), ('(module (memory (export "_start") 1))', False),
                        ('(module (func (export "main")))', False)):
        store = wasmtime.Store(engine)
        store.set_wasi(wasmtime.WasiConfig())
        instance = linker.instantiate(store, wasmtime.Module(engine, text))
        instance.exports = None  # type: ignore[assignment,method-assign]  # not used
        start = _start_of(instance, store)
        assert isinstance(start, wasmtime.Func) is found
        store.close()
