"""The official Node SDK (npm agentkernel 0.18.1) against our real server, one scenario each."""

from __future__ import annotations

import shutil

import pytest
from akhttp import HERE, Sdks, prefix, run_driver

from agentkernel.http.serve import RunningServer

SCENARIOS = ["health", "run", "stream", "sandboxes", "files", "detached", "snapshots",
             "durable", "network"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_official_node_sdk(scenario: str, server: RunningServer, sdks: Sdks) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    out = run_driver([node, str(HERE / "drive_node_sdk.mjs"), scenario, prefix()], server,
                     {"AK_NODE_SDK": str(sdks.node_sdk)})
    assert f"ok {scenario}" in out
