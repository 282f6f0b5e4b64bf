"""Booted guests under the microvm backend (TCG here): exec, files, kernel, network, isolation."""

from __future__ import annotations

import os
import platform
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agentkernel.errors import ProtocolError
from agentkernel.sandbox import Sandbox

pytestmark = pytest.mark.timeout(240)


def sh(sandbox: Sandbox, script: str, timeout: float = 60) -> tuple[str, str, int]:
    out, err, status = sandbox.client.exec(["sh", "-c", script]).wait(timeout)
    return out.decode(), err.decode(), status.shell_code


def test_guest_runs_its_own_kernel(moderate_vm: Sandbox) -> None:
    out, _, code = sh(moderate_vm, "uname -r")
    assert code == 0
    assert out.strip() != platform.release()
    assert "cloud-amd64" in out or "custom" in out
    assert "microVM" in moderate_vm.isolation


def test_exit_codes_and_signals(moderate_vm: Sandbox) -> None:
    assert sh(moderate_vm, "exit 7")[2] == 7
    assert sh(moderate_vm, "true")[2] == 0
    _, _, status = moderate_vm.client.exec(["sh", "-c", "kill -9 $$"]).wait(30)
    assert status.signal == signal.SIGKILL


def test_streams_output_as_it_comes(moderate_vm: Sandbox) -> None:
    ex = moderate_vm.client.exec(["sh", "-c", "echo one; sleep 1; echo two >&2; echo three"])
    seen: list[tuple[str, float]] = []
    start = time.monotonic()
    for kind, data in ex.events():
        if kind in ("stdout", "stderr"):
            assert isinstance(data, bytes)
            seen.append((data.decode(), time.monotonic() - start))
    text = "".join(s for s, _ in seen)
    assert "one" in text and "two" in text and "three" in text
    first = next(t for s, t in seen if "one" in s)
    last = next(t for s, t in seen if "three" in s)
    assert last - first > 0.5  # "one" arrived before the sleep ended


def test_stdin_and_files(moderate_vm: Sandbox) -> None:
    ex = moderate_vm.client.exec(["cat"], stdin=True)
    ex.write_stdin(b"piped through the guest\n")
    ex.close_stdin()
    out, _, status = ex.wait(30)
    assert out == b"piped through the guest\n" and status.code == 0
    moderate_vm.client.write_file("/tmp/data.bin", bytes(range(256)) * 1000)
    assert moderate_vm.client.read_file("/tmp/data.bin") == bytes(range(256)) * 1000
    assert moderate_vm.client.stat("/tmp/data.bin").size == 256000


def test_workspace_is_a_private_copy(moderate_vm: Sandbox, vm_project: Path) -> None:
    out, _, code = sh(moderate_vm, "cat /workspace/hello.txt && echo changed > "
                                   "/workspace/hello.txt && cat /workspace/hello.txt")
    assert code == 0 and out == "hello from the host\nchanged\n"
    assert (vm_project / "hello.txt").read_text() == "hello from the host\n"


def test_moderate_cannot_reach_host_loopback(moderate_vm: Sandbox,
                                             loopback_server: int) -> None:
    # QEMU's user networking maps 10.0.2.2 to the loopback of its own network namespace;
    # ours is empty, so the host's 127.0.0.1 server must stay out of reach.
    out, _, _ = sh(moderate_vm, f"nc -w 3 10.0.2.2 {loopback_server} </dev/null; "
                                f"echo rc=$?")
    assert "host-loopback-secret" not in out
    out, _, _ = sh(moderate_vm, f"nc -w 3 127.0.0.1 {loopback_server} </dev/null; echo rc=$?")
    assert "host-loopback-secret" not in out
    out, _, _ = sh(moderate_vm, "ip -4 addr show eth0; ip route")
    assert "10.0.2.15" in out and "default via 10.0.2.2" in out


def test_restrictive_has_no_network(restrictive_vm: Sandbox, loopback_server: int) -> None:
    out, _, _ = sh(restrictive_vm, "ls /sys/class/net; ip route")
    assert out.split() == ["lo"]
    out, _, _ = sh(restrictive_vm, f"nc -w 2 10.0.2.2 {loopback_server} </dev/null; echo rc=$?")
    assert "host-loopback-secret" not in out


def test_restrictive_root_and_workspace_are_read_only(restrictive_vm: Sandbox) -> None:
    _, err, code = sh(restrictive_vm, "touch /etc/x")
    assert code != 0 and "Read-only" in err
    _, err, code = sh(restrictive_vm, "touch /workspace/x")
    assert code != 0 and "Read-only" in err
    out, _, code = sh(restrictive_vm, "echo ok > /tmp/x && cat /tmp/x")
    assert out == "ok\n"


def test_two_sandboxes_do_not_share_a_disk(moderate_vm: Sandbox,
                                           restrictive_vm: Sandbox) -> None:
    sh(moderate_vm, "echo from-a > /root/marker; echo from-a > /workspace/marker")
    out, _, _ = sh(restrictive_vm, "cat /root/marker /workspace/marker 2>&1")
    assert "from-a" not in out
    # Each guest mounted its own devices; the root disk is read-only in both.
    out, _, _ = sh(restrictive_vm, "grep ' / ' /proc/mounts")
    assert " ro," in out or " ro " in out


def test_guest_sees_only_its_own_processes(moderate_vm: Sandbox) -> None:
    out, _, _ = sh(moderate_vm, "ps -o pid,comm")
    assert "pytest" not in out and "qemu" not in out
    assert moderate_vm.client.hello().pid == 1


def test_killed_vmm_is_reported_promptly(vm_factory: Callable[..., Sandbox]) -> None:
    sandbox = vm_factory(f"vmtest-kill-{os.getpid()}", "restrictive")
    try:
        ex = sandbox.client.exec(["sleep", "300"])
        threading.Timer(0.5, lambda: os.kill(sandbox.process.pid, signal.SIGKILL)).start()
        start = time.monotonic()
        with pytest.raises(ProtocolError):
            ex.wait(60)
        assert time.monotonic() - start < 10
    finally:
        sandbox.destroy()
    assert not sandbox.scratch.exists()


def test_destroy_stops_the_vmm(vm_factory: Callable[..., Sandbox]) -> None:
    sandbox = vm_factory(f"vmtest-stop-{os.getpid()}", "restrictive")
    pid = sandbox.process.pid
    sandbox.destroy()
    assert sandbox.process.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_cli_run_uses_the_guest_kernel(microvm_ready: None, tmp_path: Path) -> None:
    from sandbox_helpers import ak

    res = ak("run", "--backend", "microvm", "--", "uname", "-r", cwd=tmp_path,
             env={"AGENTKERNEL_MICROVM_ALLOW_EMULATION": "1", "AGENTKERNEL_NO_DAEMON": "1"},
             timeout=180)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() and res.stdout.strip() != platform.release()


def test_unix_socket_is_the_only_channel(moderate_vm: Sandbox) -> None:
    # The agent channel is a unix socket in the sandbox's private scratch dir.
    sock = moderate_vm.scratch / "agent.sock"
    assert sock.is_socket() if hasattr(sock, "is_socket") else sock.exists()
    assert os.stat(moderate_vm.scratch).st_mode & 0o077 == 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        s.connect(str(sock))  # QEMU accepts, but the guest is already talking to us


def test_vmm_is_pid_1_of_its_own_namespaces(moderate_vm: Sandbox) -> None:
    """QEMU cannot see (so cannot signal or trace) a host process: it is pid 1 of its own
    pid namespace, with its own IPC and UTS namespaces; its network namespace is not ours."""
    children = Path(f"/proc/{moderate_vm.process.pid}/task/{moderate_vm.process.pid}/children")
    qemu = [int(p) for p in children.read_text().split()]
    assert len(qemu) == 1
    status = Path(f"/proc/{qemu[0]}/status").read_text()
    assert Path(f"/proc/{qemu[0]}/exe").resolve().name.startswith("qemu-system")
    nspid = next(line.split()[1:] for line in status.splitlines()
                 if line.startswith("NSpid:"))
    assert nspid[-1] == "1" and len(nspid) >= 2, nspid
    for ns in ("pid", "ipc", "uts", "net", "user"):
        assert os.readlink(f"/proc/{qemu[0]}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if os.geteuid() == 0:
        # Started by root, it runs as the nobody of an id range of its own (not the host's
        # nobody: test_redteam2_vmm_uid.py), without a capability or a supplementary group.
        uids, gids = fields["Uid"].split(), fields["Gid"].split()
        assert len(set(uids)) == 1 and len(set(gids)) == 1, status
        assert uids[0] != "65534" and int(uids[0]) > 65534, status
        assert fields["Groups"].strip() == ""
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapPrm"], 16) == 0, status
    assert fields["NoNewPrivs"].strip() == "1"
    # No path of ours is on its command line: it got every file as a descriptor.
    cmdline = Path(f"/proc/{qemu[0]}/cmdline").read_bytes()
    assert str(moderate_vm.scratch).encode() not in cmdline
