"""The wasm worker's direct channel: a socket pair between the daemon (or CLI) and the worker.

Attacks on it from the host: the agent hands its end (`--give`) to one command only (the
worker), never to another command of its sandbox, and never twice; a warm worker's channel
has no name or path to connect to (another local user, a sandbox's process), and its two
ends are held by the daemon and the worker alone (not the agent, not bwrap's monitor).
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_helpers import ak
from wasm_modules import write_modules

if shutil.which("bwrap") is None:
    pytest.skip("needs bwrap", allow_module_level=True)


def _holders(inode: int) -> set[int]:
    """The pids with an fd on socket `inode`."""
    want = f"socket:[{inode}]"
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") == want:
                    found.add(int(entry))
                    break
            except OSError:
                continue
    return found


def _inode(link: str) -> int:
    assert link.startswith("socket:["), link
    return int(link[len("socket:["):-1])


@pytest.fixture
def given() -> Iterator[tuple[socket.socket, object]]:
    """A namespaces sandbox whose agent holds one end of a socket pair (`--give`)."""
    from agentkernel.backends.namespaces import NamespacesBackend
    from agentkernel.profiles import get_profile
    from agentkernel.rootfs import host_rootfs
    from agentkernel.sandbox import SandboxSpec

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    spec = SandboxSpec(name=f"given-{os.getpid()}", profile=get_profile("moderate"),
                       rootfs=host_rootfs(), image="host")
    try:
        sandbox = NamespacesBackend().start(spec, give=theirs.fileno())
    finally:
        theirs.close()
    ours.settimeout(60)
    try:
        yield ours, sandbox
    finally:
        sandbox.destroy()  # type: ignore[attr-defined]
        ours.close()


def test_the_agent_hands_its_given_descriptor_to_one_command_once(
        given: tuple[socket.socket, object]) -> None:
    from agentkernel.errors import AgentRequestError

    ours, sandbox = given
    client = sandbox.client  # type: ignore[attr-defined]
    # Another command never has it (the agent's own channel is pipes: no socket at all).
    out, _err, status = client.exec(["sh", "-c", "ls -l /proc/self/fd/ /proc/$$/fd/"]).wait(60)
    assert status.code == 0 and b"socket:" not in out, out
    # A terminal and the given descriptor exclude each other.
    with pytest.raises(AgentRequestError) as refused:
        client.exec(["true"], given_stdio=True, pty=(24, 80))
    assert refused.value.errno == errno.EINVAL
    # The one command that asks gets it as its stdin and stdout; its stderr stays the agent's.
    talker = client.exec(["sh", "-c", "echo hi; read x; echo got $x; echo err >&2"],
                         given_stdio=True)
    assert ours.recv(100) == b"hi\n"
    ours.sendall(b"yo\n")
    got = b""
    while not got.endswith(b"\n"):
        got += ours.recv(100)
    assert got == b"got yo\n"
    out, err, status = talker.wait(60)
    assert (out, err.strip(), status.code) == (b"", b"err", 0)
    # It was the agent's to give once: the command took it, and with its end, our end ends.
    assert ours.recv(100) == b""
    with pytest.raises(AgentRequestError) as again:
        client.exec(["true"], given_stdio=True)
    assert again.value.errno == errno.EBADF


def test_an_agent_without_a_given_descriptor_refuses_to_hand_one() -> None:
    from agentkernel.backends.namespaces import NamespacesBackend
    from agentkernel.errors import AgentRequestError
    from agentkernel.profiles import get_profile
    from agentkernel.rootfs import host_rootfs
    from agentkernel.sandbox import SandboxSpec

    spec = SandboxSpec(name=f"not-given-{os.getpid()}", profile=get_profile("moderate"),
                       rootfs=host_rootfs(), image="host")
    sandbox = NamespacesBackend().start(spec)
    try:
        with pytest.raises(AgentRequestError) as refused:
            sandbox.client.exec(["true"], given_stdio=True)
        assert refused.value.errno == errno.EBADF
    finally:
        sandbox.destroy()


def test_a_warm_workers_channel_is_the_daemon_and_the_worker_alone(tmp_path: Path) -> None:
    """Its ends: one in the worker (its stdin and stdout), one in the daemon; no path or
    abstract name (nothing another user or a sandbox could connect to), nobody else's."""
    pytest.importorskip("wasmtime")

    root = tmp_path / "root"
    (root / "run").mkdir(parents=True, mode=0o700)
    (root / "proj").mkdir()
    write_modules(root / "proj")
    env = {"AGENTKERNEL_HOME": str(root / "home"), "AGENTKERNEL_RUNTIME_DIR": str(root / "run"),
           "AGENTKERNEL_DAEMON_AUTOSTART": "0"}
    assert ak("daemon", "start", env=env).returncode == 0
    try:
        r = ak("run", "hello.wat", cwd=root / "proj", env=env)
        assert r.returncode == 0 and r.stdout.startswith("hello"), r.stderr
        daemon = int((root / "run" / "daemon.pid").read_text().split()[0])
        checked = 0
        deadline = time.monotonic() + 60
        while not checked:
            # A loaded machine may show only workers on their way out (the pool replacing
            # or trimming them) in one scan: look again until one stays put for the whole of it.
            assert time.monotonic() < deadline, "no warm worker stayed put for a scan"
            checked = _check_workers(daemon)
            time.sleep(0 if checked else 0.2)
        # The channel serves the next run, as before.
        r = ak("run", "hello.wat", "x", cwd=root / "proj", env=env)
        assert r.returncode == 0 and r.stdout.startswith("hello\nx"), r.stdout
    finally:
        ak("daemon", "stop", env=env)


def _check_workers(daemon: int) -> int:
    """How many of the daemon's warm workers have a channel held by it and them alone
    (asserted), skipping those the pool replaced or trimmed during the scan."""
    from test_wasm_confinement import _workers_under

    checked = 0
    for worker in _workers_under(daemon):
        try:
            link = os.readlink(f"/proc/{worker}/fd/0")
            assert os.readlink(f"/proc/{worker}/fd/1") == link  # one socket, both ways
            theirs = _inode(link)
            peer = _peer(theirs)
            if peer is None:
                raise FileNotFoundError  # its socket went with it
            held = (_holders(theirs), _holders(peer))
            names = _unix_paths()
            os.readlink(f"/proc/{worker}/fd/0")  # still there after the scan
            if not held[1]:
                # The daemon closed its end during the scan (retiring this worker, which has
                # not exited yet): held by nobody, so by no one else either.
                raise FileNotFoundError
        except (FileNotFoundError, ProcessLookupError):
            continue  # the pool replaced or trimmed this worker meanwhile
        # Not its agent, not bwrap's monitor; the daemon alone at the other end.
        assert held == ({worker}, {daemon})
        assert names.get(theirs) == "" and names.get(peer) == "", (names.get(theirs),
                                                                   names.get(peer))
        checked += 1
    return checked


def _peer(inode: int) -> int | None:
    """The other end of unix socket `inode` (from `ss`: /proc does not say); None if there
    is no such socket (any more)."""
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2) to find a socket's peer")
    out = subprocess.run(["ss", "-x", "-a", "-H"], capture_output=True, text=True,
                         check=True).stdout
    for line in out.splitlines():
        fields = line.split()
        # u_str ESTAB 0 0 <path or *> <inode> <peer path or *> <peer inode>
        if len(fields) >= 8 and fields[5] == str(inode):
            return int(fields[7])
    return None


def _unix_paths() -> dict[int, str]:
    """Inode -> bound name ('' for none; '@...' for an abstract one) of this netns's
    unix sockets."""
    names = {}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        names[int(fields[6])] = fields[7] if len(fields) > 7 else ""
    return names
