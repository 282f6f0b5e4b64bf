"""Issue 11's test list on a microVM (QEMU, TCG here): the script of
tests/test_egress_matrix.py — every client at an allowed and an unlisted host, the secret,
every bypass, the search for the value and the CA's key — in one guest boot. The guest's
root is the busybox base plus the host's python3 (requests, pip), curl, git and node
(tests/guest_tools.py), booted as an image rootfs: a `host` run's guest has busybox only."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import guest_tools
from sandbox_helpers import Upstream
from test_egress_matrix import judge, plan, run_matrix, spec_for, stage
from test_egress_matrix import upstream as upstream

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(os.geteuid() != 0, reason="the test upstream needs root")]


@pytest.fixture(scope="module")
def tools_root(microvm_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    lacking = guest_tools.missing()
    if lacking is not None:
        pytest.skip(f"the guest's tools need {lacking} on the host")
    return guest_tools.build(tmp_path_factory.mktemp("toolsroot"))


def test_every_client_and_bypass(tools_root: Path, project: Path,
                                 upstream: Upstream,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from agentkernel.backends.microvm import MicrovmBackend
    from agentkernel.rootfs import tree_rootfs

    stage(project, upstream)
    policy, env = plan(upstream)
    spec = spec_for(f"mx-vm-{os.getpid()}", policy, project,
                    tree_rootfs(tools_root, "pytest-tools"), "tools")
    seen, log = run_matrix(MicrovmBackend(), spec, env, upstream, monkeypatch, timeout=540)
    judge(seen, log, upstream)
    seen.pop("done")
    assert not seen, seen
