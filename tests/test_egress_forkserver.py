"""Egress gates forked by the fork server (egress_forkserver) are as confined as gates
started fresh: the sandbox's own `nobody`, no capability, no way back to the server.

Real sandboxes (namespaces backend, moderate: every one has a gate, forked on demand:
each test first makes the sandbox resolve a name). The attacker is the gate itself, taken
over by what the sandbox sends it: it must hold no fd of the server's socket, and as its
uid it must not be able to signal the server or look into its fds. The server holds of a
sandbox only the fds its gates are forked with (tests/test_egress_idle.py attacks those).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_helpers import SYSTEM_PYTHON, egress_gate_pid, gate_held, serving_gate

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="gates drop ids only as root")


@pytest.fixture(autouse=True)
def _forkserver() -> None:
    """Gates of this process come from its fork server, as a daemon's do."""
    from agentkernel import egress_forkserver

    egress_forkserver.enable()


def _start(name: str) -> object:
    from agentkernel.backends import get_backend
    from agentkernel.profiles import get_profile
    from agentkernel.rootfs import host_rootfs
    from agentkernel.sandbox import SandboxSpec

    spec = SandboxSpec(name=f"{name}-{os.getpid()}", profile=get_profile("moderate"),
                       rootfs=host_rootfs(), image="host")
    return get_backend("namespaces").start(spec)


@pytest.fixture
def sandbox() -> Iterator[object]:
    from agentkernel.sandbox import Sandbox

    box = _start("fork")
    assert isinstance(box, Sandbox)
    try:
        yield box
    finally:
        box.destroy()


def _gate(box: object) -> int:
    """The sandbox's gate, forked for a DNS query of its (none runs before)."""
    from agentkernel.sandbox import Sandbox

    assert isinstance(box, Sandbox)
    query = "import socket\ntry: socket.getaddrinfo('gate.invalid', 80)\nexcept OSError: pass"
    _out, err, status = box.client.exec(["python3", "-c", query]).wait(timeout=30)
    assert status.code == 0, err
    pid = egress_gate_pid(box.scratch)
    assert pid is not None, "no gate after a query"
    return pid


def _status(pid: int, key: str) -> list[str]:
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(rf"^{key}:\s+(.*)$", text, re.M)
    assert m, key
    return m[1].split()


def _dropped(pid: int) -> list[str]:
    deadline = time.monotonic() + 30  # root only until its files and sockets are open
    while _status(pid, "Uid") == ["0"] * 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    return _status(pid, "Uid")


def _fd_targets(pid: int) -> dict[str, str]:
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
    return out


def _server_pid() -> int:
    from agentkernel import egress_forkserver

    server = egress_forkserver._server
    assert server is not None, "the gate was not forked by a fork server"
    return server.proc.pid


_SANDBOX_FILES = ("egress.log", "egress-gate.err")  # in a registered sandbox's scratch dir


def _is_control(path: str) -> bool:
    """A registered sandbox's control socket (scratch/egress.sock), by its path."""
    p = Path(path)
    return p.name == "egress.sock" and p.parent.parent.name == "sandboxes"


def _rendezvous(server: int) -> list[str]:
    """The server's listening sockets for a restarted daemon (egress_forkserver.take_over),
    by path: present when a daemon's manager enabled its fork server in this process."""
    inodes = {t[len("socket:["):-1] for t in _fd_targets(server).values()
              if t.startswith("socket:")}
    found = []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[6] in inodes and len(fields) == 8 and Path(fields[7]).parent.name == \
                "gate-forks":
            path = Path(fields[7])
            st = path.parent.stat()
            assert (st.st_mode & 0o777, st.st_uid) == (0o700, os.getuid()), path
            found.append(fields[7])
    assert len(found) <= 1, found
    return found


def test_forked_gate_is_confined(sandbox: object) -> None:
    """The gate is forked (its comm says so), runs as the sandbox range's nobody with no
    capability and no_new_privs, and holds no fd of the server's socket."""
    from agentkernel.egress_forkserver import GATE_COMM, SERVER_COMM
    from agentkernel.sandbox import Sandbox

    assert isinstance(sandbox, Sandbox)
    gate = _gate(sandbox)
    server = _server_pid()
    assert Path(f"/proc/{gate}/comm").read_text().strip() == GATE_COMM
    assert Path(f"/proc/{server}/comm").read_text().strip() == SERVER_COMM
    uids = _dropped(gate)
    assert len(set(uids)) == 1 and int(uids[0]) >= 65536, uids
    assert _status(gate, "CapEff") == ["0000000000000000"]
    assert _status(gate, "CapPrm") == ["0000000000000000"]
    assert _status(gate, "NoNewPrivs") == ["1"]
    server_sockets = {t[len("socket:["):-1] for t in _fd_targets(server).values()
                      if t.startswith("socket:")}
    # The server holds every registered sandbox's control socket (a session's microVM may
    # be registered beside this one); its own socket is the one without such a path.
    own = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[6] in server_sockets and not _is_control(fields[-1]) and \
                fields[-1] not in _rendezvous(server):
            # The server's socket has no path anyone could connect to: a socket pair.
            assert len(fields) == 7, f"the server's socket has a path: {line}"
            own.add(f"socket:[{fields[6]}]")
    assert len(own) == 1, "the server's own socket"
    assert not own & set(_fd_targets(gate).values())


def test_server_holds_only_what_gates_are_forked_with(sandbox: object) -> None:
    """The server keeps, of a registered sandbox, only what its gates are forked with:
    its three listeners, its lifeline, its sealed config and its state (memfds), its log,
    stderr and audit files; besides those, /dev/null and its own socket."""
    from agentkernel.egress_audit import audit_path
    from agentkernel.sandbox import Sandbox

    assert isinstance(sandbox, Sandbox)
    targets = list(_fd_targets(_server_pid()).values())
    audit = str(audit_path())
    # Every sandbox registered now (this one, and a session's microVM if one is up): each
    # only by the files its gates are forked with, all in its own scratch dir.
    scratches = {Path(t).parent for t in targets if t.endswith(_SANDBOX_FILES)}
    assert sandbox.scratch in scratches, targets
    assert all(s.parent.name == "sandboxes" for s in scratches), scratches
    own = {"/dev/null", "/memfd:ak-gate-config (deleted)", "/memfd:ak-gate-state (deleted)",
           *(str(s / f) for s in scratches for f in _SANDBOX_FILES),
           *(f"{audit}/{s.name}.jsonl{end}" for s in scratches for end in ("", ".1"))}
    others = [t for t in targets if t not in own and not t.startswith(("socket:", "pipe:"))]
    assert not others, targets
    n = len(scratches)
    listening = len(_rendezvous(_server_pid()))  # a private dir's, for a restarted daemon
    assert len([t for t in targets if t.startswith("socket:")]) == 1 + 3 * n + listening, \
        targets
    assert len([t for t in targets if t.startswith("pipe:")]) == n, targets  # lifelines


def test_warmed_up_server_is_still_safe_to_fork(sandbox: object) -> None:
    """The server runs a gate's code before forking (egress_proxy.warm_up): it stays one
    thread (fork copies only the caller's) and keeps nothing of that run (checked for fds
    above): its private sockets' directory is gone."""
    del sandbox
    assert os.listdir(f"/proc/{_server_pid()}/task") == [str(_server_pid())]
    assert not list(Path(os.environ.get("TMPDIR") or "/tmp").glob("ak-gate-warm-*"))


def test_warm_up_leaves_nothing_behind(tmp_path: Path) -> None:
    """egress_proxy.warm_up, run alone: the same fds, one thread, no event loop, its
    private directory gone."""
    code = ("import asyncio, os, threading\n"
            "from agentkernel import egress_proxy\n"
            "before = sorted(os.listdir('/proc/self/fd'))\n"
            "egress_proxy.warm_up()\n"
            "assert sorted(os.listdir('/proc/self/fd')) == before, os.listdir('/proc/self/fd')\n"
            "assert threading.active_count() == 1\n"
            "try:\n"
            "    asyncio.get_running_loop()\n"
            "except RuntimeError:\n"
            "    pass\n"
            "else:\n"
            "    raise AssertionError('a running loop')\n"
            "assert asyncio.get_event_loop_policy()._local._loop is None\n"
            "assert os.listdir(os.environ['TMPDIR']) == []\n"
            "print('ok')\n")
    import sys

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "TMPDIR": str(tmp_path)}, timeout=60, check=False)
    assert r.stdout.strip() == "ok", r.stderr


def test_gate_cannot_reach_the_server(sandbox: object) -> None:
    """As the gate's uid: no signal to the server, no look at its fds or memory."""
    from agentkernel.sandbox import Sandbox

    assert isinstance(sandbox, Sandbox)
    uid = int(_dropped(_gate(sandbox))[0])
    server = _server_pid()
    probe = (
        "import os, sys\n"
        "pid = int(sys.argv[1])\n"
        "for what, f in (('signal', lambda: os.kill(pid, 0)),\n"
        "                ('fds', lambda: os.listdir(f'/proc/{pid}/fd')),\n"
        "                ('mem', lambda: open(f'/proc/{pid}/mem', 'rb').read(1))):\n"
        "    try:\n"
        "        f()\n"
        "    except PermissionError:\n"
        "        print(what, 'refused')\n"
        "    else:\n"
        "        print(what, 'ALLOWED')\n")
    r = subprocess.run([SYSTEM_PYTHON, "-S", "-c", probe, str(server)], user=uid, group=uid,
                       extra_groups=[], capture_output=True, text=True, timeout=30,
                       check=False, cwd="/")
    assert r.stdout.split("\n")[:3] == ["signal refused", "fds refused", "mem refused"], (
        r.stdout, r.stderr)


def test_gates_outlive_a_dead_server_and_a_new_one_starts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A server killed under a running sandbox takes no running gate with it: that gate
    keeps serving, its starter registers the sandbox with a new server, which adopts the
    gate (forks none beside it); once it went idle the new server forks the next. The
    next sandbox gets its gate from the new server; a destroyed sandbox's gate is gone.
    (An idle sandbox's recovery: tests/test_egress_idle.py.)"""
    import signal

    from agentkernel import egress_forkserver
    from agentkernel.procs import is_zombie
    from agentkernel.sandbox import Sandbox

    monkeypatch.setenv("AGENTKERNEL_GATE_IDLE_SECONDS", "1")
    sandbox = _start("fork1")
    assert isinstance(sandbox, Sandbox)
    try:
        _gate(sandbox)
        # A connection held through the gate across the kill: once the new server adopts
        # it, only that keeps it from exiting idle (1 s) before the query below reaches it.
        with gate_held(sandbox):
            gate = serving_gate(sandbox.scratch)
            old = _server_pid()
            os.kill(old, signal.SIGKILL)
            assert _gate(sandbox) == gate  # it still answers
            deadline = time.monotonic() + 20
            while egress_forkserver.server_pid() in (None, old):
                assert time.monotonic() < deadline, "no new server"
                time.sleep(0.05)
        deadline = time.monotonic() + 30
        while not is_zombie(gate):  # adopted: it exits when idle again
            assert time.monotonic() < deadline, "the adopted gate never went idle"
            time.sleep(0.1)
        nxt = _gate(sandbox)
        assert nxt != gate
        other = _start("fork2")
        assert isinstance(other, Sandbox)
        try:
            assert _server_pid() != old
            other_gate = _gate(other)
        finally:
            other.destroy()
    finally:
        sandbox.destroy()
    deadline = time.monotonic() + 10
    while not all(is_zombie(p) for p in (nxt, other_gate)):
        assert time.monotonic() < deadline, "a destroyed sandbox's gate lives on"
        time.sleep(0.05)


@pytest.fixture
def netns_holder() -> Iterator[int]:
    """A process alone in a new network namespace: its pid."""
    holder = subprocess.Popen(["unshare", "--net", "--", "sleep", "60"])
    own = os.readlink("/proc/self/ns/net")
    deadline = time.monotonic() + 10
    while os.readlink(f"/proc/{holder.pid}/ns/net") == own and time.monotonic() < deadline:
        time.sleep(0.005)
    try:
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_wiring_fails_closed(netns_holder: int) -> None:
    """A failed step of a namespace's wiring is an error (the caller does not start the
    sandbox), never listeners over half-loaded rules."""
    from agentkernel import egress_forkserver
    from agentkernel.errors import SandboxError

    fd = os.open(f"/proc/{netns_holder}/ns/net", os.O_RDONLY)
    try:
        with pytest.raises(SandboxError, match="false"):
            egress_forkserver.wire(fd, -1, [(["/bin/true"], ""), (["/bin/false"], "")],
                                   "127.0.0.1")
    finally:
        os.close(fd)


def test_wiring_happens_in_the_namespace(netns_holder: int) -> None:
    """The steps run and the listeners are made in the given namespace, not the host's."""
    from agentkernel import egress_forkserver
    from agentkernel.egress_proxy import TCP_PORT

    fd = os.open(f"/proc/{netns_holder}/ns/net", os.O_RDONLY)
    try:
        got = egress_forkserver.wire(fd, -1, [(["ip", "link", "set", "lo", "up"], "")],
                                     "127.0.0.1")
    finally:
        os.close(fd)
    assert got is not None
    try:
        ns_links = subprocess.run(["nsenter", f"--target={netns_holder}", "--net", "--",
                                   "ip", "-o", "link", "show", "lo"], capture_output=True,
                                  text=True, check=True).stdout
        assert ",UP" in ns_links, ns_links
        listening = Path(f"/proc/{netns_holder}/net/tcp").read_text()
        assert f"0100007F:{TCP_PORT:04X}" in listening, listening
    finally:
        for f in got:
            os.close(f)
