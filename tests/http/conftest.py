"""Fixtures of the HTTP API tests: a real server on 127.0.0.1 over real sandboxes, the SDKs."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from akhttp import API_KEY, NODE_SDK, ROOT, SDK_VENV, Sdks

from agentkernel.http.serve import RunningServer, start_in_thread


def make_service() -> object:
    """The daemon's real SandboxManager; the stand-in only when the manager is missing or
    AK_HTTP_TEST_SERVICE=standin asks for it."""
    try:
        manager = importlib.import_module("agentkernel.daemon.manager")
    except ImportError:
        manager = None
    wanted = os.environ.get("AK_HTTP_TEST_SERVICE", "manager")
    if wanted == "manager" and manager is not None and hasattr(manager, "SandboxManager"):
        # Sandboxes the SDKs create land on the namespaces backend: it can snapshot a
        # sandbox's filesystem (gVisor keeps it in memory) and it starts in milliseconds.
        from agentkernel.config import parse_config

        config, _ = parse_config({"sandbox": {"backend": "namespaces"}}, "tests/http")
        return manager.SandboxManager(config)
    from standin import StandInService

    return StandInService()


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    if shutil.which("bwrap") is None:
        pytest.skip("needs bubblewrap for real sandboxes")
    # The manager keeps its state under AGENTKERNEL_HOME: a private one, not the user's.
    home = tmp_path_factory.mktemp("ak-home")
    old = os.environ.get("AGENTKERNEL_HOME")
    os.environ["AGENTKERNEL_HOME"] = str(home)
    svc = make_service()
    yield svc
    try:
        for info in svc.list_sandboxes():  # type: ignore[attr-defined]
            svc.remove(info.name)  # type: ignore[attr-defined]
    finally:
        close = getattr(svc, "close", None)
        if callable(close):
            close()
        if old is None:
            os.environ.pop("AGENTKERNEL_HOME", None)
        else:
            os.environ["AGENTKERNEL_HOME"] = old


@pytest.fixture(scope="session")
def server(service: object) -> Iterator[RunningServer]:
    srv = start_in_thread(service, "127.0.0.1", 0, api_key=API_KEY)  # type: ignore[arg-type]
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
