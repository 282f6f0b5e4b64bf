"""MicroVMs through the daemon: a `run` is served by a pre-booted VM from the warm pool."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from sandbox_helpers import ak


def test_run_is_served_from_a_pool_of_booted_vms(microvm_ready: None, tmp_path: Path) -> None:
    assert ak("daemon", "start").returncode == 0
    try:
        args = ("run", "-v", "-B", "microvm", "-p", "restrictive", "-i", "host", "--",
                "uname", "-r")
        first = ak(*args, cwd=tmp_path, timeout=180)
        assert first.returncode == 0, first.stderr
        assert first.stdout.strip() != platform.release()  # the guest's kernel
        # The first run in this directory was cold; the daemon now keeps a VM booted for it.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = json.loads(ak("daemon", "status", "--json").stdout)
            if any(p["backend"] == "microvm" and p["image"] == "host" and p["warm"]
                   and p["profile"] == "restrictive" and p.get("workspace") == str(tmp_path)
                   for p in status["pools"]):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"no warm microVM in the pool: {status['pools']}")
        second = ak(*args, cwd=tmp_path, timeout=180)
        assert second.returncode == 0, second.stderr
        assert second.stdout == first.stdout
        assert "via daemon (warm pool)" in second.stderr, (second.stderr, status["pools"])
    finally:
        ak("daemon", "stop")
