"""Shared fixtures: run the real CLI, plant secrets, start host services and netns test hosts."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from engines import busybox_tar, dockerd, plain_dockerd, podman_ready
from sandbox_helpers import (
    BACKENDS,
    CONTAINER_BACKENDS,
    HostServers,
    NetnsHost,
    backend_available,
)

# The container engines' session fixtures, for every test module (see tests/engines.py).
__all__ = ["busybox_tar", "dockerd", "plain_dockerd", "podman_ready"]


@pytest.fixture(scope="session", autouse=True)
def private_agentkernel_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The suite's own data and runtime dirs: never the user's, and a daemon a test starts
    is stopped at the end (its sandboxes with it)."""
    root = tmp_path_factory.mktemp("agentkernel")
    keys = ("AGENTKERNEL_HOME", "AGENTKERNEL_RUNTIME_DIR", "AGENTKERNEL_DAEMON_AUTOSTART",
            "XDG_CONFIG_HOME")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ["AGENTKERNEL_HOME"] = str(root / "home")
    os.environ["AGENTKERNEL_RUNTIME_DIR"] = str(root / "run")
    # No user config (~/.config/agentkernel/config.toml) but what a test writes itself.
    os.environ["XDG_CONFIG_HOME"] = str(root / "config")
    # In-process runs stay in-process: the daemon tests start theirs on purpose, and
    # tests/daemon/test_daemon_autostart.py turns the autostart back on.
    os.environ["AGENTKERNEL_DAEMON_AUTOSTART"] = "0"
    yield root
    subprocess.run([sys.executable, "-m", "agentkernel", "daemon", "stop"],
                   capture_output=True, timeout=60, check=False)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module", autouse=True)
def no_daemon_across_modules(private_agentkernel_dirs: Path) -> Iterator[None]:
    """A daemon a test module started in the suite's runtime dir (`create`, `run --keep`,
    `daemon start`) is stopped when the module ends: later modules' runs would otherwise go
    through it (its warm pool, its sandboxes) instead of the path they mean to test."""
    yield
    if (private_agentkernel_dirs / "run" / "daemon.sock").exists():
        subprocess.run([sys.executable, "-m", "agentkernel", "daemon", "stop"],
                       capture_output=True, timeout=60, check=False)


@pytest.fixture(params=BACKENDS + CONTAINER_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Every backend a test runs on: namespaces, gVisor, and the container engines (unless
    the test is marked `no_containers`, with why)."""
    name: str = request.param
    if not backend_available(name):
        pytest.skip(f"{name} backend not installed")
    if name in CONTAINER_BACKENDS:
        marker = request.node.get_closest_marker("no_containers")
        if marker is not None:
            pytest.skip(f"not on {name}: {marker.args[0] if marker.args else ''}")
        if name == "docker" and request.getfixturevalue("dockerd") == "root":
            pytest.skip("this machine's dockerd runs without userns-remap: refused")
        if name == "podman":
            request.getfixturevalue("podman_ready")
    return name


@pytest.fixture
def project(tmp_path: Path) -> Path:
    proj = tmp_path / "project"
    proj.mkdir()
    (proj / "hello.txt").write_text("hello from the host\n")
    return proj


@pytest.fixture(scope="session")
def loopback_server() -> Iterator[int]:
    """A TCP server on the host's 127.0.0.1 that answers 'host-loopback-secret'."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"host-loopback-secret\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    srv.close()


@pytest.fixture(scope="session")
def netns_host() -> Iterator[NetnsHost]:
    """A test host in a network namespace we create, serving TCP on every address it has.

    Its main address (198.18.N.2, the benchmarking range: outside every always-denied
    range) is what sandboxes with egress reach. It also holds addresses in denied ranges,
    routed from the host through it (RFC 1918, link-local, CGNAT: `denied`), and the host's
    own end of the veth (198.18.N.1) is one of the host's addresses. N is random, so that
    two sessions on one machine do not collide.
    """
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a test network namespace")
    ns = f"aktest-{secrets.token_hex(3)}"
    host_if, peer_if = f"akh{ns[-6:]}", f"akp{ns[-6:]}"
    n = secrets.randbelow(256)
    host_addr, addr = f"198.18.{n}.1", f"198.18.{n}.2"
    denied = {"rfc1918": f"10.213.{n}.2", "link-local": f"169.254.{n}.2",
              "cgnat": f"100.77.{n}.2"}
    run = lambda *a: subprocess.run(list(a), check=True, capture_output=True)  # noqa: E731
    inns = ["ip", "netns", "exec", ns]
    run("ip", "netns", "add", ns)
    try:
        run("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        run("ip", "link", "set", peer_if, "netns", ns)
        run("ip", "addr", "add", f"{host_addr}/30", "dev", host_if)
        run("ip", "link", "set", host_if, "up")
        run(*inns, "ip", "addr", "add", f"{addr}/30", "dev", peer_if)
        run(*inns, "ip", "link", "set", peer_if, "up")
        run(*inns, "ip", "link", "set", "lo", "up")
        for extra in denied.values():
            run(*inns, "ip", "addr", "add", f"{extra}/32", "dev", "lo")
            run("ip", "route", "add", f"{extra}/32", "via", addr, "dev", host_if)
        server = subprocess.Popen(
            [
                *inns,
                sys.executable,
                "-c",
                "import socket\n"
                "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                "s.bind(('0.0.0.0', 18080)); s.listen(16)\n"
                "while True:\n"
                "    c,_=s.accept(); c.sendall(b'test-host-hello\\n'); c.close()\n",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(100):
                try:
                    with socket.create_connection((addr, 18080), timeout=0.2):
                        break
                except OSError:
                    threading.Event().wait(0.05)
            yield NetnsHost(ns, addr, 18080, host_addr=host_addr, denied=denied)
        finally:
            server.kill()
            server.wait()
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


@pytest.fixture(scope="session")
def host_address_servers(netns_host: NetnsHost) -> Iterator[HostServers]:
    """TCP servers answering 'host-own-secret' on every address of this host but loopback
    and IPv6 link-local: its real interfaces' addresses and the host's end of the test
    veth (198.18.N.1, outside every always-denied range), all on one port."""
    import ipaddress

    out = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True,
                         check=True).stdout
    addrs = []
    for line in out.splitlines():
        addr = ipaddress.ip_address(line.split()[3].split("/")[0])
        if not (addr.is_loopback or addr.is_link_local) and str(addr) not in addrs:
            addrs.append(str(addr))
    assert netns_host.host_addr in addrs
    stop = threading.Event()
    socks: list[socket.socket] = []
    for _attempt in range(5):
        for sock in socks:
            sock.close()
        socks, port = [], 0
        try:
            for addr in addrs:
                fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
                sock = socket.socket(fam, socket.SOCK_STREAM)
                socks.append(sock)
                sock.bind((addr, port))
                sock.listen(16)
                sock.settimeout(0.2)
                port = sock.getsockname()[1]
            break
        except OSError:
            continue

    def serve(sock: socket.socket) -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"host-own-secret\n")

    threads = [threading.Thread(target=serve, args=(s,), daemon=True) for s in socks]
    for t in threads:
        t.start()
    yield HostServers(addrs, port)
    stop.set()
    for t in threads:
        t.join()
    for sock in socks:
        sock.close()
