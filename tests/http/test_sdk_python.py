"""The official Python SDK (agentkernel-sdk 0.21.0, its own venv) against our real server;
the same driver then runs on our own client, which must behave the same."""

from __future__ import annotations

import sys

import pytest
from akhttp import HERE, Sdks, prefix, run_driver

from agentkernel.http.serve import RunningServer

SCENARIOS = ["health", "run", "stream", "sandboxes", "files", "detached", "snapshots",
             "sessions", "durable", "async_client", "network"]
DRIVER = str(HERE / "drive_python_sdk.py")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_official_python_sdk(scenario: str, server: RunningServer, sdks: Sdks) -> None:
    out = run_driver([str(sdks.python), "-I", DRIVER, scenario, prefix()], server,
                     {"PYTHONSAFEPATH": "1"})
    assert f"ok {scenario}" in out


def test_official_sdk_is_not_ours(sdks: Sdks) -> None:
    import subprocess

    where = subprocess.run([str(sdks.python), "-I", "-c",
                            "import agentkernel, importlib.metadata as m;"
                            "print(agentkernel.__file__, m.version('agentkernel-sdk'))"],
                           capture_output=True, text=True, check=True).stdout
    assert "sdk-venv" in where and "0.21.0" in where, where


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_our_client_same_scenarios(scenario: str, server: RunningServer) -> None:
    out = run_driver([sys.executable, DRIVER, scenario, prefix()], server)
    assert f"ok {scenario}" in out
