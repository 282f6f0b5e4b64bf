"""The egress gate's relay under a sandbox that misbehaves: bounded buffers with
back-pressure, half-closes carried, bytes counted in the log.

Real namespaces sandboxes (root) against the egress-policy suite's test upstream, through
both kinds of gate: forked by the fork server (a daemon's: uvloop's event loop) and a
fresh interpreter (a one-shot run's: asyncio's). The attacker is the code in the sandbox:
it asks for 100 MiB and stops reading, which must slow its own connection, not grow the
gate's memory (the gate holds at most a read and a write buffer per direction).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox_helpers import SYSTEM_PYTHON, Upstream, egress_gate_pid, make_upstream
from test_egress_policy import UPSTREAM_NAMES, hosts

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (test upstream)")

BIG = 100 * 1024 * 1024  # the upstream's /big body
GROWTH_CAP = 32 * 1024 * 1024  # what a gate may add while its reader stalls (100 MiB come)

# In the sandbox: one small request (the gate is up, its memory settles), then /big read
# 64 KiB, 3 s of nothing while the upstream could send everything, then the rest; a
# request sent with a half-close after it. Prints what it got.
CLIENT = r"""
import json, socket, time
def get(path, half_close=False, stall=0.0):
    s = socket.create_connection(("allowed.test", 18080), timeout=30)
    s.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n")
    if half_close:
        s.shutdown(socket.SHUT_WR)
    data = s.recv(65536)
    got = len(data)
    head = data.split(b"\r\n\r\n", 1)
    time.sleep(stall)
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        got += len(chunk)
    s.close()
    return got - len(head[0]) - 4, head[0].split(b"\r\n")[0].decode()
small = get(b"/")
time.sleep(1.5)
big = get(b"/big", stall=3.0)
half = get(b"/", half_close=True)
print(json.dumps({"small": small, "big": big, "half": half}))
"""


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    if shutil.which("ip") is None or shutil.which("openssl") is None:
        pytest.skip("needs iproute2 and openssl")
    with make_upstream(UPSTREAM_NAMES) as up:
        up.serve(SYSTEM_PYTHON, str(Path(__file__).with_name("egress_upstream.py")),
                 str(up.dir / "srv.pem"), str(up.dir / "srv.key"))
        yield up


def _rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class _Watch(threading.Thread):
    """The sandbox's gate's resident memory, sampled until stopped: least and most."""

    def __init__(self, scratch: Path) -> None:
        super().__init__(daemon=True)
        self.scratch = scratch
        self.seen: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            pid = egress_gate_pid(self.scratch)
            rss = _rss(pid) if pid is not None else None
            if rss is not None:
                self.seen.append(rss)
            time.sleep(0.05)


@pytest.mark.parametrize("kind", ["forked", "fresh"])
def test_stalled_reader_slows_its_connection_not_the_gate(
        kind: str, upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    from agentkernel import egress_forkserver
    from agentkernel.backends import get_backend
    from agentkernel.egress_gate import LOG_NAME
    from agentkernel.egress_policy import policy_for
    from agentkernel.profiles import get_profile
    from agentkernel.rootfs import host_rootfs
    from agentkernel.sandbox import SandboxSpec

    monkeypatch.setenv("AGENTKERNEL_GATE_FORKSERVER", "1" if kind == "forked" else "0")
    if kind == "forked":
        egress_forkserver.enable()
    policy = policy_for("egress", None, ("allowed.test",), (),
                        tuple(h for h in hosts(upstream) if h != "--add-host"))
    spec = SandboxSpec(name=f"relay-{kind}-{os.getpid()}", profile=get_profile("moderate"),
                       rootfs=host_rootfs(), image="host", egress=policy)
    sandbox: Any = get_backend("namespaces").start(spec)
    watch = _Watch(sandbox.scratch)
    try:
        watch.start()
        ex = sandbox.client.exec(["python3", "-c", CLIENT], env={"PATH": "/usr/bin:/bin"},
                                 cwd="/")
        out, err, status = ex.wait(300)
        watch.stop.set()
        watch.join()
        assert status.code == 0, err
        got = json.loads(out)
        log = [json.loads(line) for line in
               (sandbox.scratch / LOG_NAME).read_text().splitlines()]
    finally:
        watch.stop.set()
        sandbox.destroy()
    # Everything arrived once the reader read again: slowed, not cut.
    assert got["big"] == [BIG, "HTTP/1.1 200 OK"]
    assert got["small"][1] == got["half"][1] == "HTTP/1.1 200 OK"
    assert got["half"][0] == got["small"][0] > 0  # the half-closed request was answered
    assert watch.seen, "the gate was never seen"
    assert max(watch.seen) - min(watch.seen) < GROWTH_CAP, \
        f"the gate grew by {(max(watch.seen) - min(watch.seen)) >> 20} MiB"
    closes = [e for e in log if e.get("kind") == "close" and e.get("port") == 18080]
    assert len(closes) == 3 and all(e["host"] == "allowed.test" for e in closes), log
    assert max(e["received"] for e in closes) > BIG  # counted: body and head
    allowed = [e for e in log if e.get("kind") == "http" and e.get("allowed")]
    assert len(allowed) == 3 and all(e["rule"] == "allow allowed.test" for e in allowed)


# In the sandbox: connections refused on their first bytes (a denied SNI, then a denied
# Host, to the allowed name's address), each as its upstream connect is still in flight.
REFUSED = r"""
import socket, ssl, sys
ctx = ssl.create_default_context()
for i in range(int(sys.argv[1])):
    s = socket.create_connection(("allowed.test", 18443 if i % 2 else 18080), timeout=10)
    try:
        if i % 2:
            ctx.wrap_socket(s, server_hostname="denied.test")
        else:
            s.sendall(b"GET / HTTP/1.1\r\nHost: denied.test\r\n\r\n")
            s.recv(100)
    except OSError:
        pass
    s.close()
print("done")
"""


def test_refused_connections_all_end(upstream: Upstream,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections refused while their upstream is being dialled each end (the gate
    counts none of them after): their gate still goes idle and exits, and a sandbox
    cannot use them to fill its gate's connection limit."""
    from agentkernel import egress_forkserver
    from agentkernel.backends import get_backend
    from agentkernel.egress_policy import policy_for
    from agentkernel.profiles import get_profile
    from agentkernel.rootfs import host_rootfs
    from agentkernel.sandbox import SandboxSpec

    monkeypatch.setenv("AGENTKERNEL_GATE_FORKSERVER", "1")
    monkeypatch.setenv("AGENTKERNEL_GATE_IDLE_SECONDS", "1")
    egress_forkserver.enable()
    policy = policy_for("egress", None, ("allowed.test",), (),
                        tuple(h for h in hosts(upstream) if h != "--add-host"))
    spec = SandboxSpec(name=f"refused-{os.getpid()}", profile=get_profile("moderate"),
                       rootfs=host_rootfs(), image="host", egress=policy)
    sandbox: Any = get_backend("namespaces").start(spec)
    try:
        ex = sandbox.client.exec(["python3", "-c", REFUSED, "100"],
                                 env={"PATH": "/usr/bin:/bin"}, cwd="/")
        out, err, status = ex.wait(120)
        assert status.code == 0 and out.strip() == b"done", err
        deadline = time.monotonic() + 60
        while egress_gate_pid(sandbox.scratch) is not None:
            assert time.monotonic() < deadline, "a refused connection kept its gate busy"
            time.sleep(0.1)
    finally:
        sandbox.destroy()
