"""`run --agent`: the real agent CLIs in a sandbox, their keys kept outside.

A fake model API (tests/agents/fake_model_api.py, TLS from a test CA) serves the agents'
API hosts from a network namespace of ours; the sandbox's resolver answers those names
with its address (--add-host) and the egress gate trusts the test CA
(AGENTKERNEL_EGRESS_UPSTREAM_CA). The real Claude Code, run headless inside the sandbox,
asks the fake model, which answers with a Bash tool call; the command it runs inside
reports its uid, hostname, the key variable it sees, its cwd and whether the real key is
anywhere in the sandbox (every /proc/*/environ and cmdline, the project, /root, /tmp, /etc).
The agent's project is shown at its own host path: the tests that check it keep theirs
outside /tmp (the sandbox's own), under /var/lib; a project under /tmp is shown at
/workspace, with a warning.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import AGENTS_HOME, REAL_KEY, FakeApi  # tests/agents/conftest.py
from sandbox_helpers import SYSTEM_PYTHON, ak, ak_as_user

NOBODY = 65534


@pytest.fixture
def own_path_base() -> Iterator[Path]:
    """A dir for projects that can be shown at their own path (not under /tmp)."""
    base = Path(tempfile.mkdtemp(prefix="ak-samepath-", dir="/var/lib"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def data_home(tmp_path: Path) -> Path:
    """A data dir of its own whose agents are the suite's installed CLIs."""
    home = tmp_path / "data"
    home.mkdir()
    (home / "agents").symlink_to(AGENTS_HOME / "agents")
    return home


def _env(data_home: Path, api: FakeApi | None = None, **extra: str) -> dict[str, str]:
    env = {"AGENTKERNEL_HOME": str(data_home), "AGENTKERNEL_NO_DAEMON": "1", **extra}
    if api is not None:
        env["AGENTKERNEL_EGRESS_UPSTREAM_CA"] = str(api.ca)
    return env


def _check_claude_run(out: str, err: str, code: int, api: FakeApi,
                      pwd: Path | None = None, uid: int = 1000) -> None:
    assert code == 0, (out, err)
    assert "fake-model-done" in out, (out, err)
    seen = api.seen()
    keys = {str(s["headers"].get("x-api-key")) for s in seen  # type: ignore[union-attr]
            if s["path"].startswith("/v1/messages")}  # type: ignore[union-attr]
    assert keys == {REAL_KEY}, seen  # the real key, never the placeholder
    results = [r for s in seen for r in s["tool_result"]]  # type: ignore[union-attr]
    assert results, seen
    report = results[-1]
    first = report.splitlines()[0]
    # Not uid 0 inside (agents/request.AGENT_USER), as root and as an ordinary user, on
    # namespaces and gVisor.
    assert first.startswith(f"uid={uid} host=agentkernel key=ak-secret-"), report
    assert REAL_KEY not in report and "FOUND" not in report, report
    assert "other-refused" in report, report
    assert "example.org REFUSED" in err, err  # told, and in the gate's log
    if pwd is not None:  # the project at its own path, the agent's cwd
        assert first.endswith(f" pwd={pwd}"), report
        assert "shown at /workspace" not in err, err


def test_claude_headless_key_stays_outside(fake_api: FakeApi, data_home: Path,
                                           own_path_base: Path) -> None:
    """The real Claude Code calls the fake API with the real key; inside, only the
    placeholder; an unlisted host is refused; it works in the project at its own path."""
    project = own_path_base / "project"
    project.mkdir()
    fake_api.log.unlink(missing_ok=True)
    r = ak("run", "--agent", "claude", *fake_api.add_hosts(), "--", "-p", "check the sandbox",
           "--dangerously-skip-permissions", cwd=project, timeout=240,
           env=_env(data_home, fake_api, ANTHROPIC_API_KEY=REAL_KEY))
    _check_claude_run(r.stdout, r.stderr, r.returncode, fake_api, pwd=project)
    # The project is the agent's to edit (rw), its files the caller's.
    marker = project / "agent-was-here"
    assert marker.read_text() == "edited\n"
    assert marker.stat().st_uid == os.getuid()


def test_review_shows_a_diff_and_applies_only_when_asked(fake_api: FakeApi, data_home: Path,
                                                         project: Path) -> None:
    """--review: the agent edits a copy; its changes are shown as a diff; without a
    terminal to say y they stay out of the project; --apply brings them in."""
    (project / "agent-was-here").write_text("original\n")
    args = ("run", "--agent", "claude", *fake_api.add_hosts())
    prompt = ("--", "-p", "edit", "--dangerously-skip-permissions")
    env = _env(data_home, fake_api, ANTHROPIC_API_KEY=REAL_KEY)
    r = ak(*args, "--review", *prompt, cwd=project, timeout=240, env=env)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "-original" in r.stdout and "+edited" in r.stdout, r.stdout
    assert "not applied" in r.stderr, r.stderr
    assert (project / "agent-was-here").read_text() == "original\n"
    r = ak(*args, "--apply", *prompt, cwd=project, timeout=240, env=env)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "applied 1 change(s)" in r.stderr, r.stderr
    assert (project / "agent-was-here").read_text() == "edited\n"
    assert {p.name for p in project.iterdir()} == {"agent-was-here", "hello.txt"}


def test_claude_as_an_ordinary_user(fake_api: FakeApi, own_path_base: Path) -> None:
    if shutil.which("setpriv") is None or not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip("needs setpriv and the system's python3")
    home = own_path_base / "nobody"
    home.mkdir()
    try:
        for sub in ("project", "data", "data/agents"):
            (home / sub).mkdir()
        # Hard links, not a symlink: CI's checkout sits in a 0700 dir nobody cannot cross.
        subprocess.run(["cp", "-al", str(AGENTS_HOME / "agents" / "claude"),
                        str(home / "data" / "agents" / "claude")], check=True)
        for path in (home, home / "project", home / "data"):
            os.chown(path, NOBODY, NOBODY)
        home.chmod(0o755)
        fake_api.log.unlink(missing_ok=True)
        proc = ak_as_user(NOBODY, home, "run", "--agent", "claude", *fake_api.add_hosts(),
                          "--", "-p", "check", "--dangerously-skip-permissions",
                          cwd=home / "project", timeout=240,
                          env={"ANTHROPIC_API_KEY": REAL_KEY,
                               "AGENTKERNEL_EGRESS_UPSTREAM_CA": str(fake_api.ca),
                               "AGENTKERNEL_NO_DAEMON": "1"})
        out, err = proc.communicate(timeout=260)
        _check_claude_run(out, err, proc.returncode, fake_api, pwd=home / "project")
        marker = home / "project" / "agent-was-here"
        assert marker.stat().st_uid == NOBODY, marker.stat()
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.parametrize("hostile", ["symlink-to-etc", "/usr/local"])
def test_a_system_dir_project_is_shown_at_workspace(hostile: str, data_home: Path,
                                                    own_path_base: Path) -> None:
    """A project that is (a symlink to) a system dir the sandbox needs is never mounted
    over it: the agent gets it at /workspace, with a one-line warning."""
    if not (AGENTS_HOME / "agents" / "claude").is_dir():
        pytest.skip("agent CLIs not installed (scripts/install-agents.sh)")
    if hostile.startswith("/"):
        cwd = Path(hostile)
        if not cwd.is_dir():
            pytest.skip(f"no {hostile} here")
    else:
        cwd = own_path_base / "link"
        cwd.symlink_to("/etc")
    r = ak("run", "--agent", "claude", "--", "--version", cwd=cwd, timeout=180,
           env=_env(data_home))
    assert r.returncode == 0, r.stderr
    assert "Claude Code" in r.stdout, (r.stdout, r.stderr)
    warned = [line for line in r.stderr.splitlines() if "shown at /workspace" in line]
    assert len(warned) == 1, r.stderr


def test_stored_secret_covers_the_agent(data_home: Path, project: Path) -> None:
    """`agents` says secret:NAME when a stored secret covers the agent."""
    env = _env(data_home, ANTHROPIC_API_KEY="")
    r = ak("secret", "set", "anth", "--host", "api.anthropic.com", "--header", "x-api-key",
           "--env", "ANTHROPIC_API_KEY", input=REAL_KEY.encode() + b"\n", env=env)
    assert r.returncode == 0, r.stderr
    r = ak("agents", "--json", env=env, timeout=180)
    auth = {a["id"]: a["auth"] for a in json.loads(r.stdout)}
    assert auth["claude"] == "secret:anth" and auth["opencode"] == "secret:anth", auth


@pytest.mark.parametrize("agent", ["opencode"])  # codex, gemini: real turns below
def test_other_agents_start_in_the_sandbox(agent: str, data_home: Path,
                                           project: Path) -> None:
    r = ak("run", "--agent", agent, "--", "--version", cwd=project, timeout=180,
           env=_env(data_home))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip(), r.stderr


def test_exit_code_passes_through(data_home: Path, project: Path) -> None:
    binary = AGENTS_HOME / "agents" / "claude" / "node_modules" / ".bin" / "claude"
    host = subprocess.run([str(binary), "--no-such-flag"], capture_output=True, timeout=60,
                          check=False)
    assert host.returncode != 0
    r = ak("run", "--agent", "claude", "--", "--no-such-flag", cwd=project, timeout=180,
           env=_env(data_home))
    assert r.returncode == host.returncode, (r.stdout, r.stderr)


def test_missing_install_is_refused(tmp_path: Path, project: Path) -> None:
    r = ak("run", "--agent", "codex", "--", "--version", cwd=project,
           env={"AGENTKERNEL_HOME": str(tmp_path / "empty"), "AGENTKERNEL_NO_DAEMON": "1"})
    assert r.returncode != 0
    assert "agentkernel agents install codex" in r.stderr, r.stderr
    r = ak("run", "--agent", "nosuch", cwd=project)
    assert "unknown agent 'nosuch'" in r.stderr, r.stderr



OPENAI_KEY = "sk-proj-test-" + secrets.token_hex(16)
GEMINI_KEY = "AIza-test-" + secrets.token_hex(16)


def _api_headers(api: FakeApi, header: str, path_part: str) -> set[str]:
    """Every value of `header` on the fake API's requests whose path holds `path_part`."""
    return {str(s["headers"].get(header)) for s in api.seen()  # type: ignore[union-attr]
            if path_part in str(s["path"])}


def test_codex_bearer_key_injected(fake_api: FakeApi, data_home: Path, project: Path) -> None:
    """The real Codex (`codex exec`, its default OpenAI provider) does a turn against the
    fake Responses API; the request carries `Authorization: Bearer <the real key>`, never
    the placeholder the sandbox holds. The key is in OPENAI_API_KEY, which `codex exec`
    does not read: the registry puts the placeholder in CODEX_API_KEY."""
    fake_api.log.unlink(missing_ok=True)
    r = ak("run", "--agent", "codex", *fake_api.add_hosts(), "--", "exec",
           "--skip-git-repo-check", "say hello", cwd=project, timeout=240,
           env=_env(data_home, fake_api, OPENAI_API_KEY=OPENAI_KEY))
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "fake-model-done" in r.stdout, (r.stdout, r.stderr)
    assert _api_headers(fake_api, "authorization", "/v1/responses") == {f"Bearer {OPENAI_KEY}"}, \
        fake_api.seen()


def test_gemini_goog_key_injected(fake_api: FakeApi, data_home: Path, project: Path) -> None:
    """The real Gemini CLI (`gemini -p`) does a turn against the fake Gemini API; every
    model request carries `x-goog-api-key: <the real key>`, never the placeholder."""
    fake_api.log.unlink(missing_ok=True)
    # -m: a named model skips the CLI's model router, whose JSON requests the fake does
    # not answer (it would retry them with back-off).
    r = ak("run", "--agent", "gemini", *fake_api.add_hosts(), "--", "-m", "gemini-2.5-flash",
           "-p", "say hello",
           cwd=project, timeout=240, env=_env(data_home, fake_api, GEMINI_API_KEY=GEMINI_KEY))
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "fake-model-done" in r.stdout, (r.stdout, r.stderr)
    assert _api_headers(fake_api, "x-goog-api-key", ":streamGenerateContent") == {GEMINI_KEY}
    assert _api_headers(fake_api, "x-goog-api-key", "/v1beta/") == {GEMINI_KEY}
