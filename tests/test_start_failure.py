"""A start that fails after bwrap is up leaves nothing running, persistent sandboxes
included (their init is in a session and pid namespace of its own and does not die with
its parent)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from agentkernel.errors import SandboxError
from sandbox_helpers import backend_available


def _holding(marker: str) -> list[int]:
    """Processes whose stderr is a file (or the memfd named for the sandbox: bwrap's
    stderr) whose path contains `marker`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker in os.readlink(f"/proc/{pid}/fd/2"):
                found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "one-shot"])
def test_failed_channel_leaves_no_sandbox(persistent: bool, monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    if not backend_available("namespaces"):
        pytest.skip("namespaces backend not installed")
    from agentkernel.backends import get_backend, namespaces
    from agentkernel.profiles import get_profile
    from agentkernel.rootfs import host_rootfs
    from agentkernel.sandbox import SandboxSpec

    name = f"failstart-{os.getpid()}-{int(persistent)}"
    seen: list[int] = []

    def failing_channel(spawned: Any, control: Any) -> Any:
        # Wait until the sandbox's own processes run, then fail as a lost channel would.
        deadline = time.monotonic() + 60  # (a sandbox start: seconds on a loaded machine)
        while not seen and time.monotonic() < deadline:
            seen.extend(p for p in _holding(name) if p != spawned.process.pid)
            time.sleep(0.01)
        raise SandboxError("the channel failed (test)")

    monkeypatch.setattr(namespaces, "open_channel", failing_channel)
    spec = SandboxSpec(name=name, profile=get_profile("restrictive"), rootfs=host_rootfs(),
                       image="host", persistent=persistent)
    with pytest.raises(SandboxError):
        get_backend("namespaces").start(spec)
    assert seen, "the sandbox's processes never appeared"
    left = [p for p in seen if _running(p)]
    assert not left, left


def _running(pid: int) -> bool:
    """Not gone: neither reaped (no /proc entry, also between two reads) nor a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
