"""Fixtures of the HTTP API tests: a real server on 127.0.0.1 over real sandboxes, the SDKs."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from akhttp import API_KEY, NODE_SDK, ROOT, SDK_VENV, Sdks

from agentkernel.config import parse_config
from agentkernel.daemon.manager import SandboxManager
from agentkernel.http.serve import RunningServer, start_in_thread


def make_service() -> SandboxManager:
    """The daemon's real SandboxManager. Sandboxes the SDKs create land on the namespaces
    backend: it can snapshot a sandbox's filesystem (gVisor keeps it in memory) and it
    starts in milliseconds."""
    config, _ = parse_config({"sandbox": {"backend": "namespaces"}}, "tests/http")
    return SandboxManager(config)


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxManager]:
    if shutil.which("bwrap") is None:
        pytest.skip("needs bubblewrap for real sandboxes")
    # The manager keeps its state under AGENTKERNEL_HOME: a private one, not the user's.
    home = tmp_path_factory.mktemp("ak-home")
    old = os.environ.get("AGENTKERNEL_HOME")
    os.environ["AGENTKERNEL_HOME"] = str(home)
    svc = make_service()
    yield svc
    try:
        for info in svc.list_sandboxes():
            svc.remove(info.name)
    finally:
        svc.close()
        if old is None:
            os.environ.pop("AGENTKERNEL_HOME", None)
        else:
            os.environ["AGENTKERNEL_HOME"] = old


@pytest.fixture(scope="session")
def server(service: SandboxManager) -> Iterator[RunningServer]:
    srv = start_in_thread(service, "127.0.0.1", 0, api_key=API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def sdks() -> Sdks:
    """Install the official SDKs (idempotent; scripts/test.sh runs this too)."""
    proc = subprocess.run([str(ROOT / "scripts" / "install-sdks.sh")], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(f"installing the official SDKs failed:\n{proc.stdout}\n{proc.stderr}")
    return Sdks(SDK_VENV / "bin" / "python", NODE_SDK)
