"""`create NAME --agent AGENT` and `attach`: a kept agent sandbox, and the agent on a PTY.

The daemon (private dirs, its data dir holding the suite's installed agent CLIs) keeps an
agent sandbox whose key is a stored secret: the real Claude Code, run in it with `exec`,
does a tool-using turn against the fake Anthropic API (conftest.fake_api) that sees the
real key; inside there is only the placeholder; $HOME survives a stop and start, and so
does the key's injection (the gate reads the store again at each start), also once a new
daemon has adopted the sandbox. `attach` and an
interactive `run --agent` are driven through a real pseudo-terminal (the pty module):
the window size inside is ours, a resize reaches it, the exit code passes through. A kept
gVisor agent sandbox does the same turn with `exec`, and `attach` gives a shell and the
agent, all as uid 1000.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import AGENTS_HOME, REAL_KEY, FakeApi, agent_bin_dir
from sandbox_helpers import Result, ak

CLI = [sys.executable, "-m", "agentkernel"]

DAEMON_TOML = """
[daemon]
pool_min = 0
pool_max = 1
adhoc_min = 0
"""


class AgentDaemon:
    """A daemon of the test's whose data dir has the suite's agents and a stored key."""

    def __init__(self, root: Path, env: dict[str, str], project: Path) -> None:
        self.root = root
        self.env = env
        self.project = project  # `dev`'s, outside /tmp: shown at its own path

    def ak(self, *args: str, cwd: Path | None = None, timeout: float = 120,
           **extra: str) -> Result:
        return ak(*args, cwd=cwd, env={**self.env, **extra}, timeout=timeout)


@pytest.fixture(scope="module")
def agent_daemon(fake_api: FakeApi, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[AgentDaemon]:
    root = tmp_path_factory.mktemp("akagentd")
    (root / "daemon.toml").write_text(DAEMON_TOML)
    (root / "run").mkdir(mode=0o700)
    (root / "home").mkdir()
    (root / "home" / "agents").symlink_to(AGENTS_HOME / "agents")
    # Outside /tmp (the sandbox's own), so that the agent sees it at its own path.
    base = Path(tempfile.mkdtemp(prefix="ak-samepath-", dir="/var/lib"))
    project = base / "project"
    project.mkdir()
    env = {"AGENTKERNEL_HOME": str(root / "home"), "AGENTKERNEL_RUNTIME_DIR": str(root / "run"),
           "AGENTKERNEL_DAEMON_CONFIG": str(root / "daemon.toml"),
           # the daemon starts the gates: they trust the fake API's CA
           "AGENTKERNEL_EGRESS_UPSTREAM_CA": str(fake_api.ca), "ANTHROPIC_API_KEY": ""}
    d = AgentDaemon(root, env, project)
    r = d.ak("secret", "set", "anth", "--host", "api.anthropic.com", "--header", "x-api-key",
             "--env", "ANTHROPIC_API_KEY", "--from-env", "AK_TEST_KEY", AK_TEST_KEY=REAL_KEY)
    assert r.returncode == 0, r.stderr
    assert d.ak("daemon", "start").returncode == 0
    r = d.ak("create", "dev", "--agent", "claude", "--dir", str(project),
             *fake_api.add_hosts(), timeout=180)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "Agent:   claude" in r.stdout, r.stdout
    try:
        yield d
    finally:
        d.ak("remove", "dev")
        d.ak("daemon", "stop")
        shutil.rmtree(base, ignore_errors=True)


def _claude_turn(d: AgentDaemon, api: FakeApi, name: str = "dev") -> str:
    """One headless turn of the real Claude Code in the kept sandbox; the Bash tool's report."""
    api.log.unlink(missing_ok=True)
    r = d.ak("exec", name, "--", "claude", "-p", "check the sandbox",
             "--dangerously-skip-permissions", timeout=240)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "fake-model-done" in r.stdout, (r.stdout, r.stderr)
    seen = api.seen()
    keys = {str(s["headers"].get("x-api-key")) for s in seen  # type: ignore[union-attr]
            if str(s["path"]).startswith("/v1/messages")}
    assert keys == {REAL_KEY}, seen
    results = [r for s in seen for r in s["tool_result"]]  # type: ignore[union-attr]
    assert results, seen
    return str(results[-1])


def test_kept_agent_sandbox(agent_daemon: AgentDaemon, fake_api: FakeApi) -> None:
    d = agent_daemon
    info = {row["name"]: row for row in json.loads(d.ak("list", "--json").stdout)}
    assert info["dev"]["agent"] == "claude" and info["dev"]["backend"] == "namespaces"
    report = _claude_turn(d, fake_api)
    assert report.startswith("uid=1000 host=agentkernel key=ak-secret-"), report  # not root
    assert REAL_KEY not in report and "FOUND" not in report, report
    assert "other-refused" in report, report
    assert report.splitlines()[0].endswith(f" pwd={d.project}"), report  # its own path
    assert (d.project / "agent-was-here").read_text() == "edited\n"  # rw project
    assert (d.project / "agent-was-here").stat().st_uid == 0  # the caller's on the host
    r = d.ak("exec", "dev", "--", "sh", "-c", "echo kept > $HOME/mark; echo $HOME; id -u")
    assert r.stdout.split() == ["/home/agent", "1000"], r.stderr  # the agent's user
    assert d.ak("stop", "dev").returncode == 0
    assert d.ak("start", "dev").returncode == 0
    r = d.ak("exec", "dev", "--", "cat", "/home/agent/mark")
    assert r.stdout.strip() == "kept", r.stderr  # a persistent per-sandbox HOME
    # A new daemon adopts it, gate and all.
    assert d.ak("daemon", "stop").returncode == 0
    assert d.ak("daemon", "start").returncode == 0
    # The gate injects the key again after the restarts.
    report = _claude_turn(d, fake_api)
    assert "FOUND" not in report and REAL_KEY not in report, report
    assert report.splitlines()[0].endswith(f" pwd={d.project}"), report  # checked again


def test_create_agent_refuses_a_key_only_in_the_shell(tmp_path: Path) -> None:
    """A kept sandbox's key must be a stored secret: one only in the shell is refused
    (before any daemon is asked), naming the command that stores it."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "agents").symlink_to(AGENTS_HOME / "agents")
    r = ak("create", "x", "--agent", "claude", timeout=60,
           env={"AGENTKERNEL_HOME": str(home), "ANTHROPIC_API_KEY": "sk-ant-shell-only",
                "AGENTKERNEL_RUNTIME_DIR": str(tmp_path / "nodaemon")})
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "agentkernel secret set claude" in r.stderr, r.stderr
    r = ak("create", "x", "--agent", "nosuch", env={"AGENTKERNEL_HOME": str(home)})
    assert "unknown agent 'nosuch'" in r.stderr, r.stderr


# ------------------------------------------------------------------- a real terminal


class Terminal:
    """Our CLI on the slave side of a new PTY; we are the terminal on the master."""

    def __init__(self, argv: list[str], env: dict[str, str], rows: int, cols: int,
                 cwd: Path | None = None) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: our CLI, its stdin/stdout the PTY
            try:
                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
                if cwd is not None:
                    os.chdir(cwd)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.out = b""

    def resize(self, rows: int, cols: int) -> None:
        """As a terminal emulator does: the kernel signals the foreground group."""
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def expect(self, needle: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while needle.encode() not in self.out:
            left = deadline - time.monotonic()
            assert left > 0, f"{needle!r} not seen in {self.out[-2000:]!r}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:
                    chunk = b""
                assert chunk, f"EOF before {needle!r}: {self.out[-2000:]!r}"
                self.out += chunk
        return self.out.decode(errors="replace")

    def wait(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if ready:
                with contextlib.suppress(OSError):
                    self.out += os.read(self.fd, 65536)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            assert time.monotonic() < deadline, self.out[-2000:]


def _cli_env(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, "TERM": "xterm", **extra}


def test_attach_shell_window_size_and_exit_code(agent_daemon: AgentDaemon) -> None:
    t = Terminal([*CLI, "attach", "dev", "--shell"], _cli_env(agent_daemon.env), 33, 101)
    t.expect("@agentkernel:")  # the prompt: the shell reads its terminal now
    t.send("stty size\n")
    t.expect("33 101")
    t.resize(40, 120)
    time.sleep(0.5)  # the CLI passes SIGWINCH on; the next command sees the new size
    t.send("stty size\n")
    t.expect("40 120")
    t.send("exit 7\n")
    assert t.wait() == 7


def test_attach_starts_the_agent(agent_daemon: AgentDaemon) -> None:
    """`attach NAME` of an agent's sandbox runs the agent (here `-- --version`) on a PTY,
    and its exit code passes through."""
    t = Terminal([*CLI, "attach", "dev", "--", "--version"], _cli_env(agent_daemon.env), 24, 80)
    t.expect("(Claude Code)")
    assert t.wait() == 0
    host = subprocess.run([str(agent_bin_dir("claude") / "claude"), "--no-such-flag"],
                          capture_output=True, timeout=60, check=False)
    t = Terminal([*CLI, "attach", "dev", "--", "--no-such-flag"], _cli_env(agent_daemon.env),
                 24, 80)
    assert t.wait() == host.returncode != 0


def test_run_agent_interactive_on_a_pty(tmp_path: Path) -> None:
    """An interactive `run --agent` (stdin and stdout a terminal): the agent on a PTY of
    our window's size, in-process; its output and exit code come back."""
    if shutil.which("bwrap") is None:
        pytest.skip("needs bubblewrap")
    home = tmp_path / "home"
    home.mkdir()
    (home / "agents").symlink_to(AGENTS_HOME / "agents")
    env = _cli_env({"AGENTKERNEL_HOME": str(home), "AGENTKERNEL_NO_DAEMON": "1"})
    t = Terminal([*CLI, "run", "-q", "--agent", "claude", "--", "--version"], env, 30, 90,
                 cwd=tmp_path)
    t.expect("(Claude Code)", timeout=120)
    assert t.wait() == 0
    t = Terminal([*CLI, "run", "-q", "--agent", "claude", "--", "--no-such-flag"], env, 30, 90,
                 cwd=tmp_path)
    assert t.wait() not in (0, 125)


def test_create_copies_settings_and_defaults_to_this_project(agent_daemon: AgentDaemon,
                                                             tmp_path: Path) -> None:
    """`create --agent --settings`, run in a project dir: the project is that dir; the
    host's instructions and skills are copies in the sandbox's HOME; its settings file and
    sign-in are not, nor what a link in a skill points at."""
    home = tmp_path / "home"
    (home / ".claude" / "skills" / "s").mkdir(parents=True)
    (home / ".claude" / "CLAUDE.md").write_text("be brief\n")
    (home / ".claude" / "skills" / "s" / "SKILL.md").write_text("---\nname: s\n---\n")
    (home / ".claude" / "settings.json").write_text('{"env": {"X": "sk-leak"}}')
    (home / ".claude" / ".credentials.json").write_text("sk-leak")
    (tmp_path / "id_rsa").write_text("PRIVATE\n")
    (home / ".claude" / "skills" / "s" / "leak").symlink_to(tmp_path / "id_rsa")
    project = tmp_path / "proj"
    project.mkdir()
    (project / "README").write_text("the project\n")
    d = agent_daemon
    r = d.ak("create", "dev2", "--agent", "claude", "--settings", cwd=project, HOME=str(home))
    assert r.returncode == 0, (r.stdout, r.stderr)
    try:
        assert "Settings: 2 file(s)" in r.stdout, r.stdout
        r = d.ak("exec", "dev2", "--", "sh", "-c",
                 "cat /workspace/README ~/.claude/CLAUDE.md; find ~/.claude -type f | sort; "
                 "grep -rl -e sk-leak -e PRIVATE ~ /workspace || echo clean")
        assert r.stdout.splitlines() == [
            "the project", "be brief", "/home/agent/.claude/CLAUDE.md",
            "/home/agent/.claude/skills/s/SKILL.md", "clean"], (r.stdout, r.stderr)
        # written as the agent's user (the in-sandbox agent is it), its own to change
        r = d.ak("exec", "dev2", "--", "stat", "-c", "%u:%g", "/home/agent/.claude/CLAUDE.md")
        assert r.stdout.strip() == "1000:1000", (r.stdout, r.stderr)
    finally:
        d.ak("remove", "dev2")


def test_kept_gvisor_agent_sandbox(agent_daemon: AgentDaemon, fake_api: FakeApi) -> None:
    """`create --agent -B gvisor`: the real Claude Code's turn with `exec`, a shell and the
    agent with `attach`, all as uid 1000 with HOME /home/agent (not gVisor's root); the
    project at its own path, its marker the caller's on the host."""
    from sandbox_helpers import backend_available

    if not backend_available("gvisor"):
        pytest.skip("gvisor backend not installed")
    d = agent_daemon
    base = Path(tempfile.mkdtemp(prefix="ak-samepath-", dir="/var/lib"))
    project = base / "project"
    project.mkdir()
    r = d.ak("create", "gdev", "--agent", "claude", "-B", "gvisor", "--dir", str(project),
             *fake_api.add_hosts(), timeout=180)
    assert r.returncode == 0, (r.stdout, r.stderr)
    try:
        info = {row["name"]: row for row in json.loads(d.ak("list", "--json").stdout)}
        assert info["gdev"]["backend"] == "gvisor", info["gdev"]
        report = _claude_turn(d, fake_api, "gdev")
        assert report.startswith("uid=1000 host=agentkernel key=ak-secret-"), report
        assert REAL_KEY not in report and "FOUND" not in report, report
        assert "other-refused" in report, report
        assert report.splitlines()[0].endswith(f" pwd={project}"), report
        marker = project / "agent-was-here"
        assert marker.read_text() == "edited\n" and marker.stat().st_uid == os.getuid()
        r = d.ak("exec", "gdev", "--", "sh", "-c", "echo $HOME; id -u; uname -r")
        home, uid, kernel = r.stdout.split()
        assert (home, uid) == ("/home/agent", "1000") and kernel != os.uname().release, r
        t = Terminal([*CLI, "attach", "gdev", "--shell"], _cli_env(d.env), 24, 80)
        t.expect("@agentkernel:")
        t.send('echo "who=$(id -u):$(id -g) $HOME"\n')
        t.expect("who=1000:1000 /home/agent")
        t.send("exit 7\n")
        assert t.wait() == 7
        t = Terminal([*CLI, "attach", "gdev", "--", "--version"], _cli_env(d.env), 24, 80)
        t.expect("(Claude Code)", timeout=120)
        assert t.wait() == 0
    finally:
        d.ak("remove", "gdev")
        shutil.rmtree(base, ignore_errors=True)
