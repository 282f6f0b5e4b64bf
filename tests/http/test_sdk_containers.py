"""The official Python SDK's core scenarios (one-off runs, sandbox lifecycle and exec, files)
against a server whose sandboxes are docker or podman containers: the
same driver as test_sdk_python.py, the backend the only change."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from akhttp import API_KEY, HERE, Sdks, prefix, run_driver

from agentkernel.http.serve import RunningServer, start_in_thread

sys.path.insert(0, str(HERE.parent))  # tests/: the engines the suite starts
from engines import busybox_tar, dockerd, plain_dockerd, podman_ready

__all__ = ["busybox_tar", "dockerd", "plain_dockerd", "podman_ready"]  # (its fixtures)
SCENARIOS = ["run", "sandboxes", "files"]  # the core: one-off runs, lifecycle and exec, files
DRIVER = str(HERE / "drive_python_sdk.py")


@pytest.fixture(scope="module", params=["docker", "podman"])
def engine_server(request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Our real server over a SandboxManager whose backend is the engine `param`, with
    data and runtime dirs of its own (its podman service stopped at the end)."""
    from agentkernel.config import parse_config
    from agentkernel.daemon.manager import SandboxManager

    name: str = request.param
    if os.geteuid() != 0:
        pytest.skip("the suite's engines run as root")
    if name == "docker" and request.getfixturevalue("dockerd") == "root":
        pytest.skip("this machine's dockerd runs without userns-remap: refused")
    if name == "podman":
        request.getfixturevalue("podman_ready")
    base = tmp_path_factory.mktemp(f"ak-{name}")
    keys = ("AGENTKERNEL_HOME", "AGENTKERNEL_RUNTIME_DIR")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(AGENTKERNEL_HOME=str(base / "home"),
                      AGENTKERNEL_RUNTIME_DIR=str(base / "run"))
    config, _ = parse_config({"sandbox": {"backend": name}}, "tests/http")
    svc = SandboxManager(config)
    srv = start_in_thread(svc, "127.0.0.1", 0, api_key=API_KEY)
    try:
        yield srv
    finally:
        srv.stop()
        try:
            for info in svc.list_sandboxes():
                svc.remove(info.name)
        finally:
            svc.close()
            pidfile = Path(base / "run" / "podman.pid")
            if pidfile.exists():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pidfile.read_text()), signal.SIGTERM)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_official_python_sdk_on_containers(scenario: str, engine_server: RunningServer,
                                           sdks: Sdks) -> None:
    out = run_driver([str(sdks.python), "-I", DRIVER, scenario, prefix()], engine_server,
                     {"PYTHONSAFEPATH": "1"})
    assert f"ok {scenario}" in out
