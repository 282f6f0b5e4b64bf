"""The namespaces backend's sandbox as an unprivileged user builds it (the suite runs as root).

The bwrap command line of each profile is run under `setpriv` as nobody, with the agent
and its seccomp program copied where nobody can read them: what a user without root gets
(bwrap unprivileged, overlays in a user namespace, the agent dropping its capabilities).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel.agent.client import AgentClient
from agentkernel.backends.base import spawn_agent
from agentkernel.backends.namespaces import build_bwrap_argv
from agentkernel.paths import native_binary
from agentkernel.profiles import get_profile
from agentkernel.rootfs import host_rootfs
from agentkernel.sandbox import SandboxSpec
from agentkernel.seccomp import compile_bpf

NOBODY = 65534
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("bwrap"),
    reason="needs root (to become nobody), setpriv and bwrap")


@pytest.fixture(scope="module")
def public_dir() -> Iterator[Path]:
    """A dir nobody can read: the agent, its seccomp program and a project."""
    root = Path(tempfile.mkdtemp(prefix="ak-rootless-", dir="/tmp"))
    root.chmod(0o755)
    try:
        shutil.copy(native_binary("ak-agent"), root / "ak-agent")
        (root / "project").mkdir(mode=0o755)
        (root / "project" / "hello.txt").write_text("hello\n")
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def sh(client: AgentClient, script: str) -> tuple[str, int]:
    out, err, status = client.exec(["sh", "-c", script]).wait(30)
    return (out + err).decode(), status.shell_code


@contextlib.contextmanager
def sandbox_as_nobody(public: Path, profile: str) -> Iterator[AgentClient]:
    p = get_profile(profile).with_overrides(network=False)  # slirp needs a usable tun
    bpf = public / f"{p.seccomp}.bpf"
    shutil.copy(compile_bpf(p.seccomp), bpf)
    spec = SandboxSpec(name=f"rootless-{profile}", profile=p, rootfs=host_rootfs(),
                       image="host", workspace=public / "project")
    bwrap = shutil.which("bwrap")
    assert bwrap is not None
    argv = build_bwrap_argv(bwrap, spec, str(public / "ak-agent"), str(bpf), resolv=None,
                            info_fd=-1)
    setpriv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
    log = Path(tempfile.mkstemp(prefix="ak-rootless-log-")[1])
    spawned = spawn_agent(setpriv + argv, log=log)
    client = AgentClient.from_fds(spawned.read_fd, spawned.write_fd)
    try:
        try:
            client.hello(timeout=15)
        except Exception:
            pytest.fail(f"the sandbox did not start as nobody: {log.read_text()[-500:]}")
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.shutdown()
        client.close()
        spawned.process.kill()
        spawned.process.wait()
        log.unlink(missing_ok=True)


@pytest.mark.parametrize("profile", ["restrictive", "moderate", "permissive"])
def test_sandbox_works_for_an_unprivileged_user(public_dir: Path, profile: str) -> None:
    with sandbox_as_nobody(public_dir, profile) as client:
        out, code = sh(client, "cat /workspace/hello.txt; id -u; grep -E '^Cap(Eff|Bnd)' "
                               "/proc/self/status")
        assert code == 0, out
        assert out.splitlines()[:2] == ["hello", "0"]
        # No capability left, not even in the sandbox's own user namespace.
        assert all(line.split()[1] == "0000000000000000" for line in out.splitlines()[2:])
        out, code = sh(client, "cat /etc/shadow; echo rc=$?")
        assert "root:" not in out  # masked
        out, code = sh(client, "echo x > /usr/ak-rootless && cat /usr/ak-rootless")
        if profile == "restrictive":
            assert code != 0  # read-only root
        else:
            assert out == "x\n", out  # the overlay (a user namespace's overlayfs) takes it
    assert not Path("/usr/ak-rootless").exists()  # the host's /usr is untouched


@pytest.mark.parametrize("profile", ["restrictive", "moderate", "permissive"])
def test_unprivileged_sandbox_changes_nothing_of_the_kernel(public_dir: Path, profile: str) -> None:
    """The /proc and /sys attacks of tests/test_escape_identity.py, as nobody builds it."""
    from test_escape_identity import ALLOWED, WRITABLE_SCAN

    with sandbox_as_nobody(public_dir, profile) as client:
        out, _code = sh(client, "cat /proc/sys/kernel/core_pattern > "
                               "/proc/sys/kernel/core_pattern && echo WRITABLE; echo done")
        assert "done" in out and "WRITABLE" not in out
        stdout, stderr, status = client.exec(["python3", "-c", WRITABLE_SCAN]).wait(60)
        assert status.shell_code == 0, stderr
        bad = [p for p in stdout.decode().split() if not ALLOWED.match(p)]
        assert not bad, f"writable from inside the sandbox: {bad[:20]}"


def test_a_stalled_reader_pauses_its_command_for_an_unprivileged_user(public_dir: Path) -> None:
    """Back-pressure and regular-only reads hold in a sandbox that nobody started."""
    import threading
    import time

    from agentkernel.agent.client import HARD_LIMIT
    from agentkernel.errors import AgentRequestError, Cancelled

    with sandbox_as_nobody(public_dir, "moderate") as client:
        stalled = client.exec(["yes", "flood"])
        peak = 0
        for _ in range(20):
            peak = max(peak, client.queued_bytes())
            time.sleep(0.1)
        assert peak <= HARD_LIMIT
        got: list[int] = []

        def other() -> None:
            out, _err, _status = client.exec(["head", "-c", str(2 * HARD_LIMIT),
                                              "/dev/zero"]).wait()
            got.append(len(out))

        t = threading.Thread(target=other, daemon=True)
        t.start()
        t.join(60)
        assert got == [2 * HARD_LIMIT], "a stalled command held up the others"
        stalled.cancel()
        with pytest.raises(Cancelled):
            stalled.wait(timeout=5)
        sh(client, "ln -s /dev/zero /tmp/zero")
        with pytest.raises(AgentRequestError):
            client.read_file("/tmp/zero")
        for _ in range(50):  # the kill is sent by the client's own thread
            if sh(client, "pgrep -x yes; echo rc=$?")[0].strip().endswith("rc=1"):
                break
            time.sleep(0.1)
        assert sh(client, "pgrep -x yes; echo rc=$?")[0].strip().endswith("rc=1")
