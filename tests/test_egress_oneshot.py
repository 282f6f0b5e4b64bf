"""A one-shot run's egress gate on demand (no fork server: egress_forkserver._start_here):
no gate process until the sandbox first uses the network, then a fresh interpreter that is
as confined as a forked gate and holds nothing of the run's process but its own fds.

Real namespaces sandboxes started as a one-shot run's process starts them (this process,
with no fork server), against the egress-policy suite's test upstream. The attacker is the
code in the sandbox, and the gate it may take over with what it sends. The same path
through the CLI, as root and as host `nobody`, is test_egress_policy's allow-list tests
(a run without a daemon takes it by default).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox_helpers import (
    Upstream,
    egress_gate_pid,
    serving_upstream,
)
from test_egress_idle import _start, _status, probe
from test_egress_policy import UPSTREAM_NAMES, attacks, judge

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="gates drop ids only as root")


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with serving_upstream(UPSTREAM_NAMES) as up:
        yield up


@pytest.fixture(autouse=True)
def _one_shot(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as a one-shot run's: no fork server (none was ever enabled)."""
    from agentkernel import egress_forkserver

    monkeypatch.delenv("AGENTKERNEL_GATE_FORKSERVER", raising=False)
    monkeypatch.delenv("AGENTKERNEL_GATE_IDLE_SECONDS", raising=False)
    monkeypatch.setattr(egress_forkserver, "_enabled", False)


def _fds(pid: int) -> dict[int, str]:
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
    return out


def test_no_gate_until_used_then_confined_and_holding_only_its_own(
        upstream: Upstream) -> None:
    """No gate while the sandbox does not use the network; its first query starts one,
    which allows and refuses exactly as an always-on gate (the allow-list's attack list),
    runs as the range's nobody without capabilities and with no_new_privs, and holds no fd
    of the starting process's (the agent's channel, other files) nor of another sandbox's;
    it ends with its sandbox."""
    a = _start("oneshot-a", upstream, "allowed.test", "rebind.test")
    b = _start("oneshot-b", upstream, "allowed.test")
    try:
        _out, _err, status = a.client.exec(["true"]).wait(30)
        assert status.code == 0
        assert egress_gate_pid(a.scratch) is None  # a command without network: no gate
        ca = "/tmp/ca.pem"
        a.client.write_file(ca, upstream.ca.read_bytes())
        judge(probe(a, attacks(upstream, ca)))
        assert probe(b, [["h", "http", "allowed.test", 18080, "allowed.test"]]) == {
            "h": "reached hello host=allowed.test key=-"}
        gate = egress_gate_pid(a.scratch)
        assert gate is not None and gate != egress_gate_pid(b.scratch)
        deadline = time.monotonic() + 30
        while _status(gate, "Uid")[0] == "0":  # root only until its files are open
            assert time.monotonic() < deadline
            time.sleep(0.02)
        ids = _status(gate, "Uid")
        assert len(set(ids)) == 1 and int(ids[0]) >= 65536, ids
        assert _status(gate, "CapEff") == ["0000000000000000"]
        assert _status(gate, "NoNewPrivs") == ["1"]
        ours = set(_fds(os.getpid()).values())
        theirs = _fds(gate)
        other = {t for t in _fds(egress_gate_pid(b.scratch) or 0).values()
                 if t.startswith("socket:")}
        for fd, target in theirs.items():
            if target.startswith(("socket:", "pipe:", "anon_inode:", "/memfd:ak-gate-state")):
                assert target not in other, (fd, target)  # nothing of b's
                continue
            assert target in ("/dev/null", str(a.scratch / "egress.log"),
                              str(a.scratch / "egress-gate.err")) or \
                target.startswith(str(Path(os.environ["AGENTKERNEL_HOME"]) / "egress-audit" /
                                      f"{a.scratch.name}.jsonl")), \
                (fd, target)
        # No file of ours beyond what it was given (the agent's channel is a socket pair
        # or pipe of ours: none of our sockets or pipes is among the gate's).
        shared = {t for t in theirs.values() if t.startswith(("socket:", "pipe:"))} & ours
        assert shared == set(), shared
    finally:
        a.destroy()
        b.destroy()
    deadline = time.monotonic() + 10
    while egress_gate_pid(a.scratch) is not None or egress_gate_pid(b.scratch) is not None:
        assert time.monotonic() < deadline, "a gate outlived its sandbox"
        time.sleep(0.05)


def test_a_sandbox_that_ends_unused_leaves_nothing(upstream: Upstream) -> None:
    """A sandbox whose command never used the network: no gate ever ran, and this process
    holds none of its fds once it ended (its waiting thread let them go)."""
    import threading

    def waiting() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "ak-gate-on-demand"}

    before = waiting()  # (another test's sandbox still up would have its own)
    box: Any = _start("oneshot-idle", upstream, "allowed.test")
    scratch = box.scratch
    assert waiting() - before, "no thread waits for the sandbox's first use"
    box.destroy()
    deadline = time.monotonic() + 60
    while any(str(scratch) in t for t in _fds(os.getpid()).values()) or waiting() - before:
        assert time.monotonic() < deadline, "the sandbox's fds are still held"
        time.sleep(0.05)
    assert egress_gate_pid(scratch) is None
