"""Real tools and more bypass attempts through the real egress gate.

An allow-list of one host (tools.test) that serves `git http-backend` and a package index
over HTTPS on a port that is not 443: `git clone`, `pip install` and Node's fetch work
from inside the sandbox; the same tools aimed at an unlisted host are refused. Then what a
sandbox tries to get around a name-based gate: IPv6 literals (loopback, metadata, NAT64,
link-local, global), DNS over HTTPS to an unlisted host (by name, by an address it never
resolved, with its name as SNI or Host on an allowed host's address), UDP and QUIC to an
allowed host, DNS to an outside server; a plain-HTTP request whose absolute-form target,
CONNECT target or a Host after a bare LF names another host than the one checked.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from engines import skip_for_ordinary_users
from sandbox_helpers import SYSTEM_PYTHON, Upstream, ak, ak_as_user, make_upstream, nobody_home

NOBODY = 65534

NAMES = ["tools.test", "doh.test", "unlisted.test"]


def _wheel(root: Path) -> None:
    """A one-module wheel `akdemo` 1.0 in a PEP 503 layout under root/simple/."""
    pkg = root / "simple" / "akdemo"
    pkg.mkdir(parents=True)
    files = {"akdemo/__init__.py": b"WHO = 'akdemo from tools.test'\n",
             "akdemo-1.0.dist-info/METADATA":
                 b"Metadata-Version: 2.1\nName: akdemo\nVersion: 1.0\n",
             "akdemo-1.0.dist-info/WHEEL":
                 b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                 b"Tag: py3-none-any\n"}
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(data)}")
    record.append("akdemo-1.0.dist-info/RECORD,,")
    with zipfile.ZipFile(pkg / "akdemo-1.0-py3-none-any.whl", "w") as whl:
        for name, data in files.items():
            whl.writestr(name, data)
        whl.writestr("akdemo-1.0.dist-info/RECORD", "\n".join(record) + "\n")


def _repo(root: Path) -> None:
    """A bare repository root/repo.git with one commit."""
    work = root.parent / "work"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q", str(work)], check=True)
    (work / "README").write_text("cloned through the gate\n")
    subprocess.run([*git, "-C", str(work), "add", "README"], check=True)
    subprocess.run([*git, "-C", str(work), "commit", "-qm", "one"], check=True)
    subprocess.run([*git, "clone", "-q", "--bare", str(work), str(root / "repo.git")],
                   check=True)


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("openssl") is None \
            or shutil.which("git") is None:
        pytest.skip("needs root, iproute2, openssl and git")
    with make_upstream(NAMES) as up:
        (up.dir / "git").mkdir()
        _repo(up.dir / "git")
        _wheel(up.dir / "static")
        up.serve(SYSTEM_PYTHON, str(Path(__file__).with_name("egress_tools_upstream.py")),
                 str(up.dir / "srv.pem"), str(up.dir / "srv.key"), str(up.dir / "git"),
                 str(up.dir / "static"))
        up.serve(SYSTEM_PYTHON, str(Path(__file__).with_name("egress_upstream.py")),
                 str(up.dir / "srv.pem"), str(up.dir / "srv.key"))
        yield up


def hosts(up: Upstream) -> list[str]:
    return [a for n in NAMES for a in ("--add-host", f"{n}:{up.addr}")]


TOOLS = r"""
set -u
CA=/workspace/ca.pem
say() { if "$@" >/dev/null 2>&1; then echo ok; else echo refused; fi; }
clone() { say git -c http.sslCAInfo=$CA clone -q https://$1:19443/git/repo.git $2; }
pipi() {
  say python3 -m pip install --no-cache-dir --disable-pip-version-check --retries 0 \
      --timeout 5 --cert $CA --index-url https://$1:19443/simple/ --target $2 akdemo
}
echo "git_allowed=$(clone tools.test /tmp/r)"
echo "git_content=$(cat /tmp/r/README 2>/dev/null)"
echo "git_unlisted=$(clone unlisted.test /tmp/u)"
echo "pip_allowed=$(pipi tools.test /tmp/site)"
echo "pip_content=$(PYTHONPATH=/tmp/site python3 -c 'import akdemo; print(akdemo.WHO)')"
echo "pip_unlisted=$(pipi unlisted.test /tmp/site2)"
if command -v node >/dev/null; then
  for h in tools unlisted; do
    echo "node_$h=$(NODE_EXTRA_CA_CERTS=$CA node -e '
      fetch(process.argv[1]).then(r => r.text()).then(t => console.log(t.length ? "ok" : "empty"),
                                  () => console.log("refused"))' \
      https://$h.test:19443/simple/akdemo/)"
  done
fi
"""


def test_git_pip_and_node_through_the_gate(project: Path, upstream: Upstream) -> None:
    r = ak("run", "-B", "namespaces", "-i", "host", "-m", "1g", "--allow-host", "tools.test",
           *hosts(upstream), "--", "sh", "-c", TOOLS, cwd=_with_ca(project, upstream),
           timeout=240)
    assert r.returncode == 0, r.stderr
    seen = dict(line.split("=", 1) for line in r.stdout.splitlines())
    assert seen.pop("git_content") == "cloned through the gate", (seen, r.stderr)
    assert seen.pop("pip_content") == "akdemo from tools.test", (seen, r.stderr)
    expected = {"git_allowed": "ok", "git_unlisted": "refused", "pip_allowed": "ok",
                "pip_unlisted": "refused"}
    if shutil.which("node"):
        expected.update(node_tools="ok", node_unlisted="refused")
    assert seen == expected, r.stderr
    assert "unlisted.test REFUSED by default deny" in r.stderr, r.stderr


def _with_ca(project: Path, up: Upstream) -> Path:
    shutil.copy(up.ca, project / "ca.pem")
    return project


# Each check: [label, kind, args...]; prints {label: "reached ..." | "blocked ..."}.
PROBE = r"""
import json, socket, ssl, struct, sys
def dns_query(name):
    q = struct.pack(">HHHHHH", 0x4B1D, 0x0100, 1, 0, 0, 0)
    return q + b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0\0\1\0\1"
def doh(sock, host):
    body = dns_query("example.com")
    sock.sendall(b"POST /dns-query HTTP/1.1\r\nHost: " + host.encode() +
                 b"\r\nContent-Type: application/dns-message\r\nContent-Length: " +
                 str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    data = sock.recv(4096)
    if not data:
        raise ConnectionResetError("closed")
    return data.split(b"\r\n")[0].decode()
def check(kind, *a):
    if kind == "tcp6":
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.settimeout(4)
        s.connect((a[0], a[1], 0, socket.if_nametoindex("eth0") if a[0].startswith("fe80") else 0))
        return "reached " + repr(s.recv(10))
    if kind == "udp6":
        u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        u.settimeout(2)
        u.sendto(b"ping", (a[0], a[1]))
        return "reached " + repr(u.recv(100))
    if kind == "aaaa":
        return "resolved " + repr(socket.getaddrinfo(a[0], 80, socket.AF_INET6))
    if kind == "doh":  # addr, port, sni (None: none), tls
        addr, port, name, ca = a
        s = socket.create_connection((addr, port), timeout=5)
        if ca:
            ctx = ssl.create_default_context(cafile=ca)
            ctx.check_hostname = False
            s = ctx.wrap_socket(s, server_hostname=name)
        return "reached " + doh(s, name or addr)
    if kind == "send":  # raw bytes of a request head; the status line back
        s = socket.create_connection((a[0], a[1]), timeout=5)
        s.sendall(a[2].encode())
        data = s.recv(4096)
        if not data:
            raise ConnectionResetError("closed")
        return "reached " + data.split(b"\r\n")[0].decode()
    if kind == "udp":
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.settimeout(2)
        u.sendto(bytes.fromhex(a[2]), (a[0], a[1]))
        return "reached " + repr(u.recv(100))
    if kind == "dns":
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.settimeout(3)
        u.sendto(dns_query(a[1]), (a[0], 53))
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

# A QUIC v1 Initial's first bytes (long header, version 1): what HTTP/3 sends first.
QUIC = "c300000001" + "08" + "00" * 8 + "00" + "00" * 40


def attempts(up: Upstream) -> list[list[object]]:
    ca = "/workspace/ca.pem"
    return [
        ["ipv6 loopback", "tcp6", "::1", 18080],
        ["ipv6 metadata", "tcp6", "fd00:ec2::254", 80],
        ["ipv6 nat64 metadata", "tcp6", "64:ff9b::a9fe:a9fe", 80],
        ["ipv6 nat64 of the allowed host", "tcp6",
         "64:ff9b::" + "".join(f"{int(x):02x}" for x in up.addr.split("."))[:4] + ":" +
         "".join(f"{int(x):02x}" for x in up.addr.split("."))[4:], 18080],
        ["ipv6 link-local", "tcp6", "fe80::1", 18080],
        ["ipv6 global", "tcp6", "2001:db8::1", 443],
        ["ipv6 udp", "udp6", "2001:db8::1", 53],
        ["aaaa of the allowed host", "aaaa", "tools.test"],
        ["doh by name", "doh", "doh.test", 18443, "doh.test", ca],
        ["doh by an address never resolved", "doh", up.addr2, 18443, "doh.test", ca],
        ["doh sni on the allowed host's address", "doh", "tools.test", 18443, "doh.test", ca],
        ["doh host on the allowed host's address", "doh", "tools.test", 18080, "doh.test", None],
        ["doh to a public resolver's address", "doh", "1.1.1.1", 443, "cloudflare-dns.com", ca],
        ["plain request (control)", "send", "tools.test", 18080,
         "GET / HTTP/1.1\r\nHost: tools.test\r\n\r\n"],
        ["absolute-form target naming another host", "send", "tools.test", 18080,
         "GET http://unlisted.test/ HTTP/1.1\r\nHost: tools.test\r\n\r\n"],
        ["CONNECT to another host", "send", "tools.test", 18080,
         "CONNECT unlisted.test:443 HTTP/1.1\r\nHost: tools.test:18080\r\n\r\n"],
        ["Host after a bare LF", "send", "tools.test", 18080,
         "GET / HTTP/1.1\r\nX: y\nHost: unlisted.test\r\n\r\n"],
        ["quic to the allowed host", "udp", "tools.test", 443, QUIC],
        ["udp to the allowed host", "udp", "tools.test", 18053, "70696e67"],
        ["dns to an outside server", "dns", up.addr2, "doh.test"],
    ]


def test_bypass_attempts_fail(backend: str, project: Path, upstream: Upstream) -> None:
    todo = attempts(upstream)
    r = ak("run", "-B", backend, "-i", "host", "--allow-host", "tools.test",
           *hosts(upstream), "--", "python3", "-c", PROBE, json.dumps(todo),
           cwd=_with_ca(project, upstream))
    assert r.returncode == 0, r.stderr
    _judge(json.loads(r.stdout), todo)


def _judge(seen: dict[str, str], todo: list[list[object]]) -> None:
    assert seen.pop("aaaa of the allowed host") == "blocked gaierror", seen  # no AAAA
    assert seen.pop("dns to an outside server") == "rcode 3 answers 0", seen  # ours
    assert seen.pop("doh by name") == "blocked gaierror", seen
    assert seen.pop("plain request (control)") == "reached HTTP/1.1 200 OK", seen
    assert all(v.startswith("blocked") for v in seen.values()), seen
    assert len(seen) == len(todo) - 4


def test_bypass_attempts_fail_as_an_ordinary_user(backend: str, upstream: Upstream) -> None:
    skip_for_ordinary_users(backend)
    """The same attempts from a sandbox an unprivileged host user started (its gate and
    rules set up without root)."""
    with nobody_home({"ca.pem": upstream.ca}) as home:
        todo = attempts(upstream)
        proc = ak_as_user(NOBODY, home, "run", "-B", backend, "-i", "host",
                          "--allow-host", "tools.test", *hosts(upstream), "--", "python3",
                          "-c", PROBE, json.dumps(todo), cwd=home / "project")
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        _judge(json.loads(out), todo)
