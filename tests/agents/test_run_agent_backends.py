"""`run --agent` on each backend: the real Claude Code end to end on gVisor, as root and as
host user `nobody`, as on namespaces (tests/agents/test_run_agent.py), its Bash tool as
uid 1000 either way; the microVM and wasm refused with their reason. (A kept gVisor agent
sandbox: tests/agents/test_agent_sandbox.py.)

The fake model API and the checks are test_run_agent.py's; the command the fake model has
the Bash tool run also prints the kernel release it sees, which under gVisor is the
sentry's, not the host's: the agent, its tool and its key's placeholder are in gVisor.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_run_agent import _check_claude_run, _env, data_home, own_path_base  # noqa: F401

from conftest import AGENTS_HOME, REAL_KEY, FakeApi, bash_command, serving_fake_api
from sandbox_helpers import SYSTEM_PYTHON, ak, ak_as_user, backend_available

NOBODY = 65534


@pytest.fixture(scope="module")
def kernel_api() -> Iterator[FakeApi]:
    """The fake model API, whose Bash tool call also prints `kernel=<uname -r>`."""
    with serving_fake_api(bash_command(REAL_KEY) + "; echo kernel=$(uname -r)") as api:
        yield api


def test_claude_headless_on_gvisor(kernel_api: FakeApi, data_home: Path,  # noqa: F811
                                   own_path_base: Path) -> None:  # noqa: F811
    """The same turn as on namespaces: the real key reaches the fake API only, the sandbox
    holds the placeholder, an unlisted host is refused, the project is edited at its own
    path; the tool's command ran under gVisor's kernel."""
    if not backend_available("gvisor"):
        pytest.skip("gvisor backend not installed")
    project = own_path_base / "project"
    project.mkdir()
    kernel_api.log.unlink(missing_ok=True)
    r = ak("run", "-v", "--agent", "claude", "--backend", "gvisor", *kernel_api.add_hosts(), "--",
           "-p", "check the sandbox", "--dangerously-skip-permissions", cwd=project,
           timeout=240, env=_env(data_home, kernel_api, ANTHROPIC_API_KEY=REAL_KEY))
    _check_gvisor_run(r.stdout, r.stderr, r.returncode, kernel_api, project, os.getuid())
    assert "agent user: uid 1000, gid 1000, HOME /home/agent" in r.stderr, r.stderr


def _check_gvisor_run(out: str, err: str, code: int, api: FakeApi, project: Path,
                      uid: int) -> None:
    """`uid`: the project's marker's owner on the host (the caller); the agent is uid 1000
    inside whoever started it (rootless runsc: through a user namespace of the agent's)."""
    _check_claude_run(out, err, code, api, pwd=project, uid=1000)
    report = [r for s in api.seen() for r in s["tool_result"]][-1]  # type: ignore[union-attr]
    kernel = next(line for line in report.splitlines() if line.startswith("kernel="))
    assert kernel != f"kernel={os.uname().release}", report  # gVisor's, not the host's
    marker = project / "agent-was-here"
    assert marker.read_text() == "edited\n"
    assert marker.stat().st_uid == uid


def test_claude_on_gvisor_as_an_ordinary_user(kernel_api: FakeApi,
                                              own_path_base: Path) -> None:  # noqa: F811
    """The same as host user `nobody` (rootless runsc, its gate as that user): the agent is
    uid 1000 there too, and its marker in the project is nobody's on the host."""
    if not backend_available("gvisor"):
        pytest.skip("gvisor backend not installed")
    if shutil.which("setpriv") is None or not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip("needs setpriv and the system's python3")
    home = own_path_base / "nobody"
    for sub in ("", "project", "data", "data/agents"):
        (home / sub).mkdir()
    # Hard links, not a symlink: CI's checkout sits in a 0700 dir nobody cannot cross.
    subprocess.run(["cp", "-al", str(AGENTS_HOME / "agents" / "claude"),
                    str(home / "data" / "agents" / "claude")], check=True)
    for path in (home, home / "project", home / "data"):
        os.chown(path, NOBODY, NOBODY)
    kernel_api.log.unlink(missing_ok=True)
    proc = ak_as_user(NOBODY, home, "run", "-v", "--agent", "claude", "--backend", "gvisor",
                      *kernel_api.add_hosts(), "--", "-p", "check",
                      "--dangerously-skip-permissions", cwd=home / "project", timeout=240,
                      env={"ANTHROPIC_API_KEY": REAL_KEY, "AGENTKERNEL_NO_DAEMON": "1",
                           "AGENTKERNEL_EGRESS_UPSTREAM_CA": str(kernel_api.ca)})
    out, err = proc.communicate(timeout=260)
    _check_gvisor_run(out, err, proc.returncode, kernel_api, home / "project", NOBODY)
    assert "agent user: uid 1000, gid 1000, HOME /home/agent" in err, err


@pytest.mark.parametrize("backend", ["microvm", "wasm"])
def test_backends_without_agents_refuse_with_the_reason(backend: str, data_home: Path,  # noqa: F811
                                                        project: Path) -> None:
    """Refused before anything starts, saying why and which backends can."""
    if not (AGENTS_HOME / "agents" / "claude").is_dir():
        pytest.skip("agent CLIs not installed (scripts/install-agents.sh)")
    r = ak("run", "--agent", "claude", "--backend", backend, "--", "--version", cwd=project,
           env=_env(data_home))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"an agent cannot run on the {backend} backend" in r.stderr, r.stderr
    assert "use namespaces or gvisor" in r.stderr, r.stderr
    assert "Claude Code" not in r.stdout
    if backend == "microvm":
        assert "the agent's edits would never reach it" in r.stderr, r.stderr
