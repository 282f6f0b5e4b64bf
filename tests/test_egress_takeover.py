"""A restarted daemon takes its killed predecessor's sandboxes from that one's egress fork
server (egress_forkserver.take_over), so that a later death of a fork server does not close
them: it holds dups of their gate fds as of those it registered itself.

Real namespaces sandboxes, real daemons killed with SIGKILL, a real test upstream, as root
and as host `nobody`. The attackers: another local user and a process shaped like a sandbox
(its own user and pid namespaces, the same uid) ask the server for its sandboxes' fds
(their config memfds hold secrets); a process of ours that is no fork server offers fds to
the daemon. None of them gets or gives anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox_helpers import (
    SYSTEM_PYTHON,
    Upstream,
    ak,
    egress_gate_pid,
    gate_held,
    serving_gate,
    serving_upstream,
)
from test_egress_idle import (
    IDLE,
    _holding,
    _start,
    _status,
    _zombie,
    gone_idle,
    probe,
)
from test_egress_policy import UPSTREAM_NAMES, hosts

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (and to become nobody)")

NOBODY = 65534
VALUE = "sk-takeover-" + os.urandom(12).hex()
ALLOWED = {"h": "reached hello host=allowed.test key=-", "d": "blocked gaierror"}
POLICY = [["h", "http", "allowed.test", 18080, "allowed.test"], ["d", "resolve", "denied.test"]]

# One exec's worth of checks, as JSON: the secret put in for its host over TLS (the
# sandbox's CA), the placeholder refused in clear text to another allowed host, the
# allow-list's allowed host reached, its denied name refused.
CHECK = r"""
import json, os, socket, ssl, urllib.request
def get(url, key=None):
    ctx = ssl.create_default_context(cafile="/etc/ssl/certs/ca-certificates.crt")
    r = urllib.request.Request(url, headers={"x-api-key": key} if key else {})
    try:
        return urllib.request.urlopen(r, timeout=10, context=ctx).read().decode().strip()
    except OSError as e:
        return "refused " + type(e).__name__
try:
    denied = "resolved " + socket.gethostbyname("denied.test")
except OSError as e:
    denied = "blocked " + type(e).__name__
key = os.environ.get("SECRET_KEY", "")
print(json.dumps({"secret": get("https://secret.test:18443/", key),
                  "clear": get("http://other.test:18080/", key),
                  "allowed": get("http://allowed.test:18080/"), "denied": denied,
                  "leaked": VALUE in json.dumps(dict(os.environ))}))
"""

# Holds one connection through the gate (so it keeps serving) until /tmp/release exists;
# /tmp/held says it is connected.
HOLD = r"""
import os, socket, time
s = socket.create_connection(("allowed.test", 18080), timeout=10)
open("/tmp/held", "w").close()
deadline = time.time() + 120
while not os.path.exists("/tmp/release") and time.time() < deadline:
    time.sleep(0.1)
"""


def every_host(up: Upstream) -> list[str]:
    return [*hosts(up), "--add-host", f"secret.test:{up.addr}"]


def expected(value: str) -> dict[str, object]:
    return {"secret": f"hello host=secret.test:18443 key={value}",
            "clear": "refused", "allowed": "hello host=allowed.test:18080 key=-",
            "denied": "blocked gaierror", "leaked": False}


def judged(seen: dict[str, Any]) -> dict[str, object]:
    """`seen` with a refusal's kind left out (a reset or an HTTP error: both refused)."""
    return {k: ("refused" if isinstance(v, str) and v.startswith("refused") else v)
            for k, v in seen.items()}


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with serving_upstream(UPSTREAM_NAMES) as up:
        yield up


def _wait(what: str, done: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = done()
        if got:
            return got
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _gone(pid: int) -> bool:
    return _zombie(pid)  # (gone, or a zombie nobody reaped yet)


def _servers(scratch: Path) -> set[int]:
    """Fork servers holding this sandbox's log (its registration)."""
    return _holding("ak-gate-forks", str(scratch / "egress.log"))


def _fds_to(pid: int, target: str) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}") == target
        except OSError:
            continue
    return n


# --- the daemon, as root ---------------------------------------------------------------------


def test_a_restarted_daemons_sandbox_outlives_its_killed_fork_server(
        upstream: Upstream) -> None:
    """kill -9 the daemon (its sandbox's gate serving a held connection), start a new one:
    it takes the sandbox from the old server, which exits; the serving gate is adopted, not
    doubled, and exits idle once released. kill -9 the new server: the daemon registers the
    sandbox with a third one, and the sandbox still gets out by its policy: allowed host
    reached, denied name refused, the secret put in at the gate, its placeholder refused in
    clear text, the value nowhere in the sandbox."""
    from agentkernel.paths import runtime_dir

    env = {"AGENTKERNEL_GATE_IDLE_SECONDS": IDLE,
           "AGENTKERNEL_EGRESS_UPSTREAM_CA": str(upstream.ca)}
    r = ak("secret", "set", "tkey", "--host", "secret.test", "--header", "x-api-key",
           "--env", "SECRET_KEY", input=VALUE.encode() + b"\n")
    assert r.returncode == 0, r.stderr
    ak("daemon", "stop")
    assert ak("daemon", "start", env=env).returncode == 0
    name = f"take-{os.getpid()}"
    r = ak("create", name, "-B", "namespaces", "-i", "host", "--secret", "tkey",
           "--allow-host", "secret.test", "--allow-host", "other.test", "--allow-host",
           "allowed.test", *every_host(upstream), env=env)
    assert r.returncode == 0, r.stderr
    scratch = runtime_dir() / "sandboxes" / name

    def check() -> None:
        r = ak("exec", name, "--", "python3", "-c", CHECK.replace("VALUE", repr(VALUE)))
        assert r.returncode == 0, r.stderr
        assert judged(json.loads(r.stdout)) == expected(VALUE), r.stdout

    def daemon_pid() -> int:
        return int(json.loads(ak("daemon", "status", "--json").stdout)["pid"])

    try:
        check()
        (old,) = _servers(scratch)
        r = ak("exec", name, "--", "sh", "-c",
               f"setsid python3 -c '{HOLD}' </dev/null >/dev/null 2>&1 &")
        assert r.returncode == 0, r.stderr
        # (The gate of check() may still run, or be on its way out idle: the one that
        # serves the held connection is the one there once it connected.)
        _wait("the held connection did not connect", lambda: ak(
            "exec", name, "--", "test", "-e", "/tmp/held").returncode == 0)
        serving = serving_gate(scratch)
        os.kill(daemon_pid(), signal.SIGKILL)
        assert ak("daemon", "start", env=env).returncode == 0
        _wait("the old server did not hand its sandbox over and exit", lambda: _gone(old))
        (new,) = _servers(scratch)
        assert new != old
        daemon = daemon_pid()
        assert _fds_to(daemon, str(scratch / "egress.log")) == 1  # its dup, for recovery
        # The gate that served across the hand-off is the sandbox's only one, adopted:
        # released, it may exit idle (an orphan nobody adopted would serve on).
        assert _holding("ak-egress-gate", str(scratch / "egress.log")) == {serving}
        assert ak("exec", name, "--", "touch", "/tmp/release").returncode == 0
        gone_idle(_Scratch(scratch))
        os.kill(new, signal.SIGKILL)
        third = _wait("no new server took the sandbox", lambda: _servers(scratch) - {new})
        assert len(third) == 1
        check()
        assert ak("egress", name, "allow", "denied.test").returncode == 0  # live updates
        r = ak("exec", name, "--", "python3", "-c", CHECK.replace("VALUE", repr(VALUE)))
        assert json.loads(r.stdout)["denied"] == f"resolved {upstream.addr}", r.stdout
        assert daemon_pid() == daemon
    finally:
        ak("rm", name)
        ak("daemon", "stop")


class _Scratch:
    """What gone_idle needs of a sandbox: its scratch dir."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch


# --- the daemon, as an ordinary user ---------------------------------------------------------


def test_an_ordinary_users_restarted_daemon_keeps_its_sandbox_out(upstream: Upstream) -> None:
    """The same as host `nobody` (its own daemon, fork servers and secret store): kill -9
    the daemon, start another, kill -9 the fork server; the sandbox still gets out by its
    policy, with its secret, and the servers are nobody's."""
    from sandbox_helpers import ak_as_user, nobody_home

    with nobody_home() as home:
        env = {"AGENTKERNEL_GATE_IDLE_SECONDS": IDLE, "SECRET_VALUE": VALUE,
               "AGENTKERNEL_EGRESS_UPSTREAM_CA": str(upstream.ca)}

        def as_user(*args: str, check: bool = True) -> str:
            proc = ak_as_user(NOBODY, home, *args, cwd=home / "project", env=env)
            out, err = proc.communicate(timeout=180)
            assert proc.returncode == 0 or not check, (args, out, err)
            return out

        def seen() -> dict[str, object]:
            out = as_user("exec", "kept", "--", "python3", "-c",
                          CHECK.replace("VALUE", repr(VALUE)))
            return judged(json.loads(out))

        scratch = home / "run" / "sandboxes" / "kept"
        as_user("secret", "set", "ukey", "--host", "secret.test", "--header", "x-api-key",
                "--env", "SECRET_KEY", "--from-env", "SECRET_VALUE")
        as_user("daemon", "start")
        try:
            as_user("create", "kept", "-B", "namespaces", "-i", "host", "--secret", "ukey",
                    "--allow-host", "secret.test", "--allow-host", "other.test",
                    "--allow-host", "allowed.test", *every_host(upstream))
            assert seen() == expected(VALUE)
            (old,) = _servers(scratch)
            assert _status(old, "Uid")[0] == str(NOBODY)
            daemon = int(json.loads(as_user("daemon", "status", "--json"))["pid"])
            os.kill(daemon, signal.SIGKILL)
            as_user("daemon", "start")
            _wait("the old server did not hand its sandbox over", lambda: _gone(old))
            _wait("its gate did not idle out", lambda: egress_gate_pid(scratch) is None)
            (new,) = _servers(scratch)
            assert _status(new, "Uid")[0] == str(NOBODY)
            os.kill(new, signal.SIGKILL)
            _wait("no new server took the sandbox", lambda: _servers(scratch) - {new})
            assert seen() == expected(VALUE)
        finally:
            as_user("rm", "kept", check=False)
            as_user("daemon", "stop", check=False)


# --- the hand-off itself, attacked -----------------------------------------------------------

ASK = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("connect", type(e).__name__)
    raise SystemExit
s.send(b"T")
msg, fds, _f, _a = socket.recv_fds(s, 4096, 16)
print("answer", msg[:1].decode(), len(fds), msg[1:80].decode(errors="replace"))
"""


@pytest.fixture
def rendezvous() -> Iterator[Path]:
    """This process as a daemon is: its fork server listening in a private dir (in a dir
    others may pass through, as a runtime dir's parent is: /run, /tmp)."""
    import tempfile

    from agentkernel import egress_forkserver

    top = Path(tempfile.mkdtemp(prefix="ak-rdv-", dir="/tmp"))
    top.chmod(0o711)
    where = top / "gate-forks"
    os.environ["AGENTKERNEL_GATE_IDLE_SECONDS"] = IDLE
    egress_forkserver.shutdown()
    egress_forkserver.enable(str(where))
    try:
        yield where
    finally:
        egress_forkserver.shutdown()
        egress_forkserver._rendezvous = None  # (as before: this process is no daemon)
        os.environ.pop("AGENTKERNEL_GATE_IDLE_SECONDS", None)
        shutil.rmtree(top, ignore_errors=True)


def _ask(path: Path, *prefix: str) -> str:
    r = subprocess.run([*prefix, SYSTEM_PYTHON, "-S", "-c", ASK, str(path)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_only_the_next_daemon_gets_a_servers_sandboxes(rendezvous: Path,
                                                        upstream: Upstream) -> None:
    """Another user cannot reach the server's socket (a 0700 dir), nor be served when it
    can (the server checks its peer); nor can a process of the same uid in namespaces of
    its own (a sandbox's shape), nor anyone while the server's starter lives. A socket of
    ours that is not a fork server is refused by take_over. Then take_over moves the
    sandbox to a new server, the old exits, and a kill of the new one is recovered."""
    from agentkernel import egress_forkserver

    box = _start("take", upstream, "allowed.test")
    try:
        assert probe(box, POLICY) == ALLOWED
        (old,) = _servers(box.scratch)
        (sock,) = rendezvous.iterdir()
        # Its gate (what the sandbox may take over) holds nothing of the rendezvous.
        with gate_held(box):  # (the probe's may have gone idle: 1 s)
            gate = serving_gate(box.scratch)
            assert f"socket:[{_inode_of(sock)}]" not in _links(gate)
        as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                     "--"]
        assert _ask(sock, *as_nobody) == "connect PermissionError"
        rendezvous.chmod(0o711)  # the first wall down: the server's own check remains
        sock.chmod(0o666)
        try:
            answer = _ask(sock, *as_nobody)
        finally:
            rendezvous.chmod(0o700)
            sock.chmod(0o600)
        assert answer.startswith("answer e 0 not your daemon"), answer
        assert _ask(sock).startswith("answer e 0 its starter still holds it")
        egress_forkserver.shutdown()  # its starter gone, as a killed daemon's
        sandboxed = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--"]
        answer = _ask(sock, *sandboxed)
        assert answer.startswith("answer e 0 the peer runs in another user namespace"), answer
        # A socket of ours that is not a fork server: refused, asked nothing.
        import socket

        fake = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fake.bind(str(rendezvous / "0123456789abcdef"))
        fake.listen(1)
        try:
            notes = egress_forkserver.take_over()
        finally:
            fake.close()
        assert any("not a gate fork server" in n for n in notes), notes
        assert any("took 1 sandbox" in n for n in notes), notes
        _wait("the old server did not exit", lambda: _gone(old))
        new = egress_forkserver.server_pid()
        assert new is not None and _servers(box.scratch) == {new}
        assert probe(box, POLICY) == ALLOWED
        gone_idle(box)
        os.kill(new, signal.SIGKILL)
        _wait("no new server took the sandbox", lambda: _servers(box.scratch) - {new})
        assert probe(box, POLICY) == ALLOWED
        with gate_held(box):
            gate = serving_gate(box.scratch)
            assert _parent(gate) == egress_forkserver.server_pid()
    finally:
        box.destroy()


def _inode_of(path: Path) -> str:
    """The inode of the unix socket bound at `path` (/proc/net/unix)."""
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == str(path):
            return fields[6]
    raise AssertionError(f"nothing bound at {path}")


def _links(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])
