"""What a one-shot `agentkernel run` (no daemon) loads into the CLI process: not the egress
proxy's asyncio, ssl and logging, which belong to the gate's own process, nor hashlib
(OpenSSL) for a run that talks to no registry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox_helpers import backend_available

LAUNCHER = Path(__file__).resolve().parents[1] / "bin" / "agentkernel"
# The gate's (egress_proxy's) imports: ~15 ms of a cold run when the CLI loaded them.
GATE_ONLY = {"asyncio", "ssl", "logging", "concurrent.futures", "agentkernel.egress_proxy"}
NO_REGISTRY = {"hashlib", "_hashlib", "base64"}  # images.registry is loaded, not used


def loaded_modules(stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines()
            if line.startswith("import time:")}


@pytest.mark.skipif(not backend_available("namespaces"), reason="needs bwrap")
def test_cold_run_with_a_gate_leaves_the_proxy_to_the_gate(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir(mode=0o700)
    env = {**os.environ, "AGENTKERNEL_HOME": str(tmp_path / "home"),
           "AGENTKERNEL_RUNTIME_DIR": str(tmp_path / "run"), "AGENTKERNEL_NO_DAEMON": "1"}
    # moderate: network through an egress gate, whose rules the CLI writes itself.
    out = subprocess.run([sys.executable, "-X", "importtime", str(LAUNCHER), "run", "-q",
                          "-i", "host", "-B", "namespaces", "-p", "moderate", "--",
                          "sh", "-c", "echo ran; exit 4"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 4, out.stderr[-2000:]
    assert out.stdout == "ran\n"
    loaded = loaded_modules(out.stderr)
    assert "agentkernel.egress_gate" in loaded  # the case this test is about: a gate ran
    assert not loaded & (GATE_ONLY | NO_REGISTRY), sorted(loaded & (GATE_ONLY | NO_REGISTRY))
