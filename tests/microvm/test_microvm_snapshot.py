"""Snapshots: one template VM is saved, two clones are restored from it (TCG here)."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel.agent.protocol import T, Tag, encode_tlvs
from agentkernel.backends.microvm import MicrovmBackend
from agentkernel.errors import AgentRequestError
from agentkernel.profiles import get_profile
from agentkernel.rootfs import host_rootfs
from agentkernel.sandbox import Sandbox, SandboxSpec
from agentkernel.vm import snapshot

pytestmark = pytest.mark.timeout(300)
SNAP = "AGENTKERNEL_MICROVM_SNAPSHOT"


def sh(sandbox: Sandbox, script: str) -> str:
    out, err, status = sandbox.client.exec(["sh", "-c", script]).wait(60)
    assert status.code == 0, err
    return out.decode()


@pytest.fixture(scope="module")
def clones(microvm_ready: None, vm_project: Path) -> Iterator[tuple[Sandbox, Sandbox]]:
    old = os.environ.get(SNAP)
    os.environ[SNAP] = "1"
    started: list[Sandbox] = []
    try:
        for i in range(2):
            spec = SandboxSpec(name=f"vmsnap-{os.getpid()}-{i}", profile=get_profile("moderate"),
                               rootfs=host_rootfs(), image="busybox", workspace=vm_project,
                               hostname=f"clone-{i}")
            started.append(MicrovmBackend().start(spec))
        yield started[0], started[1]
    finally:
        for sb in started:
            sb.destroy()
        if old is None:
            os.environ.pop(SNAP, None)
        else:
            os.environ[SNAP] = old


def test_clones_come_from_one_saved_template(clones: tuple[Sandbox, Sandbox]) -> None:
    a, b = clones
    assert all(any("snapshot" in n for n in sb.notes) for sb in clones)
    states = list(snapshot.snapshots_dir().glob(f"*{snapshot.STATE_SUFFIX}"))
    assert len(states) == 1
    for sb in clones:
        argv = Path(f"/proc/{sb.process.pid}/cmdline").read_bytes().split(b"\0")
        assert b"-incoming" in argv  # restored, not booted
    # Nothing read boot_id before the template was saved, and the kernel makes it on first
    # read, from the CRNG that CLONE reseeded: each clone gets its own.
    assert sh(a, "cat /proc/sys/kernel/random/boot_id") != \
        sh(b, "cat /proc/sys/kernel/random/boot_id")


def test_each_clone_has_its_own_identity(clones: tuple[Sandbox, Sandbox]) -> None:
    a, b = clones
    assert sh(a, "hostname").strip() == "clone-0"
    assert sh(b, "hostname").strip() == "clone-1"
    rand_a = sh(a, "head -c 32 /dev/urandom | od -An -tx1")
    rand_b = sh(b, "head -c 32 /dev/urandom | od -An -tx1")
    assert rand_a != rand_b
    for sb in clones:
        # The template's clock stopped when it was saved; CLONE set it from the host.
        assert abs(int(sh(sb, "date +%s")) - time.time()) < 30
        assert sb.client.hello().pid == 1


def test_clones_do_not_share_writes(clones: tuple[Sandbox, Sandbox], vm_project: Path) -> None:
    a, b = clones
    sh(a, "echo from-a > /root/marker; echo from-a > /workspace/marker")
    assert "from-a" not in sh(b, "cat /root/marker /workspace/marker 2>&1; true")
    # The project copy was mounted after the restore, in each clone separately.
    assert sh(b, "cat /workspace/hello.txt") == "hello from the host\n"
    assert "/workspace" in sh(b, "grep ' /workspace ' /proc/mounts")
    assert not (vm_project / "marker").exists()


def test_clone_request_rejects_hostile_input(clones: tuple[Sandbox, Sandbox]) -> None:
    a, _ = clones
    bad = [
        b"",  # no ENTROPY
        encode_tlvs([(Tag.ENTROPY, b"x" * 8)]),  # too little
        encode_tlvs([(Tag.ENTROPY, b"x" * 32), (Tag.HOSTNAME, b"bad name;rm")]),
        encode_tlvs([(Tag.ENTROPY, b"x" * 32), (Tag.HOSTNAME, b"a" * 65)]),
        encode_tlvs([(Tag.ENTROPY, b"x" * 32), (Tag.WALLCLOCK_NS, b"\1\2")]),
        encode_tlvs([(Tag.ENTROPY, b"x" * 32), (Tag.DISK, b"akwork:relative:rw")]),
        encode_tlvs([(Tag.ENTROPY, b"x" * 32), (Tag.DISK, b"akwork:/a/../etc:rw")]),
        encode_tlvs([(Tag.ENTROPY, b"x" * 32), (Tag.DISK, b"akwork:/x:rx")]),
        encode_tlvs([(Tag.ENTROPY, b"x" * 32)] + [(Tag.DISK, b"akwork:/w:ro")] * 9),
        struct.pack("<HI", Tag.ENTROPY, 1000) + b"short",  # TLV runs past the end
    ]
    for payload in bad:
        with pytest.raises(AgentRequestError):
            a.client._simple(T.CLONE, payload, "clone")
    # A missing disk is an error, not a hang; the VM keeps serving.
    with pytest.raises(AgentRequestError):
        a.client.clone_init(disks=[("nosuchdisk", "/mnt/x", True)])
    assert sh(a, "hostname").strip() == "clone-0"


def test_restored_moderate_clone_keeps_its_network_policy(clones: tuple[Sandbox, Sandbox],
                                                          loopback_server: int) -> None:
    # The template was saved from an empty network namespace; the clone runs where a
    # cold-booted moderate VM runs (behind slirp4netns, host loopback out of reach).
    a, _ = clones
    out = sh(a, f"nc -w 3 10.0.2.2 {loopback_server} </dev/null; echo rc=$?")
    assert "host-loopback-secret" not in out
    assert "default via 10.0.2.2" in sh(a, "ip route")
    assert sh(a, "cat /etc/resolv.conf") == "nameserver 10.0.2.3\n"


def test_a_state_qemu_cannot_load_is_discarded_and_rebuilt(
        clones: tuple[Sandbox, Sandbox], vm_project: Path) -> None:
    from agentkernel.errors import SandboxError

    (state,) = snapshot.snapshots_dir().glob(f"*{snapshot.STATE_SUFFIX}")
    state.write_bytes(b"not a QEMU migration stream")
    old = os.environ.get(SNAP)
    os.environ[SNAP] = "1"
    try:
        spec = SandboxSpec(name=f"vmsnap-bad-{os.getpid()}", profile=get_profile("moderate"),
                           rootfs=host_rootfs(), image="busybox", workspace=vm_project,
                           hostname="clone-x")
        with pytest.raises(SandboxError) as info:
            MicrovmBackend().start(spec)
        assert not state.exists(), str(info.value)
        sandbox = MicrovmBackend().start(spec)  # builds the template again
        try:
            assert sh(sandbox, "hostname").strip() == "clone-x"
            assert state.stat().st_size > 1 << 20
        finally:
            sandbox.destroy()
    finally:
        if old is None:
            os.environ.pop(SNAP, None)
        else:
            os.environ[SNAP] = old
