"""Outside review, round 2: a kept sandbox's command against its own agent's socket.

The agent of a kept sandbox listens on `/run/ak/ctl/agent.sock` (namespaces), which its
commands see. Read-only, the dir cannot be changed, but `connect()` ignores that: a command
queued a connection there, and once the daemon hung up (a daemon restart, an upgrade) the
agent accepted it, sent it its HELLO and served it, not the next daemon: the sandbox held
its own control channel (requests the daemon never made; the restarted daemon could not
reach the agent and marked the sandbox dead).
"""

from __future__ import annotations

import secrets

import pytest

from conftest import Daemon
from sandbox_helpers import ak_as_user, backend_available, nobody_home

NOBODY = 65534

PROBE = r"""
import os, socket, time
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(SOCK)
except OSError as exc:  # gVisor: the dir is host nobody's, 0700
    open("/tmp/probe.out", "w").write("refused")
    open("/tmp/connected", "w").write(f"refused {exc.errno}")
    raise SystemExit
open("/tmp/connected", "w").write("1")
data = s.recv(65536)
open("/tmp/probe.out", "w").write("hello" if data else "closed")
if data:
    time.sleep(60)  # hold the agent's channel
"""


@pytest.mark.parametrize(("backend", "sock"), [("namespaces", "/run/ak/ctl/agent.sock"),
                                             ("gvisor", "/.ak/ctl/agent.sock")])
def test_command_cannot_take_its_agents_channel(daemon: Daemon, backend: str,
                                                sock: str) -> None:
    if not backend_available(backend):
        pytest.skip(f"no {backend}")
    name = f"box-{secrets.token_hex(3)}"
    created = daemon.ak("create", name, "-i", "host", "-B", backend)
    assert created.returncode == 0, created.stderr
    try:
        r = daemon.ak("exec", name, "--", "sh", "-c",
                      f"cat > /tmp/probe.py <<'EOF'\nSOCK = {sock!r}\n{PROBE}\nEOF\n"
                      "setsid python3 /tmp/probe.py </dev/null >/tmp/probe.err 2>&1 &\n"
                      "for i in $(seq 100); do [ -e /tmp/connected ] && break; sleep 0.1; done\n"
                      "cat /tmp/connected || cat /tmp/probe.err")
        assert r.returncode == 0 and r.stdout in ("1", "refused 1", "refused 13"), \
            r.stdout + r.stderr
        assert daemon.ak("daemon", "stop").returncode == 0
        daemon.ensure_up()
        r = daemon.ak("exec", name, "--", "sh", "-c",
                      "for i in $(seq 100); do [ -e /tmp/probe.out ] && break; sleep 0.1; done;"
                      " cat /tmp/probe.out")
        assert r.returncode == 0, f"the restarted daemon lost the sandbox: {r.stderr}"
        assert r.stdout in ("closed", "refused"), \
            f"the agent served its sandbox's command: {r.stdout!r}"
    finally:
        daemon.ak("remove", name)


def test_command_cannot_take_its_agents_channel_as_nobody() -> None:
    """The same as an ordinary user (host `nobody`), with a daemon of its own."""
    with nobody_home() as home:
        def run(*args: str, timeout: int = 90) -> tuple[int, str]:
            proc = ak_as_user(NOBODY, home, *args, cwd=home / "project", timeout=timeout)
            out, err = proc.communicate(timeout=timeout + 30)
            return proc.returncode, out + err

        name = f"box-{secrets.token_hex(3)}"
        try:
            assert run("daemon", "start")[0] == 0
            code, out = run("create", name, "-i", "host", "-B", "namespaces")
            assert code == 0, out
            code, out = run("exec", name, "--", "sh", "-c",
                            f"cat > /tmp/probe.py <<'EOF'\nSOCK = '/run/ak/ctl/agent.sock'\n"
                            f"{PROBE}\nEOF\n"
                            "setsid python3 /tmp/probe.py </dev/null >/tmp/probe.err 2>&1 &\n"
                            "for i in $(seq 100); do [ -e /tmp/connected ] && break; "
                            "sleep 0.1; done\ncat /tmp/connected")
            # (13: the agent's unix-socket guard refuses it outright: the dir is the host's)
            assert code == 0 and (out.endswith("1") or out.endswith("refused 13")), out
            assert run("daemon", "stop")[0] == 0
            assert run("daemon", "start")[0] == 0
            code, out = run("exec", name, "--", "sh", "-c",
                            "for i in $(seq 100); do [ -e /tmp/probe.out ] && break; "
                            "sleep 0.1; done; cat /tmp/probe.out")
            assert code == 0, f"the restarted daemon lost the sandbox: {out}"
            assert out in ("closed", "refused"), f"the agent served its sandbox's command: {out!r}"
        finally:
            run("remove", name)
            run("daemon", "stop")
