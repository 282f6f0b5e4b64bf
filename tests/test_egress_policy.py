"""The egress policy: the gate is a sandbox's only way out, and it decides on names.

Real sandboxes (namespaces backend, as root and as host user `nobody`) against a test
upstream in a network namespace the suite creates (HTTP, HTTPS from a test CA, a banner
server, UDP echo), with names our resolver answers from --add-host. Each sandbox first
tries, as its root, to take its own network apart; then it tries to get past the policy:
direct addresses, SNI and Host that differ from the name resolved, a name whose answer is
a private address (rebinding), metadata, loopback, IPv6 and IPv4-mapped literals, UDP and
QUIC, DNS to another server.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engines import skip_for_ordinary_users
from sandbox_helpers import (
    SYSTEM_PYTHON,
    Upstream,
    ak,
    ak_as_user,
    egress_gate_pid,
    nobody_home,
    serving_upstream,
)

NOBODY = 65534

# Runs inside the sandbox: tear at the network as root, then each check of argv[1].
PROBE = r"""
import json, socket, ssl, struct, subprocess, sys
for argv in (["iptables", "-F"], ["iptables", "-t", "nat", "-F"], ["ip6tables", "-F"],
             ["ip", "route", "replace", "default", "dev", "akgw0"],
             ["ip", "link", "set", "eth0", "down"], ["ip", "link", "add", "x0", "type",
             "veth"], ["sysctl", "-w", "net.ipv4.ip_forward=1"]):
    try:
        subprocess.run(argv, capture_output=True, timeout=10)
    except OSError:
        pass
def http(sock, host):
    sock.sendall(b"GET / HTTP/1.1\r\nHost: " + host.encode() + b"\r\nConnection: close\r\n\r\n")
    data = b""
    while len(data) < 4096:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n\r\n", 1)[-1].decode().strip()
def check(kind, *a):
    if kind == "http":
        host, port, header = a
        return "reached " + http(socket.create_connection((host, port), timeout=5), header)
    if kind == "tls":
        host, port, sni, ca = a
        ctx = ssl.create_default_context(cafile=ca)
        ctx.check_hostname = False
        s = ctx.wrap_socket(socket.create_connection((host, port), timeout=5),
                            server_hostname=sni)
        return "reached " + http(s, sni)
    if kind == "raw":
        s = socket.create_connection((a[0], a[1]), timeout=5)
        return "reached " + s.recv(100).decode().strip()
    if kind == "resolve":
        return "resolved " + ",".join(sorted({i[4][0] for i in socket.getaddrinfo(a[0], 80)}))
    if kind == "udp":
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.settimeout(2)
        u.sendto(b"ping", (a[0], a[1]))
        return "reached " + u.recv(100).decode()
    if kind == "dns":
        server, name = a
        q = struct.pack(">HHHHHH", 0x4B1D, 0x0100, 1, 0, 0, 0)
        q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0\0\1\0\1"
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.settimeout(3)
        u.sendto(q, (server, 53))
        r = u.recv(512)
        return "rcode %d answers %d" % (r[3] & 15, struct.unpack(">H", r[6:8])[0])
out = {}
for label, kind, *args in json.loads(sys.argv[1]):
    try:
        out[label] = check(kind, *args)
    except (OSError, ssl.SSLError) as e:
        out[label] = "blocked " + type(e).__name__
print(json.dumps(out))
"""


UPSTREAM_NAMES = [f"{n}.test" for n in ("allowed", "other", "denied", "secret")]


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with serving_upstream(UPSTREAM_NAMES) as up:
        yield up


def hosts(up: Upstream) -> list[str]:
    return ["--add-host", f"allowed.test:{up.addr}", "--add-host", f"other.test:{up.addr}",
            "--add-host", f"denied.test:{up.addr}", "--add-host", f"rebind.test:{up.private}",
            "--add-host", "meta.test:169.254.169.254"]


def attacks(up: Upstream, ca: str) -> list[list[object]]:
    """[label, kind, args...] run against an allow-list of allowed.test and rebind.test."""
    return [
        ["http allowed", "http", "allowed.test", 18080, "allowed.test"],
        ["tls allowed, not 443", "tls", "allowed.test", 18443, "allowed.test", ca],
        ["raw allowed (server speaks first)", "raw", "allowed.test", 18022],
        ["resolve denied", "resolve", "denied.test"],
        ["resolve rebind", "resolve", "rebind.test"],
        ["resolve meta", "resolve", "meta.test"],
        ["dns to another server", "dns", "8.8.8.8", "denied.test"],
        ["direct ip never resolved", "raw", up.addr2, 18022],
        ["host mismatch", "http", "allowed.test", 18080, "denied.test"],
        ["host not resolved but public", "http", "allowed.test", 18080, "other.test"],
        ["sni mismatch", "tls", "allowed.test", 18443, "denied.test", ca],
        ["allowed sni, other ip", "tls", up.addr2, 18443, "allowed.test", ca],
        ["rebind target", "raw", up.private, 18022],
        ["metadata", "http", "169.254.169.254", 80, "allowed.test"],
        ["metadata alibaba", "http", "100.100.100.200", 80, "allowed.test"],
        ["loopback of the host via gateway", "raw", "10.0.2.2", 22],
        ["ipv6 loopback", "raw", "::1", 18022],
        # (the mapped form of allowed.test's own address is that address: a dual-stack
        # socket sends IPv4, which the gate sees as such)
        ["ipv4-mapped, never resolved", "raw", f"::ffff:{up.addr2}", 18022],
        ["ipv4-mapped private", "raw", f"::ffff:{up.private}", 18022],
        ["ipv4-mapped metadata", "raw", "::ffff:169.254.169.254", 80],
        ["ipv6 metadata", "raw", "fd00:ec2::254", 80],
        ["udp", "udp", up.addr, 18053],
        ["quic", "udp", up.addr, 443],
    ]


ALLOWED = {"http allowed", "tls allowed, not 443", "raw allowed (server speaks first)"}


def judge(seen: dict[str, str]) -> None:
    for label in ALLOWED:
        assert seen.pop(label).startswith("reached"), (label, seen)
    assert seen.pop("resolve denied") == "blocked gaierror", seen
    assert seen.pop("resolve rebind") == "blocked gaierror", seen
    assert seen.pop("resolve meta") == "blocked gaierror", seen
    assert seen.pop("dns to another server") == "rcode 3 answers 0", seen  # our NXDOMAIN
    reached = {k: v for k, v in seen.items() if not v.startswith("blocked")}
    assert not reached, reached


def test_allow_list_holds_as_root(backend: str, project: Path, upstream: Upstream) -> None:
    shutil.copy(upstream.ca, project / "ca.pem")
    todo = attacks(upstream, "/workspace/ca.pem")
    r = ak("run", "-B", backend, "-i", "host", "--allow-host", "allowed.test",
           "--allow-host", "rebind.test", *hosts(upstream), "--", "python3", "-c", PROBE,
           json.dumps(todo), cwd=project)
    assert r.returncode == 0, r.stderr
    judge(json.loads(r.stdout))
    # Refusals are told, with the rule that refused them.
    assert "denied.test REFUSED by default deny" in r.stderr, r.stderr


def test_allow_list_holds_as_an_ordinary_user(backend: str, upstream: Upstream) -> None:
    skip_for_ordinary_users(backend)
    with nobody_home({"ca.pem": upstream.ca}) as home:
        todo = attacks(upstream, "/workspace/ca.pem")
        proc = ak_as_user(NOBODY, home, "run", "-B", backend, "-i", "host",
                          "--allow-host", "allowed.test", "--allow-host", "rebind.test",
                          *hosts(upstream), "--", "python3", "-c", PROBE, json.dumps(todo),
                          cwd=home / "project")
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        judge(json.loads(out))


def test_default_reaches_public_only(backend: str, project: Path, upstream: Upstream) -> None:
    """moderate without lists: every public address and name, never the private set; a
    deny entry still refuses its name whatever address it is sent to."""
    todo = [["public by ip", "raw", upstream.addr2, 18022],
            ["public by name", "http", "allowed.test", 18080, "allowed.test"],
            ["denied name on a public ip", "http", upstream.addr2, 18080, "denied.test"],
            ["resolve denied", "resolve", "denied.test"],
            ["private", "raw", upstream.private, 18022],
            ["metadata", "raw", "169.254.169.254", 80],
            ["udp", "udp", upstream.addr, 18053]]
    r = ak("run", "-B", backend, "-i", "host", "--deny-host", "denied.test",
           *hosts(upstream), "--", "python3", "-c", PROBE, json.dumps(todo), cwd=project)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["public by ip"] == "reached SSH-2.0-upstream", seen
    assert seen["public by name"] == "reached hello host=allowed.test key=-", seen
    assert all(seen[k].startswith("blocked") for k in
               ("denied name on a public ip", "resolve denied", "private", "metadata", "udp")), seen


def test_tools_that_ignore_proxy_variables(project: Path, upstream: Upstream) -> None:
    """curl and git, which know nothing of us, go through by name and are refused by it."""
    shutil.copy(upstream.ca, project / "ca.pem")
    script = ("curl -sS --cacert /workspace/ca.pem https://allowed.test:18443/; "
              "curl -sS -m 5 http://denied.test:18080/ || echo curl-denied; "
              "curl -sS -m 5 --resolve denied.test:18443:" + upstream.addr +
              " --cacert /workspace/ca.pem https://denied.test:18443/ || echo curl-sni-denied")
    r = ak("run", "-B", "namespaces", "-i", "host", "--allow-host", "allowed.test",
           *hosts(upstream), "--", "sh", "-c", script, cwd=project)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["hello host=allowed.test:18443 key=-", "curl-denied",
                                     "curl-sni-denied"], (r.stdout, r.stderr)


def test_live_update_and_log(project: Path, upstream: Upstream) -> None:
    """`agentkernel egress NAME allow HOST` opens a running sandbox to HOST at once, and
    `egress log` tells what was tried, allowed or refused, by which rule."""
    from agentkernel.backends import get_backend
    from agentkernel.egress_policy import policy_for
    from agentkernel.profiles import get_profile
    from agentkernel.rootfs import host_rootfs
    from agentkernel.sandbox import SandboxSpec

    name = f"live-{os.getpid()}"
    policy = policy_for("egress", None, ("allowed.test",), (),
                        tuple(h for h in hosts(upstream) if h != "--add-host"))
    spec = SandboxSpec(name=name, profile=get_profile("moderate"), rootfs=host_rootfs(),
                       image="host", egress=policy)
    sandbox = get_backend("namespaces").start(spec)
    try:
        def fetch() -> str:
            ex = sandbox.client.exec(["python3", "-c", PROBE, json.dumps(
                [["other", "http", "other.test", 18080, "other.test"]])],
                env={"PATH": "/usr/bin:/bin"}, cwd="/")
            out = b"".join(p for k, p in ex.events() if k == "stdout" and isinstance(p, bytes))
            return str(json.loads(out)["other"])

        assert fetch() == "blocked gaierror"
        r = ak("egress", name, "allow", "other.test")
        assert r.returncode == 0, r.stderr
        assert fetch() == "reached hello host=other.test key=-"
        r = ak("egress", name, "deny", "other.test")
        assert r.returncode == 0, r.stderr
        assert fetch() == "blocked gaierror"
        log = ak("egress", name, "log")
        assert "dns other.test REFUSED by default deny" in log.stdout, log.stdout
        assert "http other.test:18080 allowed by allow other.test" in log.stdout, log.stdout
        assert "dns other.test REFUSED by deny other.test" in log.stdout, log.stdout
        # Another local user cannot reach the gate's control socket.
        sock = sandbox.scratch / "egress.sock"
        probe = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             SYSTEM_PYTHON, "-c", "import socket,sys; s=socket.socket(socket.AF_UNIX); "
             "s.connect(sys.argv[1])", str(sock)], capture_output=True, text=True, check=False)
        assert probe.returncode != 0 and "Permission denied" in probe.stderr
    finally:
        sandbox.destroy()


def test_the_gate_runs_unprivileged(project: Path) -> None:
    """Started by root, the gate process is the sandbox's own unprivileged `nobody`."""
    from agentkernel.backends import get_backend
    from agentkernel.profiles import get_profile
    from agentkernel.rootfs import host_rootfs
    from agentkernel.sandbox import SandboxSpec

    if os.geteuid() != 0:
        pytest.skip("needs root")
    spec = SandboxSpec(name=f"gate-{os.getpid()}", profile=get_profile("moderate"),
                       rootfs=host_rootfs(), image="host")
    sandbox = get_backend("namespaces").start(spec)
    try:
        # A query first: a daemon's gate is forked when its sandbox first needs it.
        query = "import socket\ntry: socket.getaddrinfo('gate.invalid', 80)\nexcept OSError: pass"
        sandbox.client.exec(["python3", "-c", query]).wait(timeout=30)
        gate = egress_gate_pid(sandbox.scratch)
        assert gate is not None
        deadline = time.monotonic() + 30  # the sandbox does not wait for the gate to serve
        while True:  # it runs as root only until its sockets and files are open
            status = Path(f"/proc/{gate}/status").read_text()
            uids = next(ln for ln in status.splitlines() if ln.startswith("Uid:")).split()[1:]
            if uids != ["0"] * 4 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        caps = next(line for line in status.splitlines() if line.startswith("CapEff:"))
        assert len(set(uids)) == 1 and int(uids[0]) >= 65536, uids
        assert caps.split()[1] == "0000000000000000"
    finally:
        sandbox.destroy()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))


# --- secrets ------------------------------------------------------------------------------

SECRET_VALUE = "sk-test-" + secrets.token_hex(12)

SECRET_SCRIPT = r"""
set -u
echo "env=$SECRET_KEY"
curl -sS https://secret.test:18443/ -H "x-api-key: $SECRET_KEY"
python3 -c '
import os, urllib.request
r = urllib.request.Request("https://secret.test:18443/",
                           headers={"x-api-key": os.environ["SECRET_KEY"]})
print("urllib", urllib.request.urlopen(r, timeout=10).read().decode().strip())'
node -e 'fetch("https://secret.test:18443/", {headers: {"x-api-key": process.env.SECRET_KEY}})
  .then(r => r.text())
  .then(t => console.log("node", t.trim()), e => console.log("node failed", e.cause || e))'
curl -sS -m 5 https://secret.test:18443/ -H "authorization: $SECRET_KEY" \
  || echo wrong-header-refused
curl -sS -m 5 http://secret.test:18080/ -H "x-api-key: $SECRET_KEY" || echo cleartext-refused
curl -sS -m 5 http://other.test:18080/ -H "x-api-key: $SECRET_KEY" || echo other-host-refused
curl -sS -m 5 --cacert /workspace/ca.pem https://other.test:18443/ -H "x-api-key: $SECRET_KEY"
printf '%s%s\n' "$REAL_A" "$REAL_B" | grep -rlF -f - /proc/[0-9]*/environ /proc/[0-9]*/cmdline \
    /etc /run /tmp /workspace /root 2>/dev/null | head -3
echo done
"""


def test_secret_never_enters_the_sandbox(backend: str, project: Path, upstream: Upstream,
                                         tmp_path: Path) -> None:
    """The sandbox sees a placeholder; secret.test gets the value, in its header only,
    whichever client sends it; a placeholder elsewhere is refused (clear text, another
    header) or reaches a host without secrets as the placeholder it is."""
    shutil.copy(upstream.ca, project / "ca.pem")
    r = ak("secret", "set", "skey", "--host", "secret.test", "--header", "x-api-key",
           "--env", "SECRET_KEY", input=SECRET_VALUE.encode() + b"\n")
    assert r.returncode == 0, r.stderr
    store = Path(os.environ["AGENTKERNEL_HOME"]) / "secrets" / "skey.json"
    assert store.stat().st_mode & 0o777 == 0o600
    assert SECRET_VALUE not in ak("secret", "list").stdout
    # The value in two halves, so that the grep for it does not find itself.
    r = ak("run", "-B", backend, "-i", "host", "--secret", "skey", "-e",
           f"REAL_A={SECRET_VALUE[:10]}", "-e", f"REAL_B={SECRET_VALUE[10:]}",
           "--add-host", f"secret.test:{upstream.addr}",
           *hosts(upstream), "--", "sh", "-c", SECRET_SCRIPT, cwd=project,
           env={"AGENTKERNEL_EGRESS_UPSTREAM_CA": str(upstream.ca)})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    placeholder = lines[0].removeprefix("env=")
    assert placeholder.startswith("ak-secret-") and SECRET_VALUE not in placeholder
    assert lines[1:] == [
        f"hello host=secret.test:18443 key={SECRET_VALUE}",
        f"urllib hello host=secret.test:18443 key={SECRET_VALUE}",
        f"node hello host=secret.test:18443 key={SECRET_VALUE}",
        "wrong-header-refused", "cleartext-refused", "other-host-refused",
        f"hello host=other.test:18443 key={placeholder}",
        "done"], (r.stdout, r.stderr)
    assert "outside its header 'x-api-key'" in r.stderr
    assert "placeholder of secret skey sent in clear text" in r.stderr
    assert SECRET_VALUE not in r.stderr


def test_persistent_sandbox_keeps_its_policy(project: Path, upstream: Upstream) -> None:
    """`create --allow-host` through the daemon; `egress NAME allow` opens it at once."""
    name = f"eg-{secrets.token_hex(3)}"
    probe = ["python3", "-c", PROBE, json.dumps(
        [["allowed", "http", "allowed.test", 18080, "allowed.test"],
         ["other", "http", "other.test", 18080, "other.test"]])]
    r = ak("create", name, "-B", "namespaces", "-i", "host", "--allow-host", "allowed.test",
           *hosts(upstream), cwd=project)
    assert r.returncode == 0, r.stderr
    try:
        r = ak("exec", name, "--", *probe)
        assert json.loads(r.stdout) == {"allowed": "reached hello host=allowed.test key=-",
                                        "other": "blocked gaierror"}, (r.stdout, r.stderr)
        assert ak("egress", name, "allow", "other.test").returncode == 0
        r = ak("exec", name, "--", *probe)
        assert json.loads(r.stdout)["other"] == "reached hello host=other.test key=-"
    finally:
        ak("rm", name)
