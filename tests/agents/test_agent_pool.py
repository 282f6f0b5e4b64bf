"""`run --agent` through the daemon's warm pool: agent-shaped sandboxes made ahead, never
shared, never holding a key before a run takes them.

A daemon of the test's (its gates trust the fake API's CA) serves `run --agent claude`
from its pool. The fake model (tests/agents/fake_model_api.py) answers every prompt with a
Bash tool call of `sh ./probe.sh`: each project carries its own probe, run by the real
Claude Code inside the sandbox as the agent's user. Attacked: two runs in a row share no
sandbox, HOME or placeholder and each key reaches the API only in its own run; a warm
sandbox (its gate's memory and files) holds no key; one project is not visible from a run
in another; the agent is not uid 0 and its edits land as the caller's.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import AGENTS_HOME, API_HOSTS, FakeApi, serving_fake_api  # tests/agents/conftest.py
from sandbox_helpers import SYSTEM_PYTHON, Result, ak, ak_as_user

NOBODY = 65534

PROBE = """\
echo "REPORT uid=$(id -u) sandbox=$AGENTKERNEL_SANDBOX key=$ANTHROPIC_API_KEY home=$HOME"
echo "HOMEFILES $(ls -A "$HOME" | tr '\\n' ' ')"
touch "$HOME/left-by-$AGENTKERNEL_SANDBOX"
echo "$AGENTKERNEL_SANDBOX" >> ./edited-by-agent
"""
DAEMON_TOML = """
[daemon]
adhoc_min = 1
adhoc_max = 2
pools = []
"""


@pytest.fixture(scope="module")
def api() -> Iterator[FakeApi]:
    with serving_fake_api("sh ./probe.sh") as fake:
        yield fake


@dataclass
class Pool:
    env: dict[str, str]
    runtime: Path
    api: FakeApi

    def run(self, project: Path, key: str, *args: str, flags: bool = False) -> Result:
        """`run --agent claude` headless in `project`, the key in the caller's variable.
        The API's names come from the caller's config (the CLI's import-light path), or
        with `flags` as --add-host (the full CLI's)."""
        hosts = self.api.add_hosts() if flags else []
        return ak("run", "-v", "--agent", "claude", *hosts, "--", *args,
                  cwd=project, timeout=240, env={**self.env, "ANTHROPIC_API_KEY": key})

    def turn(self, project: Path, key: str, *, flags: bool = False) -> tuple[Result, str]:
        """A Claude Code turn whose Bash call runs the project's probe: the run and the
        probe's report (what the fake model got back as the tool's result)."""
        self.api.log.unlink(missing_ok=True)
        r = self.run(project, key, "-p", "probe", "--dangerously-skip-permissions",
                     flags=flags)
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert "fake-model-done" in r.stdout, (r.stdout, r.stderr)
        results = [x for s in self.api.seen() for x in s["tool_result"]]  # type: ignore
        assert results, self.api.seen()
        return r, str(results[-1])

    def keys_seen(self) -> set[str]:
        return {str(s["headers"].get("x-api-key")) for s in self.api.seen()  # type: ignore
                if str(s["path"]).startswith("/v1/messages")}

    def wait_warm(self, project: Path, timeout: float = 120) -> None:
        """Until the daemon keeps an agent sandbox of `project` warm."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = ak("daemon", "status", env=self.env).stdout
            lines = out.splitlines()
            at = [i for i, x in enumerate(lines) if x.endswith(f" workspace={project}")]
            if at and re.search(r"Warm:\s+[1-9]", lines[at[0] + 1]):
                return
            time.sleep(0.2)
        raise AssertionError(f"no warm agent sandbox for {project}: {out}")


@pytest.fixture(scope="module")
def pool(api: FakeApi, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    if shutil.which("bwrap") is None:
        pytest.skip("needs bubblewrap")
    root = tmp_path_factory.mktemp("akpool")
    (root / "home").mkdir()
    (root / "home" / "agents").symlink_to(AGENTS_HOME / "agents")
    (root / "run").mkdir(mode=0o700)
    (root / "daemon.toml").write_text(DAEMON_TOML)
    (root / "xdg" / "agentkernel").mkdir(parents=True)
    names = ", ".join(f'"{h}:{api.addr}"' for h in API_HOSTS)
    (root / "xdg" / "agentkernel" / "config.toml").write_text(f"[network]\nhosts = [{names}]\n")
    env = {"XDG_CONFIG_HOME": str(root / "xdg"), "AGENTKERNEL_HOME": str(root / "home"),
           "AGENTKERNEL_RUNTIME_DIR": str(root / "run"),
           "AGENTKERNEL_DAEMON_CONFIG": str(root / "daemon.toml"),
           "AGENTKERNEL_NO_DAEMON": "", "AGENTKERNEL_DAEMON_AUTOSTART": "0",
           # the daemon's gates (started by it) trust the fake API's CA
           "AGENTKERNEL_EGRESS_UPSTREAM_CA": str(api.ca),
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1"}
    r = ak("daemon", "start", env=env)
    assert r.returncode == 0, r.stderr
    try:
        yield Pool(env, root / "run", api)
    finally:
        ak("daemon", "stop", env=env)


@pytest.fixture
def projects() -> Iterator[Path]:
    """A dir for projects shown at their own path (not under /tmp, the sandbox's own)."""
    base = Path(tempfile.mkdtemp(prefix="ak-agentpool-", dir="/var/lib"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _project(base: Path, name: str, probe: str = PROBE) -> Path:
    project = base / name
    project.mkdir()
    (project / "probe.sh").write_text(probe)
    return project


def _report(text: str) -> dict[str, str]:
    line = next(x for x in text.splitlines() if x.startswith("REPORT "))
    return dict(part.split("=", 1) for part in line.split()[1:])


def test_runs_in_a_row_share_no_sandbox_home_placeholder_or_key(pool: Pool,
                                                                projects: Path) -> None:
    """Three runs in one project, the later ones from the warm pool: each has a sandbox,
    HOME and placeholder of its own, its own caller's key reaches the API and no other,
    the agent is uid 1000 (not 0), and its edits land in the project as the caller's."""
    project = _project(projects, "p")
    keys = [f"sk-ant-run{i}-{secrets.token_hex(12)}" for i in range(3)]
    reports = []
    for i, key in enumerate(keys):
        if i:
            pool.wait_warm(project)
        r, text = pool.turn(project, key)
        assert pool.keys_seen() == {key}, pool.api.seen()
        if i:
            assert "via daemon (warm pool)" in r.stderr, r.stderr
        assert key not in text, text
        reports.append((_report(text), text))
    sandboxes = {rep["sandbox"] for rep, _ in reports}
    placeholders = {rep["key"] for rep, _ in reports}
    assert len(sandboxes) == 3 and len(placeholders) == 3, reports
    for rep, text in reports:
        assert rep["uid"] == "1000" and rep["home"] == "/home/agent", text
        assert rep["key"].startswith("ak-secret-"), text
        assert "left-by-" not in text.split("HOMEFILES", 1)[1], text  # a fresh HOME
    edited = project / "edited-by-agent"
    assert edited.read_text().split() == [rep["sandbox"] for rep, _ in reports]
    assert edited.stat().st_uid == os.getuid()


def test_a_warm_agent_sandbox_holds_no_key(pool: Pool, projects: Path) -> None:
    """After runs with a key, the agent sandbox waiting in the pool has no trace of it:
    not in its files, not in the memory or memfds of what holds its gate's sockets (read
    whole, as root); its gate takes a key once, only for the hosts its certificate names,
    and then holds it (the scan finds it there)."""
    from agentkernel.egress_gate import grant
    from agentkernel.errors import UsageError

    project = _project(projects, "q")
    key = f"sk-ant-warm-{secrets.token_hex(12)}"
    _, text = pool.turn(project, key)
    pool.wait_warm(project)
    used = pool.runtime / "sandboxes" / _report(text)["sandbox"]
    deadline = time.monotonic() + 30
    while used.exists():  # the run's own sandbox (which had the key) is torn down
        assert time.monotonic() < deadline, f"{used} outlived its run"
        time.sleep(0.1)
    before = _pool_scratches(pool.runtime)
    assert before, "no warm sandbox"
    for scratch in before:
        for path in scratch.rglob("*"):
            if path.is_file() and not path.is_socket():
                assert key.encode() not in path.read_bytes(), path
        # Whoever holds its gate's sockets (its gate, if one runs; the daemon's gate fork
        # server, which forks one on demand): memory and memfds (the gate's sealed config).
        scanned = sum(_scan(pid, key.encode()) for pid in _holders(scratch))
        assert scanned > 1 << 20, scanned  # (the scan read their heaps, not nothing)
    scratch = before[0]
    given = f"sk-ant-given-{secrets.token_hex(12)}"
    slot = {"name": "x", "header": "x-api-key", "placeholder": "ak-secret-" + "0" * 32,
            "value": given}
    with pytest.raises(UsageError, match="no certificate for"):
        grant(scratch, [{**slot, "hosts": ["evil.example"]}])
    grant(scratch, [{**slot, "hosts": ["api.anthropic.com"]}])
    found = []  # the scan finds a key a gate holds (its gate runs now: the grant forked it)
    for pid in _holders(scratch):
        try:
            _scan(pid, given.encode())
        except AssertionError:
            found.append(pid)
    assert found, _holders(scratch)
    with pytest.raises(UsageError, match="given already"):
        grant(scratch, [{**slot, "hosts": ["api.anthropic.com"]}])


def test_one_project_is_not_visible_from_another(pool: Pool, projects: Path) -> None:
    """Runs in project A, then in B: B's agent finds none of A's files (not at A's path,
    not anywhere it can list), and the sandboxes differ."""
    a = _project(projects, "a")
    (a / "a-secret").write_text("only for A\n")
    b = _project(projects, "b", PROBE + f"ls -A {a} 2>&1 | sed 's/^/A-DIR /'\n"
                 "for d in /*; do case $d in /proc|/sys|/dev|/usr|/lib*|/bin|/sbin|/etc) ;;"
                 " *) grep -rlF \"$(printf 'only for %s' A)\" $d 2>/dev/null"
                 " | sed 's/^/FOUND /';; esac; done\n")
    key = f"sk-ant-ab-{secrets.token_hex(12)}"
    _, text_a = pool.turn(a, key, flags=True)  # (the full CLI's path this time)
    _, text_b = pool.turn(b, key, flags=True)
    assert _report(text_a)["sandbox"] != _report(text_b)["sandbox"]
    assert "FOUND" not in text_b, text_b
    listing = [x for x in text_b.splitlines() if x.startswith("A-DIR ")]
    assert listing and all("No such file" in x for x in listing), text_b
    assert not (a / "edited-by-agent").read_text().count(_report(text_b)["sandbox"])


def test_headless_exit_code_and_pty_through_the_daemon(pool: Pool, projects: Path) -> None:
    """A failing agent's exit code is the host's; on a terminal the agent gets a PTY of
    our window's size through the daemon too."""
    project = _project(projects, "e")
    binary = AGENTS_HOME / "agents" / "claude" / "node_modules" / ".bin" / "claude"
    host = subprocess.run([str(binary), "--no-such-flag"], capture_output=True, timeout=60,
                          check=False)
    r = pool.run(project, "sk-ant-x", "--no-such-flag")
    assert r.returncode == host.returncode != 0, (r.stdout, r.stderr)
    assert "via daemon" in r.stderr, r.stderr
    from test_agent_sandbox import CLI, Terminal  # tests/agents

    env = {**os.environ, **pool.env, "TERM": "xterm"}
    t = Terminal([*CLI, "run", "-v", "--agent", "claude", "--", "--version"], env, 30, 90,
                 cwd=project)
    out = t.expect("(Claude Code)", timeout=120)
    assert t.wait() == 0
    assert "via daemon" in out, out


def test_an_ordinary_users_daemon_runs_the_agent_as_its_user(api: FakeApi,
                                                             projects: Path) -> None:
    """As host user `nobody`: its own daemon serves `run --agent` from its pool; the
    agent is uid 1000 inside, the key reaches the API, and its edits are nobody's."""
    if shutil.which("setpriv") is None or not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip("needs setpriv and the system's python3")
    home = projects / "nobody"
    for sub in ("", "data", "data/agents"):
        (home / sub).mkdir()
    project = _project(home, "project")
    # Hard links, not a symlink: CI's checkout sits in a 0700 dir nobody cannot cross.
    subprocess.run(["cp", "-al", str(AGENTS_HOME / "agents" / "claude"),
                    str(home / "data" / "agents" / "claude")], check=True)
    for path in (home, home / "data", project, project / "probe.sh"):
        os.chown(path, NOBODY, NOBODY)
    daemon_env = {"AGENTKERNEL_EGRESS_UPSTREAM_CA": str(api.ca),
                  "AGENTKERNEL_DAEMON_CONFIG": str(home / "daemon.toml")}
    (home / "daemon.toml").write_text(DAEMON_TOML)

    def as_nobody(*args: str, **env: str) -> tuple[int, str, str]:
        proc = ak_as_user(NOBODY, home, *args, cwd=project, timeout=240,
                          env={**daemon_env, **env})
        out, err = proc.communicate(timeout=260)
        return proc.returncode, out, err

    code, _, err = as_nobody("daemon", "start")
    assert code == 0, err
    try:
        for i in range(2):
            key = f"sk-ant-nobody{i}-{secrets.token_hex(12)}"
            api.log.unlink(missing_ok=True)
            code, out, err = as_nobody("run", "-v", "--agent", "claude", *api.add_hosts(),
                                       "--", "-p", "probe", "--dangerously-skip-permissions",
                                       ANTHROPIC_API_KEY=key)
            assert code == 0 and "fake-model-done" in out, (out, err)
            assert "via daemon" in err, err
            seen = api.seen()
            assert {str(s["headers"].get("x-api-key")) for s in seen  # type: ignore
                    if str(s["path"]).startswith("/v1/messages")} == {key}, seen
            report = _report(str([x for s in seen for x in s["tool_result"]][-1]))  # type: ignore
            assert report["uid"] == "1000" and report["key"].startswith("ak-secret-"), report
        assert (project / "edited-by-agent").stat().st_uid == NOBODY
    finally:
        as_nobody("daemon", "stop")


# ------------------------------------------------------------------- helpers


def _pool_scratches(runtime: Path) -> list[Path]:
    """The runtime dirs of the daemon's warm (and running) pool sandboxes with a gate."""
    return [p for p in (runtime / "sandboxes").glob("pool-*") if (p / "egress.sock").exists()]


def _holders(scratch: Path) -> list[int]:
    """The gate processes holding a gate's control socket (its gate, the fork server).
    The daemon holds copies too (to re-register its sandboxes with a new fork server):
    it is the trusted starter that was handed the earlier run's key, so it is not one of
    the places a warm sandbox's key must be absent from."""
    from agentkernel.egress_forkserver import GATE_COMM, SERVER_COMM

    sock = str(scratch / "egress.sock")
    # The listening socket's line (flags __SO_ACCEPTCON): a connection its gate accepted
    # shows the same path (a grant's or a wake's, until the gate closes it), and one of
    # those, held by nobody a moment later, would make the scan find no holder.
    inode = next(fields[6] for fields in map(str.split, Path("/proc/net/unix").read_text()
                                             .splitlines()[1:])
                 if fields[-1] == sock and fields[3] == "00010000")
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() not in (GATE_COMM, SERVER_COMM):
                continue
            if any(_fd_link(fd) == f"socket:[{inode}]" for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
        except OSError:
            continue  # (the process ended meanwhile)
    assert pids, f"no process holds {sock}"
    return pids


def _fd_link(fd: Path) -> str | None:
    """What an fd is, or None if it was closed since its dir was listed: the fork server
    closes and opens fds as gates come and go (a gate's pidfd), and a fork of it closes
    all but its own; one such fd must not hide the process from the scan."""
    try:
        return os.readlink(fd)
    except OSError:
        return None


def _scan(pid: int, needle: bytes) -> int:
    """`pid`'s memory and the memfds it holds searched for `needle` (AssertionError if
    found); the bytes read."""
    scanned = _scan_memory(pid, needle)
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith("/memfd:"):
                data = fd.read_bytes()
                scanned += len(data)
                assert needle not in data, f"the key is in {pid}'s {os.readlink(fd)}"
        except OSError:
            continue
    return scanned


def _scan_memory(pid: int, needle: bytes) -> int:
    """Every readable mapping of `pid` searched for `needle` (AssertionError if found);
    the bytes read."""
    scanned = 0
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            fields = line.split()
            if "r" not in fields[1] or line.endswith(("[vvar]", "[vsyscall]")):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except OSError:
                continue
            scanned += len(data)
            assert needle not in data, f"the key is in {line}"
    return scanned
