"""Egress gates on demand (egress_forkserver.register): an idle sandbox has no gate
process, only listeners its fork server polls; its gate is forked at its first connection,
query or update and exits once idle. Every property of an always-on gate must hold across
those restarts.

Real namespaces sandboxes (root, as a daemon's: gates from the fork server) against the
egress-policy suite's test upstream, with gates that exit after 1 s idle. The attacker is
the code in a sandbox: it tries, after its gate exited, what an always-on gate refuses
(denied names, addresses no answer gave, a name whose answer is private, an allowed name
sent to another address), and it floods its own listeners to starve another sandbox's
first connection. The gate still runs as the sandbox range's nobody and holds nothing of
another sandbox's; the server holds listeners only, never a connection.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox_helpers import (
    Upstream,
    ak,
    backend_available,
    egress_gate_pid,
    gate_held,
    serving_gate,
    serving_upstream,
)
from test_containers import engine  # noqa: F401 - fixture
from test_egress_policy import PROBE, UPSTREAM_NAMES, hosts

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="gates drop ids only as root")

IDLE = "1"  # seconds before an idle gate exits


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with serving_upstream(UPSTREAM_NAMES) as up:
        yield up


@pytest.fixture(autouse=True)
def _on_demand(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from agentkernel import egress_forkserver

    monkeypatch.setenv("AGENTKERNEL_GATE_IDLE_SECONDS", IDLE)
    monkeypatch.delenv("AGENTKERNEL_GATE_FORKSERVER", raising=False)
    egress_forkserver.enable()
    yield


def _start(name: str, up: Upstream, *allow: str, backend: str = "namespaces") -> Any:
    from agentkernel.backends import get_backend
    from agentkernel.egress_policy import policy_for
    from agentkernel.profiles import get_profile
    from agentkernel.rootfs import host_rootfs
    from agentkernel.sandbox import SandboxSpec

    policy = policy_for("egress", None, allow, (),
                        tuple(h for h in hosts(up) if h != "--add-host"))
    spec = SandboxSpec(name=f"{name}-{os.getpid()}", profile=get_profile("moderate"),
                       rootfs=host_rootfs(), image="host", egress=policy)
    return get_backend(backend).start(spec)


@pytest.fixture
def box(upstream: Upstream) -> Iterator[Any]:
    sandbox = _start("idle", upstream, "allowed.test", "rebind.test")
    try:
        yield sandbox
    finally:
        sandbox.destroy()


def probe(sandbox: Any, todo: list[list[object]]) -> dict[str, str]:
    ex = sandbox.client.exec(["python3", "-c", PROBE, json.dumps(todo)],
                             env={"PATH": "/usr/bin:/bin"}, cwd="/")
    out, err, status = ex.wait(60)
    assert status.code == 0, err
    seen: dict[str, str] = json.loads(out)
    return seen


def gone_idle(sandbox: Any, timeout: float = 30.0) -> None:
    """Until the sandbox's gate has exited (idle): none left but its server's listeners."""
    deadline = time.monotonic() + timeout
    while egress_gate_pid(sandbox.scratch) is not None:
        assert time.monotonic() < deadline, "the idle gate did not exit"
        time.sleep(0.1)


def gate_of(sandbox: Any) -> int:
    pid = egress_gate_pid(sandbox.scratch)
    assert pid is not None, "no gate while the sandbox is served"
    return pid


def _server_pid() -> int:
    from agentkernel import egress_forkserver

    pid = egress_forkserver.server_pid()
    assert pid is not None
    return pid


def test_idle_sandbox_has_no_gate_and_its_policy_holds_across_restarts(
        box: Any, upstream: Upstream) -> None:
    """No gate before the first connection; after each idle exit, the next gate allows and
    refuses exactly as the first did (the always-on gate's attack list)."""
    from test_egress_policy import attacks, judge

    assert egress_gate_pid(box.scratch) is None
    ca = "/tmp/ca.pem"
    box.client.write_file(ca, upstream.ca.read_bytes())
    gates = []
    for _ in range(2):
        judge(probe(box, attacks(upstream, ca)))
        gates.append(gate_of(box))
        gone_idle(box)
    assert gates[0] != gates[1]


def test_pins_outlive_the_gate(box: Any, upstream: Upstream) -> None:
    """A client that resolved through one gate and connects through the next (a cached
    answer) gets through; an address no answer gave, a private answer's address and an
    allowed name sent to another address stay refused."""
    assert probe(box, [["r", "resolve", "allowed.test"]]) == {"r": f"resolved {upstream.addr}"}
    assert probe(box, [["r", "resolve", "rebind.test"]]) == {"r": "blocked gaierror"}
    gone_idle(box)
    seen = probe(box, [
        ["cached answer", "http", upstream.addr, 18080, "allowed.test"],
        ["never resolved", "http", upstream.addr2, 18080, "allowed.test"],
        ["rebind target", "raw", upstream.private, 18022],
        ["host mismatch", "http", upstream.addr, 18080, "denied.test"]])
    assert seen.pop("cached answer") == "reached hello host=allowed.test key=-", seen
    assert all(v.startswith("blocked") for v in seen.values()), seen
    gone_idle(box)
    # A third gate still has them (saved again when the second exited).
    assert probe(box, [["c", "http", upstream.addr, 18080, "allowed.test"]]) == {
        "c": "reached hello host=allowed.test key=-"}


def test_live_update_outlives_the_gate(box: Any) -> None:
    """`egress NAME allow` reaches an idle sandbox (its gate is forked for it) and holds
    after that gate exits; so does a later `deny`."""
    name = box.spec.name
    other = [["o", "http", "other.test", 18080, "other.test"]]
    assert probe(box, other) == {"o": "blocked gaierror"}
    gone_idle(box)
    r = ak("egress", name, "allow", "other.test")
    assert r.returncode == 0, r.stderr
    gone_idle(box)
    assert probe(box, other) == {"o": "reached hello host=other.test key=-"}
    gone_idle(box)
    assert probe(box, other) == {"o": "reached hello host=other.test key=-"}
    r = ak("egress", name, "deny", "other.test")
    assert r.returncode == 0, r.stderr
    gone_idle(box)
    assert probe(box, other) == {"o": "blocked gaierror"}
    log = ak("egress", name, "log").stdout
    assert "policy allow other.test" in log and "policy deny other.test" in log, log


def _status(pid: int, key: str) -> list[str]:
    m = re.search(rf"^{key}:\s+(.*)$", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert m, key
    return m[1].split()


def _sockets(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[len("socket:["):-1])
    return out


def test_on_demand_gate_is_confined_and_the_server_holds_listeners_only(
        upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two sandboxes: each gate is its range's nobody, with no capability and
    no_new_privs, and holds none of the other's sockets nor the server's; the server holds
    each sandbox's listeners, but no connection of theirs (it never accepts or reads)."""
    # Both gates are looked at after both probes: neither may exit idle in between (1 s
    # is less than a probe can take on a loaded machine). Still forked on demand.
    monkeypatch.setenv("AGENTKERNEL_GATE_IDLE_SECONDS", "600")
    a = _start("conf-a", upstream, "allowed.test")
    b = _start("conf-b", upstream, "allowed.test")
    try:
        for sandbox in (a, b):
            probe(sandbox, [["h", "http", "allowed.test", 18080, "allowed.test"]])
        gates = {sandbox.spec.name: gate_of(sandbox) for sandbox in (a, b)}
        uids = set()
        for pid in gates.values():
            ids = _status(pid, "Uid")
            assert len(set(ids)) == 1 and int(ids[0]) >= 65536, ids
            uids.add(ids[0])
            assert _status(pid, "CapEff") == ["0000000000000000"]
            assert _status(pid, "CapPrm") == ["0000000000000000"]
            assert _status(pid, "NoNewPrivs") == ["1"]
        assert len(uids) == 2  # each sandbox's own range
        server = _server_pid()
        server_socks = _sockets(server)
        ga, gb = (_sockets(p) for p in gates.values())
        # The listeners are shared by a gate and its server; nothing else of either.
        assert ga & gb == set()
        assert len(ga & server_socks) == 3 and len(gb & server_socks) == 3
        # Every TCP socket of the server's in a sandbox's namespace is a listener.
        for sandbox in (a, b):
            table = Path(f"/proc/{sandbox.process.pid}/net/tcp").read_text().splitlines()[1:]
            for line in table:
                fields = line.split()
                if fields[9] in server_socks:
                    assert fields[3] == "0A", line  # LISTEN
        # A gate's memory holds nothing of another sandbox's: no fd, and the config
        # (sealed memfd) is only its own.
        for pid in gates.values():
            memfds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")
                      if "memfd:" in os.readlink(f"/proc/{pid}/fd/{fd}")]
            assert all("ak-gate-state" in m for m in memfds), memfds
    finally:
        a.destroy()
        b.destroy()


FLOOD = r"""
import socket, sys, time
held = []
for i in range(int(sys.argv[2])):
    try:
        held.append(socket.create_connection((sys.argv[1], 18080), timeout=5))
    except OSError:
        pass
print("holding", len(held), flush=True)
time.sleep(120)
"""


def test_a_flooding_sandbox_does_not_starve_another(upstream: Upstream) -> None:
    """One sandbox holds hundreds of connections open and sends nothing; the server
    forked one gate for it (not one per connection), and another idle sandbox's first
    connection goes through."""
    a = _start("flood", upstream, "allowed.test")
    b = _start("quiet", upstream, "allowed.test")
    try:
        flood = a.client.exec(["python3", "-c", FLOOD, upstream.addr, "300"],
                              env={"PATH": "/usr/bin:/bin"}, cwd="/")
        deadline = time.monotonic() + 60
        while egress_gate_pid(a.scratch) is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        first = egress_gate_pid(a.scratch)
        assert egress_gate_pid(b.scratch) is None
        seen = probe(b, [["h", "http", "allowed.test", 18080, "allowed.test"]])
        assert seen == {"h": "reached hello host=allowed.test key=-"}
        assert egress_gate_pid(a.scratch) == first  # still that one gate
        flood.kill()
    finally:
        a.destroy()
        b.destroy()


def test_gates_come_back_after_their_starter_hung_up(box: Any, upstream: Upstream) -> None:
    """The daemon went away (its end of the server's socket closed): the server stays
    for the sandboxes it holds, and forks their gates as before; it exits with the last."""
    from agentkernel import egress_forkserver

    allowed = [["h", "http", "allowed.test", 18080, "allowed.test"]]
    server = _server_pid()
    egress_forkserver.shutdown()
    assert probe(box, allowed) == {"h": "reached hello host=allowed.test key=-"}
    gone_idle(box)
    assert probe(box, allowed) == {"h": "reached hello host=allowed.test key=-"}
    assert Path(f"/proc/{server}/comm").read_text().strip() == "ak-gate-forks"
    box.destroy()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{server}") and not _zombie(server):
        assert time.monotonic() < deadline, "the server outlived its last sandbox"
        time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return True


def test_gvisor_gate_on_demand(upstream: Upstream) -> None:
    """gVisor's gate listens in its router namespace: the same cycle there. Allowed by
    name, refused otherwise, before and after its gate exited; a pinned answer holds."""
    if not backend_available("gvisor"):
        pytest.skip("gvisor backend not installed")
    sandbox = _start("idle-gv", upstream, "allowed.test", backend="gvisor")
    try:
        assert egress_gate_pid(sandbox.scratch) is None
        todo = [["h", "http", "allowed.test", 18080, "allowed.test"],
                ["d", "resolve", "denied.test"]]
        expect = {"h": "reached hello host=allowed.test key=-", "d": "blocked gaierror"}
        assert probe(sandbox, todo) == expect
        gone_idle(sandbox)
        seen = probe(sandbox, [["c", "http", upstream.addr, 18080, "allowed.test"],
                               ["n", "http", upstream.addr2, 18080, "allowed.test"]])
        assert seen["c"] == "reached hello host=allowed.test key=-", seen
        assert seen["n"].startswith("blocked"), seen
        gone_idle(sandbox)
        assert probe(sandbox, todo) == expect
    finally:
        sandbox.destroy()


SECRET_VALUE = "sk-idle-" + os.urandom(12).hex()
FETCH = r"""
import os, sys, urllib.request
url = sys.argv[1]
r = urllib.request.Request(url, headers={"x-api-key": os.environ["SECRET_KEY"]})
try:
    print(urllib.request.urlopen(r, timeout=10).read().decode().strip())
except OSError as e:
    print("refused", type(e).__name__)
"""


def test_secret_injection_across_gate_restarts(upstream: Upstream,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """With a secret: each gate forked for the sandbox terminates its TLS with the
    sandbox's CA (the leaf's key in a sealed memfd, gone from disk) and puts the value in;
    the placeholder in clear text stays refused; the value is nowhere in the sandbox."""
    from agentkernel.egress_gate import LEAF_NAME
    from agentkernel.egress_policy import Grant
    from agentkernel.secrets_store import placeholder

    r = ak("secret", "set", "idlekey", "--host", "secret.test", "--header", "x-api-key",
           "--env", "SECRET_KEY", input=SECRET_VALUE.encode() + b"\n")
    assert r.returncode == 0, r.stderr
    monkeypatch.setenv("AGENTKERNEL_EGRESS_UPSTREAM_CA", str(upstream.ca))
    from agentkernel.backends import get_backend
    from agentkernel.egress_policy import policy_for
    from agentkernel.profiles import get_profile
    from agentkernel.rootfs import host_rootfs
    from agentkernel.sandbox import SandboxSpec

    names = (*(h for h in hosts(upstream) if h != "--add-host"), f"secret.test:{upstream.addr}")
    grant = Grant("idlekey", ("secret.test",), "x-api-key", placeholder())
    policy = policy_for("egress", None, ("secret.test", "other.test"), (), names)
    spec = SandboxSpec(name=f"idle-secret-{os.getpid()}", profile=get_profile("moderate"),
                       rootfs=host_rootfs(), image="host",
                       egress=policy._replace(secrets=(grant,)))
    sandbox = get_backend("namespaces").start(spec)
    env = {"PATH": "/usr/bin:/bin", "SECRET_KEY": grant.placeholder,
           "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt"}

    def fetch(url: str) -> str:
        out, err, status = sandbox.client.exec(["python3", "-c", FETCH, url], env=env,
                                               cwd="/").wait(60)
        assert status.code == 0, err
        return out.decode().strip()

    try:
        assert not (sandbox.scratch / LEAF_NAME).exists()
        expected = f"hello host=secret.test:18443 key={SECRET_VALUE}"
        for _ in range(2):
            assert fetch("https://secret.test:18443/") == expected
            assert fetch("http://other.test:18080/").startswith("refused")
            gone_idle(sandbox)
        out, _err, _st = sandbox.client.exec(
            ["sh", "-c", "printf '%s%s\\n' \"$A\" \"$B\" | grep -rlF -f - /proc/[0-9]*/environ "
             "/proc/[0-9]*/cmdline /etc /tmp 2>/dev/null; true"],
            env={"PATH": "/usr/bin:/bin", "A": SECRET_VALUE[:8], "B": SECRET_VALUE[8:]},
            cwd="/").wait(60)
        assert out == b"", out
    finally:
        sandbox.destroy()


CONTAINER_SCRIPT = r"""
echo "@first $(busybox wget -q -O- http://allowed.test:18080/ 2>/dev/null || echo refused)"
sleep 3
echo "@again $(busybox wget -q -O- http://allowed.test:18080/ 2>/dev/null || echo refused)"
echo "@denied $(busybox wget -q -O- http://denied.test:18080/ 2>/dev/null || echo refused)"
echo "@direct $(busybox nc -w 3 ADDR2 18022 </dev/null 2>&1 | busybox head -c 100)"
"""


def test_container_gate_on_demand(engine: str, upstream: Upstream,  # noqa: F811
                                  tmp_path: Path) -> None:
    """A container's gate on demand (a one-shot run told to use the fork server, idle
    after 1 s): allowed before and after its first gate went idle, refused otherwise."""
    import test_containers
    from sandbox_helpers import marked

    r = ak("run", "-B", engine, "-i", test_containers.IMAGE, "--allow-host", "allowed.test",
           *hosts(upstream), "--", "sh", "-c", CONTAINER_SCRIPT.replace("ADDR2", upstream.addr2),
           cwd=tmp_path, timeout=180,
           env={"AGENTKERNEL_GATE_FORKSERVER": "1", "AGENTKERNEL_GATE_IDLE_SECONDS": "1"})
    assert r.returncode == 0, r.stderr
    seen = marked(r.stdout)
    hello = "hello host=allowed.test:18080 key=-"
    assert (seen["first"], seen["again"], seen["denied"]) == (hello, hello, "refused"), seen
    assert "SSH" not in seen["direct"], seen


# Run by the sandbox's user: runs the probe (argv[1]) on an allowed and a denied name.
USER_PROBE_PREFIX = r"""
import json, os, subprocess, sys, time
probe = sys.argv[1]
def run(todo):
    out = subprocess.run([sys.executable, "-c", probe, json.dumps(todo)], capture_output=True,
                         text=True, timeout=60).stdout
    return json.loads(out)
todo = [["h", "http", "allowed.test", 18080, "allowed.test"], ["d", "resolve", "denied.test"]]
first = run(todo)
"""
USER_SCRIPT = USER_PROBE_PREFIX + r"""
time.sleep(3)
print(json.dumps([first, run(todo)]))
"""


def test_on_demand_as_an_ordinary_user(upstream: Upstream) -> None:
    """Started by an ordinary user (host `nobody`, a one-shot run told to use the fork
    server, idle after 1 s): the wiring child joins the sandbox's user namespace holding
    nothing else, the gate runs as that user, and it allows and refuses alike before and
    after its first gate went idle."""
    import subprocess

    from sandbox_helpers import ak_as_user, nobody_home

    with nobody_home() as home:
        proc = ak_as_user(65534, home, "run", "-B", "namespaces", "-i", "host",
                          "--allow-host", "allowed.test", *hosts(upstream), "--", "python3",
                          "-c", USER_SCRIPT, PROBE, cwd=home / "project",
                          env={"AGENTKERNEL_GATE_FORKSERVER": "1",
                               "AGENTKERNEL_GATE_IDLE_SECONDS": "1"})
        try:
            out, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert proc.returncode == 0, err
        expect = {"h": "reached hello host=allowed.test key=-", "d": "blocked gaierror"}
        assert json.loads(out) == [expect, expect], (out, err)


def test_a_killed_daemons_sandbox_keeps_its_way_out(upstream: Upstream) -> None:
    """A daemon killed under a persistent sandbox whose gate then goes idle: its fork
    server stays for the sandbox, whose next connection gets a gate; a new daemon adopts
    the sandbox, takes it from that server (which then exits: tests/test_egress_takeover.py)
    and its `egress allow` reaches the same gate path."""
    import signal

    idle = {"AGENTKERNEL_GATE_IDLE_SECONDS": IDLE}
    ak("daemon", "stop")
    assert ak("daemon", "start", env=idle).returncode == 0
    name = f"idle-d-{os.getpid()}"
    r = ak("create", name, "-B", "namespaces", "-i", "host", "--allow-host", "allowed.test",
           *hosts(upstream), env=idle)
    assert r.returncode == 0, r.stderr
    todo = [["h", "http", "allowed.test", 18080, "allowed.test"],
            ["o", "http", "other.test", 18080, "other.test"]]

    def seen() -> dict[str, str]:
        r = ak("exec", name, "--", "python3", "-c", PROBE, json.dumps(todo), env=idle)
        assert r.returncode == 0, r.stderr
        return dict(json.loads(r.stdout))

    from agentkernel.paths import runtime_dir

    hello = "reached hello host=allowed.test key=-"
    servers: set[int] = set()
    try:
        assert seen() == {"h": hello, "o": "blocked gaierror"}
        servers = _servers_holding(name)
        assert len(servers) == 1, servers
        status = ak("daemon", "status", "--json")
        daemon = int(json.loads(status.stdout)["pid"])
        os.kill(daemon, signal.SIGKILL)
        deadline = time.monotonic() + 30  # its gate idles out meanwhile
        while egress_gate_pid(runtime_dir() / "sandboxes" / name) is not None:
            assert time.monotonic() < deadline, "the idle gate did not exit"
            time.sleep(0.1)
        assert _servers_holding(name) == servers
        assert ak("daemon", "start", env=idle).returncode == 0
        assert seen() == {"h": hello, "o": "blocked gaierror"}
        assert ak("egress", name, "allow", "other.test").returncode == 0
        assert seen() == {"h": hello, "o": "reached hello host=other.test key=-"}
    finally:
        ak("rm", name)
        ak("daemon", "stop")
    deadline = time.monotonic() + 10
    while not all(_zombie(p) for p in servers):
        assert time.monotonic() < deadline, "the old server outlived its hand-off"
        time.sleep(0.05)


def _servers_holding(name: str) -> set[int]:
    """Fork servers holding sandbox `name`'s log."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if Path(f"/proc/{entry}/comm").read_text().strip() != "ak-gate-forks":
                continue
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}").endswith(f"/{name}/egress.log"):
                    out.add(int(entry))
        except OSError:
            continue
    return out


def _new_server(old: int, timeout: float = 20.0) -> int:
    """Until this process's fork server is another than `old` (its watcher replaced it)."""
    from agentkernel import egress_forkserver

    deadline = time.monotonic() + timeout
    while True:
        pid = egress_forkserver.server_pid()
        if pid is not None and pid != old and Path(f"/proc/{pid}").exists():
            return pid
        assert time.monotonic() < deadline, "no new fork server took the sandbox"
        time.sleep(0.05)


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])


def test_a_killed_fork_server_is_replaced_and_its_sandboxes_keep_their_policy(
        box: Any, upstream: Upstream) -> None:
    """The fork server is killed (SIGKILL: the OOM killer, an admin) while the sandbox's
    gate is idle: its starter sees it die and registers the sandbox with a new one (the
    same listeners, config and state); allowed hosts are reached, denied ones refused, a
    live `egress allow` and a DNS pin made before the kill still hold."""
    import signal

    hello = "reached hello host=allowed.test key=-"
    assert probe(box, [["r", "resolve", "allowed.test"]]) == {"r": f"resolved {upstream.addr}"}
    assert ak("egress", box.spec.name, "allow", "other.test").returncode == 0
    gone_idle(box)
    old = _server_pid()
    os.kill(old, signal.SIGKILL)
    new = _new_server(old)
    seen = probe(box, [
        ["h", "http", "allowed.test", 18080, "allowed.test"],
        ["o", "http", "other.test", 18080, "other.test"],
        ["cached answer", "http", upstream.addr, 18080, "allowed.test"],
        ["never resolved", "http", upstream.addr2, 18080, "allowed.test"],
        ["d", "resolve", "denied.test"]])
    assert seen == {"h": hello, "o": "reached hello host=other.test key=-",
                    "cached answer": hello, "never resolved": seen["never resolved"],
                    "d": "blocked gaierror"}, seen
    assert seen["never resolved"].startswith("blocked"), seen
    with gate_held(box):  # (the probe's gate may exit idle: then the one serving this)
        assert _parent(serving_gate(box.scratch)) == new
    gone_idle(box)
    assert probe(box, [["h", "http", "allowed.test", 18080, "allowed.test"]]) == {"h": hello}


def test_a_gate_serving_when_its_server_died_is_not_doubled(
        box: Any, upstream: Upstream) -> None:
    """The server is killed while the sandbox's gate serves: that gate (now nobody's
    child) keeps serving, the new server forks none beside it, and once it went idle the
    new server forks the next one."""
    import signal

    hello = {"h": "reached hello host=allowed.test key=-"}
    allowed = [["h", "http", "allowed.test", 18080, "allowed.test"]]
    assert probe(box, allowed) == hello
    # A connection held through the gate from before the kill until after the next probe:
    # once the new server adopts the orphan, only that keeps it from exiting idle (1 s)
    # before the probe reaches it; a new server that forked beside it would show.
    log = str(box.scratch / "egress.log")
    with gate_held(box):
        orphan = serving_gate(box.scratch)
        old = _server_pid()
        os.kill(old, signal.SIGKILL)
        new = _new_server(old)
        assert probe(box, allowed) == hello
        assert _holding("ak-egress-gate", log) == {orphan}  # none of the new server's beside
    gone_idle(box)
    assert probe(box, allowed) == hello
    with gate_held(box):
        assert _parent(serving_gate(box.scratch)) == new


def test_gate_errors_stop_at_the_cap(tmp_path: Path) -> None:
    """egress-gate.err, appended to by every gate of a sandbox (each one's warnings and
    traceback): gates failing over and over write no more once it holds ERR_CAP bytes."""
    import subprocess
    import sys

    from agentkernel.egress_child import ERR_CAP

    err = tmp_path / "egress-gate.err"
    noisy = ("import sys; from agentkernel.egress_child import _bound_stderr; _bound_stderr()\n"
             "for _ in range(700): sys.stderr.write('w' * 1000)\n"
             "raise RuntimeError('boom')")
    for _ in range(2):  # two gates, one after another, on the same file
        fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            subprocess.run([sys.executable, "-c", noisy], stderr=fd, check=False, timeout=60)
        finally:
            os.close(fd)
    assert err.stat().st_size == ERR_CAP


def test_a_daemons_sandbox_outlives_its_killed_fork_server(upstream: Upstream) -> None:
    """The daemon's fork server is killed (SIGKILL) while a persistent sandbox's gate is
    idle: the daemon registers the sandbox with a new server; it reaches allowed hosts,
    its live `egress allow` holds, denied names stay refused."""
    import signal

    idle = {"AGENTKERNEL_GATE_IDLE_SECONDS": IDLE}
    ak("daemon", "stop")
    assert ak("daemon", "start", env=idle).returncode == 0
    name = f"idle-k-{os.getpid()}"
    r = ak("create", name, "-B", "namespaces", "-i", "host", "--allow-host", "allowed.test",
           *hosts(upstream), env=idle)
    assert r.returncode == 0, r.stderr
    todo = [["h", "http", "allowed.test", 18080, "allowed.test"],
            ["o", "http", "other.test", 18080, "other.test"],
            ["d", "resolve", "denied.test"]]

    def seen() -> dict[str, str]:
        r = ak("exec", name, "--", "python3", "-c", PROBE, json.dumps(todo), env=idle)
        assert r.returncode == 0, r.stderr
        return dict(json.loads(r.stdout))

    from agentkernel.paths import runtime_dir

    scratch = runtime_dir() / "sandboxes" / name
    hello = "reached hello host=allowed.test key=-"
    try:
        assert ak("egress", name, "allow", "other.test").returncode == 0
        assert seen() == {"h": hello, "o": "reached hello host=other.test key=-",
                          "d": "blocked gaierror"}
        deadline = time.monotonic() + 30
        while egress_gate_pid(scratch) is not None:  # its gate idles out
            assert time.monotonic() < deadline, "the idle gate did not exit"
            time.sleep(0.1)
        (server,) = _servers_holding(name)
        os.kill(server, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while not (_servers_holding(name) - {server}):
            assert time.monotonic() < deadline, "no new server took the sandbox"
            time.sleep(0.05)
        assert seen() == {"h": hello, "o": "reached hello host=other.test key=-",
                          "d": "blocked gaierror"}
    finally:
        ak("rm", name)
        ak("daemon", "stop")


USER_KILL_SCRIPT = USER_PROBE_PREFIX + r"""
print("ready", flush=True)
deadline = time.time() + 60
while not os.path.exists("/tmp/ak-go") and time.time() < deadline:
    time.sleep(0.1)
print(json.dumps([first, run(todo)]), flush=True)
"""


def _holding(comm: str, prefix: str) -> set[int]:
    """Processes named `comm` with an fd open under `prefix`."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if Path(f"/proc/{entry}/comm").read_text().strip() != comm or _zombie(int(entry)):
                continue
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}").startswith(prefix):
                    out.add(int(entry))
                    break
        except OSError:
            continue
    return out


def test_an_ordinary_users_sandbox_outlives_its_killed_fork_server(
        upstream: Upstream) -> None:
    """As host `nobody` (a one-shot run told to use the fork server): the server is killed
    while the sandbox's gate is idle; the run's process registers the sandbox with a new
    server, and the sandbox reaches the allowed host and is refused the denied one."""
    import signal

    from sandbox_helpers import ak_as_user, nobody_home

    with nobody_home() as home:
        proc = ak_as_user(65534, home, "run", "-B", "namespaces", "-i", "host",
                          "--allow-host", "allowed.test", *hosts(upstream), "--", "python3",
                          "-c", USER_KILL_SCRIPT, PROBE, cwd=home / "project", timeout=240,
                          env={"AGENTKERNEL_GATE_FORKSERVER": "1",
                               "AGENTKERNEL_GATE_IDLE_SECONDS": "1"})
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready", proc.stderr
            deadline = time.monotonic() + 30
            while _holding("ak-egress-gate", str(home)):
                assert time.monotonic() < deadline, "the idle gate did not exit"
                time.sleep(0.1)
            (server,) = _holding("ak-gate-forks", str(home))
            assert _status(server, "Uid")[0] == "65534"
            os.kill(server, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while not _holding("ak-gate-forks", str(home)) - {server}:
                assert time.monotonic() < deadline, "no new server took the sandbox"
                time.sleep(0.05)
            _go(USER_KILL_SCRIPT)
            out, err = proc.communicate(timeout=180)
        except BaseException:
            proc.kill()
            raise
        assert proc.returncode == 0, err
        expect = {"h": "reached hello host=allowed.test key=-", "d": "blocked gaierror"}
        assert json.loads(out) == [expect, expect], (out, err)


def _go(script: str) -> None:
    """/tmp/ak-go in the sandbox running `script` (through its process's root), made as
    its host user (root is no id of the sandbox's user namespace: it could make no file)."""
    import subprocess

    done = False
    for entry in os.listdir("/proc"):  # (every process of it: the same /tmp)
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            if argv[1:3] == [b"-c", script.encode()]:
                touch = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
                         "touch", f"/proc/{entry}/root/tmp/ak-go"]
                done = subprocess.run(touch, check=False).returncode == 0 or done
        except (OSError, IndexError):
            continue
    assert done, "the sandbox's script was not found"
