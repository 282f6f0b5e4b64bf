"""`run --agent` on each backend: the real Claude Code end to end on gVisor, as on
namespaces (tests/agents/test_run_agent.py); the microVM refused with its reason.

The fake model API and the checks are test_run_agent.py's; the command the fake model has
the Bash tool run also prints the kernel release it sees, which under gVisor is the
sentry's, not the host's: the agent, its tool and its key's placeholder are in gVisor.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_run_agent import _check_claude_run, _env, data_home, own_path_base  # noqa: F401

from conftest import AGENTS_HOME, API_HOSTS, REAL_KEY, FakeApi, bash_command
from sandbox_helpers import SYSTEM_PYTHON, ak, backend_available, make_upstream


@pytest.fixture(scope="module")
def kernel_api() -> Iterator[FakeApi]:
    """The fake model API, whose Bash tool call also prints `kernel=<uname -r>`."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("openssl") is None:
        pytest.skip("needs root, iproute2 and openssl")
    if not (AGENTS_HOME / "agents" / "claude").is_dir():
        pytest.skip("agent CLIs not installed (scripts/install-agents.sh)")
    with make_upstream(API_HOSTS, net="198.19", private=False) as up:
        log = up.dir / "seen.jsonl"
        up.serve(SYSTEM_PYTHON, str(Path(__file__).with_name("fake_model_api.py")),
                 str(up.dir / "srv.pem"), str(up.dir / "srv.key"), str(log),
                 bash_command(REAL_KEY) + "; echo kernel=$(uname -r)")
        yield FakeApi(up.addr, up.ca, log)


def test_claude_headless_on_gvisor(kernel_api: FakeApi, data_home: Path,  # noqa: F811
                                   own_path_base: Path) -> None:  # noqa: F811
    """The same turn as on namespaces: the real key reaches the fake API only, the sandbox
    holds the placeholder, an unlisted host is refused, the project is edited at its own
    path; the tool's command ran under gVisor's kernel."""
    if not backend_available("gvisor"):
        pytest.skip("gvisor backend not installed")
    project = own_path_base / "project"
    project.mkdir()
    r = ak("run", "--agent", "claude", "--backend", "gvisor", *kernel_api.add_hosts(), "--",
           "-p", "check the sandbox", "--dangerously-skip-permissions", cwd=project,
           timeout=240, env=_env(data_home, kernel_api, ANTHROPIC_API_KEY=REAL_KEY))
    _check_claude_run(r.stdout, r.stderr, r.returncode, kernel_api, pwd=project)
    report = [r for s in kernel_api.seen() for r in s["tool_result"]][-1]  # type: ignore[union-attr]
    kernel = next(line for line in report.splitlines() if line.startswith("kernel="))
    assert kernel != f"kernel={os.uname().release}", report  # gVisor's, not the host's
    marker = project / "agent-was-here"
    assert marker.read_text() == "edited\n"
    assert marker.stat().st_uid == os.getuid()


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
