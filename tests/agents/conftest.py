"""Fixtures of the agent tests: a daemon in private dirs, the agent CLIs from npm, a HOME."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sandbox_helpers import SYSTEM_PYTHON, Result, ak, make_upstream

ROOT = Path(__file__).resolve().parents[2]
# scripts/test.sh fills this with `agentkernel agents install all` (AGENTKERNEL_HOME=it).
AGENTS_HOME = ROOT / ".cache" / "agents-home"
AGENTS = ("claude", "codex", "gemini", "opencode")

DAEMON_TOML = """
[daemon]
pool_min = 1
pool_max = 2
adhoc_min = 0
pools = [{image = "host", profile = "moderate", backend = "namespaces"}]
"""


def agent_bin_dir(agent: str) -> Path:
    return AGENTS_HOME / "agents" / agent / "node_modules" / ".bin"


def agents_path() -> str:
    """PATH with the four agent CLIs (from the cache) in front."""
    missing = [a for a in AGENTS if not (agent_bin_dir(a) / a).exists()]
    if missing:
        pytest.skip(f"agent CLIs not installed in {AGENTS_HOME} ({', '.join(missing)}); "
                    "scripts/test.sh installs them")
    dirs = [str(agent_bin_dir(a)) for a in AGENTS]
    return os.pathsep.join([*dirs, os.environ.get("PATH", "/usr/bin:/bin")])


@dataclass
class Env:
    """An isolated HOME and project, our executable, and the agents on PATH."""

    home: Path
    project: Path
    env: dict[str, str]

    def ak(self, *args: str, timeout: float = 120) -> Result:
        return ak(*args, cwd=self.project, env=self.env, timeout=timeout)


@pytest.fixture
def agent_env(tmp_path: Path) -> Env:
    home = tmp_path / "home"
    project = tmp_path / "project"
    home.mkdir()
    project.mkdir()
    env = {"HOME": str(home), "PATH": agents_path(), "NO_COLOR": "1",
           "AGENTKERNEL_EXE": str(ROOT / ".venv" / "bin" / "agentkernel"),
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1"}
    for key in ("ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_AUTH_TOKEN",
                "CODEX_API_KEY", "OPENAI_API_KEY", "CODEX_ACCESS_TOKEN", "GEMINI_API_KEY",
                "GOOGLE_API_KEY"):
        env[key] = ""
    return Env(home, project, env)


@dataclass
class Daemon:
    env: dict[str, str]

    def ak(self, *args: str, cwd: Path | None = None, timeout: float = 60) -> Result:
        return ak(*args, cwd=cwd, env=self.env, timeout=timeout)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    if shutil.which("bwrap") is None:
        pytest.skip("needs bubblewrap")
    root = tmp_path_factory.mktemp("akmcp")
    (root / "daemon.toml").write_text(DAEMON_TOML)
    (root / "run").mkdir(mode=0o700)
    env = {"AGENTKERNEL_HOME": str(root / "home"), "AGENTKERNEL_RUNTIME_DIR": str(root / "run"),
           "AGENTKERNEL_DAEMON_CONFIG": str(root / "daemon.toml")}
    d = Daemon(env)
    r = d.ak("daemon", "start")
    assert r.returncode == 0, r.stderr
    yield d
    listing = d.ak("list", "--json")
    if listing.returncode == 0:
        import json

        for row in json.loads(listing.stdout or "[]"):
            d.ak("remove", row["name"])
    d.ak("daemon", "stop")


PYTHON = sys.executable


# ------------------------------------------------- a fake model API behind the gate
# (tests/agents/fake_model_api.py, TLS from a test CA, in a network namespace of ours)

API_HOSTS = ("api.anthropic.com", "api.openai.com", "generativelanguage.googleapis.com")
REAL_KEY = "sk-ant-test-" + secrets.token_hex(16)


@dataclass
class FakeApi:
    addr: str
    ca: Path
    log: Path

    def seen(self) -> list[dict[str, object]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def add_hosts(self) -> list[str]:
        return [a for h in API_HOSTS for a in ("--add-host", f"{h}:{self.addr}")]


# What the fake model has the Bash tool run inside the sandbox. The real key is searched
# for in two halves joined only in grep's stdin, so the search does not find itself.
def bash_command(key: str) -> str:
    half = len(key) // 2
    return ("echo uid=$(id -u) host=$(hostname) key=$ANTHROPIC_API_KEY pwd=$(pwd); "
            "echo edited > ./agent-was-here; "  # the agent's cwd: the project, wherever shown
            f"printf '%s%s\\n' '{key[:half]}' '{key[half:]}' | grep -rlF -f - "
            "/proc/[0-9]*/environ /proc/[0-9]*/cmdline . /root /tmp /etc "
            "2>/dev/null | head -3 | sed 's/^/FOUND /'; "
            "curl -sS -m 5 https://example.org/ >/dev/null 2>&1 && echo other-reached "
            "|| echo other-refused")


@contextlib.contextmanager
def serving_fake_api(command: str) -> Iterator[FakeApi]:
    """The fake model API (fake_model_api.py) for the agents' API hosts, its Bash tool
    call running `command`; skips where root, the tools or the agent CLIs are missing."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("openssl") is None:
        pytest.skip("needs root, iproute2 and openssl")
    if not (AGENTS_HOME / "agents" / "claude").is_dir():
        pytest.skip("agent CLIs not installed (scripts/install-agents.sh)")
    with make_upstream(API_HOSTS, net="198.19", private=False) as up:
        log = up.dir / "seen.jsonl"
        up.serve(SYSTEM_PYTHON, str(Path(__file__).with_name("fake_model_api.py")),
                 str(up.dir / "srv.pem"), str(up.dir / "srv.key"), str(log), command)
        yield FakeApi(up.addr, up.ca, log)


@pytest.fixture(scope="module")
def fake_api() -> Iterator[FakeApi]:
    with serving_fake_api(bash_command(REAL_KEY)) as api:
        yield api
