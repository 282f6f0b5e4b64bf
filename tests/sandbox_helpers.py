"""Helpers shared by the sandbox tests: run the real CLI, probe the network from inside."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BACKENDS = ["namespaces", "gvisor"]
# Run by the `backend` fixture too, each on a real engine (tests/engines.py), for the tests
# that do not say otherwise (`@pytest.mark.no_containers("why")`).
CONTAINER_BACKENDS = ["docker", "podman"]
_NEEDS = {"namespaces": "bwrap", "gvisor": "runsc", "docker": "dockerd", "podman": "podman"}


def backend_available(name: str) -> bool:
    if name in CONTAINER_BACKENDS and os.geteuid() != 0:
        return False  # the suite starts dockerd and imports images as root
    return shutil.which(_NEEDS[name], path="/usr/sbin:/usr/bin:/sbin:/bin") is not None


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def ak(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    input: bytes | None = None,
    timeout: float = 120,
) -> Result:
    """Run the real `agentkernel` CLI in a subprocess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "agentkernel", *args],
        cwd=cwd,
        env=full_env,
        input=input,
        capture_output=True,
        timeout=timeout,
        check=False,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    return Result(
        proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    )


@dataclass
class NetnsHost:
    """A test host living in a network namespace the suite created."""

    ns: str
    addr: str
    port: int
    host_addr: str = ""  # the host's own end of the veth: an address of the host
    denied: dict[str, str] = field(default_factory=dict)  # kind -> address it also serves


@dataclass
class HostServers:
    """TCP servers on the host's own (non-loopback) addresses, all on one port."""

    addrs: list[str]
    port: int


# A probe run inside the sandbox: connect to host:port, print what came back or 'blocked'.
CONNECT_PROBE = (
    "import socket,sys\n"
    "try:\n"
    "    s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)\n"
    "    print('reached', s.recv(100).decode().strip())\n"
    "except OSError as e:\n"
    "    print('blocked', type(e).__name__)\n"
)


SYSTEM_PYTHON = "/usr/bin/python3"  # an ordinary user cannot read the suite's interpreter


# A fake API server on 127.0.0.1 that shows the head of every request it gets and answers
# each with an empty list: the stored-key red-team tests' listener (an attacker's or the
# user's own). `python3 -S -c HEAD_LOGGER PORT MODE` (PORT 0: any) prints "port N", then
# "head <the head's repr>" a request, and per MODE: "close" answers with `connection: close`
# and goes on accepting; "once" also, but exits after its first request; "keep" answers
# with keep-alive and reads on from each connection; "release" as "keep", but closes its
# listener after the first request ("released") and then serves only that connection,
# printing "closed" when it ends. A connection that closes before sending a whole head
# (our client's own, refused at its listener check) is skipped.
HEAD_LOGGER = r"""
import socket, sys
BODY = b'{"success": true, "data": [], "error": null}'


def head(c):
    data = b""
    while b"\r\n\r\n" not in data:
        d = c.recv(4096)
        if not d:
            return None
        data += d
    return data


def answer(c, keep):
    c.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
              + str(len(BODY)).encode() + (b"" if keep else b"\r\nconnection: close")
              + b"\r\n\r\n" + BODY)


port, mode = int(sys.argv[1]), sys.argv[2]
keep = mode in ("keep", "release")
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen(8)
print("port", s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    data, served = head(c), False
    while data is not None:
        print("head", repr(data), flush=True)
        answer(c, keep)
        served = True
        if mode == "release":
            s.close()
            print("released", flush=True)
            mode = "kept"
        data = head(c) if keep else None
    c.close()
    if mode == "kept":
        print("closed", flush=True)
        break
    if served and mode == "once":
        break
"""


@functools.lru_cache(maxsize=1)
def public_pythonpath() -> str:
    """A PYTHONPATH any user can read: this checkout's package and the venv's
    site-packages, hard-linked (copied across filesystems) into a world-readable dir,
    because the checkout and the suite's interpreter may sit in root's private dirs (CI
    clones into one). Use it with SYSTEM_PYTHON; removed when the suite ends."""
    import atexit
    import site
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="ak-public-py-", dir="/tmp"))
    atexit.register(shutil.rmtree, top, True)
    top.chmod(0o755)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    package = Path(__file__).resolve().parent.parent / "src" / "agentkernel"
    shutil.copytree(package, top / "src" / "agentkernel", copy_function=link,
                    ignore=shutil.ignore_patterns("__pycache__"))
    packages = next(p for p in site.getsitepackages() if p.endswith("site-packages"))
    shutil.copytree(packages, top / "site", copy_function=link, symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "__editable__*", "*.pth"))
    for d in (top, top / "src", top / "site"):
        d.chmod(0o755)
    return f"{top / 'src'}:{top / 'site'}"
# Run as root in a private mount namespace: put a 0666 /dev/net/tun (the usual mode; this
# build host's is 0600) over the real one, for this namespace only, then exec argv[2:].
_TUN_SHIM = (
    "import os,subprocess,sys\n"
    "d=sys.argv[1]\n"
    "subprocess.run(['mount','-t','tmpfs','-o','mode=755','tmpfs',d],check=True)\n"
    "os.mknod(d+'/tun',0o20666,os.makedev(10,200)); os.chmod(d+'/tun',0o666)\n"
    "subprocess.run(['mount','--bind',d+'/tun','/dev/net/tun'],check=True)\n"
    "os.execvp(sys.argv[2],sys.argv[2:])\n"
)


def ak_as_user(uid: int, home: Path, *args: str, cwd: Path, timeout: float = 120,
               env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """The real CLI (this checkout's sources, the system's python3) as host user `uid`,
    with its own data and runtime dirs under `home` (which `uid` must own), started in the
    background. Needs root, util-linux and setpriv."""
    src = public_pythonpath()
    tundir = home / "tun"
    tundir.mkdir(exist_ok=True)
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(home),
           "PYTHONPATH": src, "AGENTKERNEL_HOME": str(home / "data"),
           "AGENTKERNEL_RUNTIME_DIR": str(home / "run"), "AGENTKERNEL_DAEMON_AUTOSTART": "0",
           **(env or {})}
    argv = ["unshare", "--mount", "--propagation", "private", "--",
            SYSTEM_PYTHON, "-P", "-c", _TUN_SHIM, str(tundir),
            "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--",
            # -P: as the installed command, nothing imported from the (project) cwd
            "timeout", str(int(timeout)), SYSTEM_PYTHON, "-P", "-m", "agentkernel", *args]
    return subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# --- a test upstream in a network namespace of the suite's -----------------------------


@dataclass(frozen=True)
class ShellProbe:
    """Egress probes as one shell script over busybox-style tools (for guests without
    Python): each line prints `@LABEL what happened`. `tool` prefixes every tool (e.g.
    "busybox "); `wget_timeout` bounds each fetch where wget has no timeout of its own."""

    tool: str = ""
    wget_timeout: int | None = None

    def nc(self, label: str, host: str, port: int) -> str:
        t = self.tool
        return (f'echo "@{label} $({t}nc -w 3 {host} {port} </dev/null 2>&1 '
                f'| {t}head -c 200)"\n')

    def get(self, label: str, url: str, *header: str) -> str:
        extra = " ".join(f"--header '{h}'" for h in header)
        limit = f"timeout {self.wget_timeout} " if self.wget_timeout else ""
        return (f'echo "@{label} $({limit}{self.tool}wget -q -O- {extra} {url} 2>/dev/null '
                f'|| echo refused)"\n')

    def common(self, up: Upstream) -> list[str]:
        """What every backend's allow-list test tries: allowed.test is the only way out."""
        t = self.tool
        return [
            self.get("http-allowed", "http://allowed.test:18080/"),
            self.nc("raw-allowed", "allowed.test", 18022),
            f'echo "@dns-denied $({t}nslookup denied.test 2>&1 | {t}tr "\\n" " ")"\n',
            self.get("http-denied", "http://denied.test:18080/"),
            self.get("host-mismatch", "http://allowed.test:18080/", "Host: denied.test"),
            self.nc("direct-ip", up.addr2, 18022),
            self.nc("private", up.private, 18022),
            self.nc("rebind", "rebind.test", 18022),
            self.get("metadata", "http://169.254.169.254/"),
        ]


def marked(text: str) -> dict[str, str]:
    """A probe's `@LABEL what happened` lines (ShellProbe, the matrix's script), by label."""
    seen: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"@(\S+) ?(.*)", line)
        if m:
            seen[m.group(1)] = m.group(2).strip()
    return seen


@contextlib.contextmanager
def nobody_home(project_files: dict[str, Path] | None = None) -> Iterator[Path]:
    """A home for host user `nobody` (65534) in /tmp (pytest's tmp dirs are 0700) with a
    `project` dir holding copies of `project_files` (name: source), all nobody's; removed
    afterwards.
    Skips where setpriv or the system's python3 (which an ordinary user runs) is missing."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None or \
            not os.access(SYSTEM_PYTHON, os.X_OK):
        import pytest

        pytest.skip("needs root (to become nobody), setpriv and the system's python3")
    home = Path(tempfile.mkdtemp(prefix="ak-nobody-", dir="/tmp"))
    try:
        (home / "project").mkdir()
        for name, src in (project_files or {}).items():
            shutil.copy(src, home / "project" / name)
        for path in (home, *home.rglob("*")):
            os.chown(path, 65534, 65534, follow_symlinks=False)
        for path in (home, home / "project"):
            path.chmod(0o755)
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def run_checked(*argv: str) -> None:
    subprocess.run(list(argv), check=True, capture_output=True, timeout=30)


def make_test_certs(d: Path, names: Sequence[str]) -> None:
    """A test CA (d/ca.pem) and a server certificate for `names` signed by it
    (d/srv.pem, d/srv.key)."""
    ossl = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
    run_checked(*ossl, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"), "-subj",
                "/CN=ak-test-ca")
    run_checked("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout",
                str(d / "srv.key"), "-out", str(d / "srv.csr"), "-subj", f"/CN={names[0]}")
    (d / "ext").write_text("subjectAltName=" + ",".join(f"DNS:{n}" for n in names) + "\n")
    run_checked("openssl", "x509", "-req", "-in", str(d / "srv.csr"), "-CA", str(d / "ca.pem"),
                "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-out", str(d / "srv.pem"),
                "-days", "2", "-extfile", str(d / "ext"))


@dataclass
class Upstream:
    """Test servers' host: a network namespace (held by a process, not `ip netns`) behind a
    veth from the host, with certificates from a test CA for the names it was made for."""

    pid: int  # the holder of its network namespace
    addr: str  # 198.N.M.2: what the names resolve to (via --add-host)
    addr2: str  # 198.N.M.3: in no DNS answer
    private: str  # 10.213.M.2 on its loopback, routed from the host (always denied)
    dir: Path  # ca.pem, srv.pem, srv.key; world-readable
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def inns(self) -> list[str]:
        return ["nsenter", f"--target={self.pid}", "--net", "--"]

    def serve(self, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start `argv` inside the namespace; it prints "ready" once it serves. Stopped with
        the upstream."""
        proc = subprocess.Popen([*self.inns, *argv], stdout=subprocess.PIPE, env=env)
        self.servers.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n", argv
        return proc


def free_subnet(net: str) -> int:
    """A random M (1..250) with no address or route of this host in `net`.M.0/24 or
    10.213.M.0/24: another test host there (this suite's netns_host, or another suite on
    the machine) would take the traffic meant for ours."""
    used = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True,
                          check=True).stdout
    used += subprocess.run(["ip", "-o", "route", "show"], capture_output=True, text=True,
                           check=True).stdout
    for _ in range(100):
        n = secrets.randbelow(250) + 1
        if f"{net}.{n}." not in used and f"10.213.{n}." not in used:
            return n
    raise RuntimeError(f"no free {net}.M.0/24 for a test host")


@contextlib.contextmanager
def serving_upstream(names: Sequence[str]) -> Iterator[Upstream]:
    """make_upstream(names) with egress_upstream.py's test servers up on it (skips the
    test without root, iproute2 or openssl)."""
    import pytest

    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("openssl") is None:
        pytest.skip("needs root, iproute2 and openssl")
    with make_upstream(names) as up:
        up.serve(SYSTEM_PYTHON, str(Path(__file__).with_name("egress_upstream.py")),
                 str(up.dir / "srv.pem"), str(up.dir / "srv.key"))
        yield up


@contextlib.contextmanager
def make_upstream(names: Sequence[str], *, net: str = "198.18",
                  private: bool = True) -> Iterator[Upstream]:
    """An Upstream for `names` in `net`.M.0/24 (M random); needs root, iproute2, openssl."""
    d = Path(tempfile.mkdtemp(prefix="ak-upstream-"))
    d.chmod(0o755)
    make_test_certs(d, names)
    tag, n = secrets.token_hex(3), free_subnet(net)
    host_if, peer_if = f"akeh{tag}", f"akep{tag}"
    addr, addr2, priv = f"{net}.{n}.2", f"{net}.{n}.3", f"10.213.{n}.2"
    holder = subprocess.Popen(["unshare", "--net", "sleep", "infinity"])
    up = Upstream(holder.pid, addr, addr2, priv, d)
    try:
        own = os.readlink("/proc/self/ns/net")
        while os.readlink(f"/proc/{holder.pid}/ns/net") == own:
            time.sleep(0.01)
        inns = up.inns
        run_checked("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if,
                    "netns", str(holder.pid))
        run_checked("ip", "addr", "add", f"{net}.{n}.1/24", "dev", host_if)
        run_checked("ip", "link", "set", host_if, "up")
        for a in (addr, addr2):
            run_checked(*inns, "ip", "addr", "add", f"{a}/24", "dev", peer_if)
        run_checked(*inns, "ip", "link", "set", peer_if, "up")
        run_checked(*inns, "ip", "link", "set", "lo", "up")
        run_checked(*inns, "ip", "route", "add", "default", "via", f"{net}.{n}.1")
        if private:
            run_checked(*inns, "ip", "addr", "add", f"{priv}/32", "dev", "lo")
            run_checked("ip", "route", "add", f"{priv}/32", "via", addr, "dev", host_if)
        yield up
    finally:
        for server in up.servers:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, check=False)
        holder.kill()
        holder.wait()
        shutil.rmtree(d, ignore_errors=True)


def egress_gate_pid(scratch: Path) -> int | None:
    """The live egress gate of the sandbox whose scratch dir this is (forked on demand,
    forked for its life, or its own interpreter), found by the log it holds open there;
    None while it has none (an idle sandbox's gate is its fork server's to start)."""
    log = str(scratch / "egress.log")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
            if comm != "ak-egress-gate" and b"gate_main" not in Path(
                    f"/proc/{entry}/cmdline").read_bytes():
                continue
            state = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
            if state in (b"Z", b"X"):
                continue
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/fd/{fd}") == log:
                        return int(entry)
        except OSError:
            continue
    return None


# Keeps one DNS-over-TCP connection to the sandbox's gate in use (a query each second,
# each answered): the gate counts it as busy, so it does not exit idle meanwhile. Prints
# "held" once the first answer came; ends after `argv[1]` queries or when the gate closes.
HOLD_GATE = r"""
import socket, struct, sys, time
ns = next(ln.split()[1] for ln in open("/etc/resolv.conf") if ln.startswith("nameserver"))
q = (struct.pack(">HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"\x04gate\x07invalid\x00"
     + struct.pack(">HH", 1, 1))
s = socket.create_connection((ns, 53), timeout=30)
def exact(n):
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk:
            raise SystemExit("the gate closed the connection")
        got += chunk
    return got
def ask():
    s.sendall(struct.pack(">H", len(q)) + q)
    exact(struct.unpack(">H", exact(2))[0])
ask()
print("held", flush=True)
for _ in range(int(sys.argv[1])):
    time.sleep(1)
    ask()
"""


@contextlib.contextmanager
def gate_held(sandbox: Any, seconds: int = 55) -> Iterator[None]:
    """While the block runs (at most `seconds`), the sandbox's gate serves a connection:
    an activated gate (egress_forkserver) cannot exit idle under a check that needs it."""
    ex = sandbox.client.exec(["python3", "-c", HOLD_GATE, str(seconds)],
                             env={"PATH": "/usr/bin:/bin"}, cwd="/")
    try:
        seen = b""
        for kind, data in ex.events():
            if kind == "exit":
                raise AssertionError(f"no connection held through the gate: {seen!r}")
            assert isinstance(data, bytes)
            seen += data
            if b"held" in seen:
                break
        yield
    finally:
        if ex.status is None:
            ex.kill()
            ex.wait(60)


def serving_gate(scratch: Path, timeout: float = 30.0) -> int:
    """The one live gate of the sandbox whose scratch dir this is, while a connection is
    held through it (`gate_held`): one that went idle just before may be on its way out."""
    deadline = time.monotonic() + timeout
    while len(gates := _gates(scratch)) != 1:
        assert time.monotonic() < deadline, f"not one gate: {gates}"
        time.sleep(0.05)
    (pid,) = gates
    return pid


def _gates(scratch: Path) -> set[int]:
    """Live forked gates holding the sandbox's log open."""
    log = str(scratch / "egress.log")
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if Path(f"/proc/{entry}/comm").read_text().strip() != "ak-egress-gate":
                continue
            if Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] in (
                    b"Z", b"X"):
                continue
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/fd/{fd}") == log:
                        out.add(int(entry))
                        break
        except OSError:
            continue
    return out


@contextlib.contextmanager
def shared_top(prefix: str) -> Iterator[Path]:
    """A directory both root and an ordinary user can reach (in /var/tmp, 0755: pytest's
    own dirs are root's 0700), with project/ (0755), run/ and data/ (0700) for CLI runs
    without a daemon (`top_run`). The podman API service a run started there is stopped
    after (its pid file is in run/)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    path.chmod(0o755)
    for sub in ("project", "run", "data"):
        (path / sub).mkdir(mode=0o755 if sub == "project" else 0o700)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int((path / "run" / "podman.pid").read_text()), 15)
        shutil.rmtree(path, ignore_errors=True)


def give_top(top: Path, user: int) -> None:
    """`shared_top`'s dir and its first level made `user`'s for a run as that user (none
    for root); skips where setpriv, which `top_argv` runs them through, is missing."""
    if user == 0:
        return
    if shutil.which("setpriv") is None:
        import pytest

        pytest.skip("needs setpriv")
    for p in (top, *top.iterdir()):
        os.chown(p, user, user)


def top_env(top: Path) -> dict[str, str]:
    """The environment of a CLI run in `shared_top`'s dir: its data and runtime dirs, no
    daemon, our package on a path an ordinary user can read."""
    return {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(top),
            "AGENTKERNEL_HOME": str(top / "data"), "AGENTKERNEL_RUNTIME_DIR": str(top / "run"),
            "AGENTKERNEL_NO_DAEMON": "1", "PYTHONPATH": public_pythonpath()}


def top_argv(user: int, backend: str, profile: str | None, script: str,
             *args: str) -> list[str]:
    """`agentkernel run -q -B backend [-p profile] -- python3 -c script args…` as `user`
    (root: the suite's interpreter; another: the system's, through setpriv)."""
    cmd = [sys.executable, "-P", "-m", "agentkernel"]
    if user != 0:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--",
               SYSTEM_PYTHON, "-P", "-m", "agentkernel"]
    chosen = ["-p", profile] if profile else []
    return [*cmd, "run", "-q", "-B", backend, *chosen, "--", "python3", "-c", script, *args]


def top_run(top: Path, user: int, backend: str, profile: str, script: str,
            *args: str) -> subprocess.CompletedProcess[str]:
    """`top_argv` run in `top`'s project, its output taken."""
    return subprocess.run(top_argv(user, backend, profile, script, *args), cwd=top / "project",
                          env=top_env(top), capture_output=True, text=True, timeout=240,
                          stdin=subprocess.DEVNULL, check=False)


def build_probe(project: Path, source: str, uid: int | None = None,
                flags: Sequence[str] = ()) -> None:
    """The C `source` built static into `project/probe` (`/workspace/probe` in a sandbox
    of `project`; made `uid`'s where given, with its source). Skips without a compiler."""
    cc = shutil.which("musl-gcc") or shutil.which("gcc")
    if cc is None:
        import pytest

        pytest.skip("needs a C compiler for the probe")
    (project / "probe.c").write_text(source)
    subprocess.run([cc, "-static", "-O1", *flags, "-o", str(project / "probe"),
                    str(project / "probe.c")], check=True, capture_output=True, timeout=120)
    if uid is not None:
        for f in ("probe", "probe.c"):
            os.chown(project / f, uid, uid)


def probe_verdicts(stdout: str) -> dict[str, str]:
    """A probe's `label verdict …` lines as {label: verdict}."""
    return {ln.split()[0]: ln.split()[1] for ln in stdout.splitlines() if len(ln.split()) > 1}


def container_ready(request: Any, engine: str) -> None:
    """Skips where the `engine` (docker, podman) backend cannot run here (this machine's
    dockerd without userns-remap: refused, test_docker_refused_without_userns); podman's
    set-up (the podman_ready fixture) done."""
    if engine == "docker":
        if request.getfixturevalue("dockerd") == "root":
            import pytest

            pytest.skip("this machine's dockerd runs without userns-remap: the docker "
                        "backend refuses it (test_docker_refused_without_userns)")
    else:
        request.getfixturevalue("podman_ready")


def container_project(request: Any, engine: str, busybox_tar: tuple[Path, str],
                      tmp_path: Path) -> tuple[str, Path]:
    """For a root-started `engine` container (`container_ready`): the test image, loaded
    from the busybox_tar fixture's archive, and an empty project dir in `tmp_path`."""
    from engines import CLI, ensure_image

    container_ready(request, engine)
    tar, image = busybox_tar
    ensure_image([CLI[engine]], tar, image)
    project = tmp_path / "p"
    project.mkdir()
    return image, project


def container_run(engine: str, image: str, profile: str, project: Path,
                  argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """`agentkernel run` of `argv` in a root-started `engine` container of `image` and
    `profile`, no network, no daemon, in `project`: its output taken."""
    return run_quiet(project, "--backend", engine, "--image", image, "--profile", profile,
                     "--no-network", "--", *argv)


def run_quiet(project: Path, *args: str, timeout: float = 180
              ) -> subprocess.CompletedProcess[str]:
    """`agentkernel run -q ARGS…` in `project` by the suite's interpreter (-P: nothing of
    `project` is imported), no daemon, no stdin: its output taken."""
    return subprocess.run(
        [sys.executable, "-P", "-m", "agentkernel", "run", "-q", *args],
        cwd=project, env={**os.environ, "AGENTKERNEL_NO_DAEMON": "1"},
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)


def host_runner(engine: str, cwd: Path, script: str) -> tuple[Any, Callable[[], str]]:
    """A restrictive sandbox of `engine` on the host's userland running `sh -c script`,
    planned once: (the plan, a function that starts it in-process, runs it, destroys it and
    returns its stdout; exit 0 asserted)."""
    import io

    from agentkernel import planner
    from agentkernel.engine import execute

    plan = planner.plan(planner.RunRequest(
        argv=["sh", "-c", script], cwd=cwd, image="host", backend=engine,
        profile="restrictive", workdir="/tmp"), planner.CallerContext.here(), quiet=True)

    def run() -> str:
        out, err = io.BytesIO(), io.BytesIO()
        sandbox, result = execute(plan, timeout=60, stdout=out, stderr=err)
        sandbox.destroy()
        assert result.exit_code == 0, err.getvalue()
        return out.getvalue().decode()

    return plan, run
