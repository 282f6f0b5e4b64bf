"""A fresh gate answers the very first DNS query of its namespace, from the address the
query was sent to: the race a loaded host exposed (a UDP listener bound before its
namespace's loopback was up answered from another source address, which the rules'
REDIRECT did not map back, so the client dropped every answer and a resolver timed out).

Real network namespaces, real rules, real gates; both ways a gate is wired (by a child of
the fork server, as in the daemon, and by this process, as in a one-shot run), several
fresh namespaces each, and both rule sets (a namespaces sandbox's, a VMM's loopback_dns).
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="joins namespaces with setns")

RESOLVER = "192.0.2.53"  # anywhere: every DNS query is the gate's
ROUNDS = 3


@pytest.fixture(params=["0", "1", "1-always", "-oneshot"],
                ids=["own-wiring", "forkserver", "forkserver-always-on", "oneshot-on-demand"])
def wiring(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A gate of its own started with the sandbox (AGENTKERNEL_GATE_FORKSERVER=0), one
    forked on demand (a daemon's), one forked for the sandbox's whole life
    (AGENTKERNEL_GATE_IDLE_SECONDS=0), and a one-shot run's (no fork server: started by
    this process at the first query, a fresh interpreter)."""
    from agentkernel import egress_forkserver

    if request.param == "-oneshot":
        monkeypatch.delenv("AGENTKERNEL_GATE_FORKSERVER", raising=False)
        monkeypatch.setattr(egress_forkserver, "_enabled", False)  # a CLI process's state
    else:
        monkeypatch.setenv("AGENTKERNEL_GATE_FORKSERVER", request.param[0])
    if request.param.endswith("always"):
        monkeypatch.setenv("AGENTKERNEL_GATE_IDLE_SECONDS", "0")
    yield request.param
    egress_forkserver.shutdown()


def _query(name: str) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + labels + struct.pack(
        ">HH", 1, 1)


def _ask_inside(pid: int) -> tuple[bytes, tuple[str, int]] | str:
    """From a thread inside `pid`'s network namespace: one query, the answer and where it
    came from (or why none came)."""
    got: list[tuple[bytes, tuple[str, int]] | str] = []

    def work() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        try:
            if libc.setns(fd, 0x40000000) != 0:
                got.append(f"setns: {ctypes.get_errno()}")
                return
        finally:
            os.close(fd)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.sendto(_query("localhost"), (RESOLVER, 53))
            try:
                data, addr = sock.recvfrom(4096)
                got.append((data, addr))
            except TimeoutError:
                got.append("no answer within 5 s")

    thread = threading.Thread(target=work)  # setns moves this thread only
    thread.start()
    thread.join()
    return got[0]


@pytest.mark.parametrize("loopback_dns", [False, True], ids=["namespaces", "vmm"])
def test_first_query_of_fresh_gates_is_answered(wiring: str, loopback_dns: bool,
                                                tmp_path: Path) -> None:
    from agentkernel.egress_gate import GateStart
    from agentkernel.egress_policy import Policy
    from agentkernel.network import lifeline, netns_holder

    for i in range(ROUNDS):
        scratch = tmp_path / f"s{i}"
        scratch.mkdir()
        life_r, life_w = lifeline()
        gate = GateStart(scratch, exit_fd=life_r)
        holder = netns_holder(life_r)
        os.close(life_r)
        try:
            gate.attach(holder.pid, Policy(), loopback_dns=loopback_dns)
            gate.wait()
            got = _ask_inside(holder.pid)
            why = (got, (scratch / "egress-gate.err").read_text())
            assert not isinstance(got, str), why
            data, addr = got
            assert addr == (RESOLVER, 53), why  # mapped back: a resolver accepts it
            assert data[:2] == b"\x12\x34" and data[2] & 0x80, why  # our query's answer
        finally:
            os.close(life_w)  # the holder and the gate end with the lifeline
            holder.wait()
            if gate.gate is not None:
                gate.gate.wait(timeout=10)
            elif wiring == "-oneshot":  # started by us: it ends with the lifeline
                _gate_gone(scratch)
            else:  # on demand: its fork server lets go of it with the lifeline too
                _released(scratch)


def _gate_gone(scratch: Path) -> None:
    import time

    from sandbox_helpers import egress_gate_pid

    deadline = time.monotonic() + 10
    while egress_gate_pid(scratch) is not None:
        assert time.monotonic() < deadline, "the gate outlived its lifeline"
        time.sleep(0.05)


def _released(scratch: Path) -> None:
    """Until the fork server holds nothing of the sandbox's (it closed our lifeline's
    read end right after starting us: its own copy is what the server watches)."""
    import time

    from agentkernel import egress_forkserver

    pid = egress_forkserver.server_pid()
    assert pid is not None
    deadline = time.monotonic() + 10
    while True:
        held = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                held.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
        if not any(str(scratch) in t for t in held):
            return
        assert time.monotonic() < deadline, held
        time.sleep(0.05)


PROBE = """
import socket, struct
q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + b"\\x09localhost\\x00" + \\
    struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(q, ("10.0.2.3", 53))
try:
    data, addr = s.recvfrom(4096)
    print("answered", addr[0], addr[1], data[:2].hex())
except TimeoutError:
    print("no answer")
"""


def test_fresh_namespaces_sandboxes_first_query(wiring: str) -> None:
    """Fresh namespaces sandboxes (moderate) whose first command is a DNS query: each
    starts (the gate's wiring once raced bwrap's own loopback set-up, and bwrap failed),
    and the query is answered by the gate from the resolver's address."""
    from agentkernel.backends import get_backend
    from agentkernel.profiles import get_profile
    from agentkernel.rootfs import host_rootfs
    from agentkernel.sandbox import SandboxSpec

    for i in range(ROUNDS):
        spec = SandboxSpec(name=f"gate-first-{os.getpid()}-{wiring.strip('-')}-{i}",
                           profile=get_profile("moderate"), rootfs=host_rootfs(),
                           image="host")
        box = get_backend("namespaces").start(spec)
        try:
            out, err, _ = box.client.exec(["python3", "-c", PROBE]).wait(30)
            text = (out + err).decode(errors="replace")
            assert text.strip() == "answered 10.0.2.3 53 1234", text
        finally:
            box.destroy()
