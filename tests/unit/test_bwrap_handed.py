"""The namespaces backend's bwrap command line when the agent, its seccomp program and the
device nodes come as descriptors (pure), and the agent's sealed copy (agent_image)."""

from __future__ import annotations

import fcntl
import itertools
import os
import sys
from pathlib import Path

import pytest

from agentkernel.backends.namespaces import DEVICES, agent_image, build_bwrap_argv
from agentkernel.profiles import get_profile
from agentkernel.rootfs import host_rootfs
from agentkernel.sandbox import SandboxSpec


def _spec(profile: str) -> SandboxSpec:
    return SandboxSpec(name="t", profile=get_profile(profile), rootfs=host_rootfs(),
                       image="host")


@pytest.mark.parametrize("profile", ["permissive", "moderate", "restrictive"])
def test_handed_agent_is_execd_from_its_fd_and_nothing_is_bound_for_it(profile: str) -> None:
    argv = build_bwrap_argv("bwrap", _spec(profile), 7, 8, resolv=None, info_fd=-1,
                            handed=True)
    agent = argv[argv.index("--") + 1:]
    assert agent[:3] == ["/proc/self/fd/7", "--exec-fd", "7"]
    assert agent[agent.index("--seccomp-fd") + 1] == "8" and "--seccomp" not in agent
    assert "--ro-bind-data" not in argv and "/run/ak/agent" not in argv
    assert ("--dir", "/run/ak") in itertools.pairwise(argv)  # (where binds land)
    assert "--dev" in argv  # no device nodes handed: bwrap still makes /dev


@pytest.mark.parametrize("profile", ["permissive", "moderate", "restrictive"])
def test_handed_devices_make_the_agent_build_dev(profile: str) -> None:
    """The same /dev as bwrap's --dev plus our remount and sized /dev/shm: read-only, the
    six nodes, /dev/shm at the memory cap."""
    devices = {name: 20 + i for i, name in enumerate(DEVICES)}
    argv = build_bwrap_argv("bwrap", _spec(profile), 7, 8, resolv=None, info_fd=-1,
                            handed=True, devices=devices)
    bwrap, agent = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    assert "--dev" not in bwrap and "/dev/shm" not in bwrap
    assert ("--dir", "/dev") in itertools.pairwise(bwrap)
    mem = get_profile(profile).memory_mb
    assert agent[agent.index("--make-dev") + 1] == str(mem * 1024 * 1024 if mem else 0)
    attached = {agent[i + 1] for i, a in enumerate(agent) if a == "--attach"}
    assert {f"{fd}:/dev/{name}" for name, fd in devices.items()} <= attached
    own = agent[agent.index("--guard-unix") + 1].split(":")
    assert {"/dev", "/dev/shm"} <= set(own)


def test_agent_image_is_a_sealed_copy(tmp_path: Path) -> None:
    src = tmp_path / "agent"
    src.write_bytes(Path(sys.executable).read_bytes()[:100_000])
    fd = agent_image(str(src))
    assert fd is not None
    assert agent_image(str(src)) == fd  # one per version, kept
    assert os.pread(fd, 100_001, 0) == src.read_bytes()
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    for seal in (fcntl.F_SEAL_WRITE, fcntl.F_SEAL_GROW, fcntl.F_SEAL_SHRINK, fcntl.F_SEAL_SEAL):
        assert seals & seal
    with pytest.raises(OSError):
        os.pwrite(fd, b"x", 0)
    assert not os.get_inheritable(fd)


@pytest.mark.parametrize("profile", ["permissive", "moderate", "restrictive"])
def test_a_read_only_root_is_made_so_by_the_agent(profile: str) -> None:
    """After its own mounts (tests/test_escape.py: the restrictive root is read-only)."""
    argv = build_bwrap_argv("bwrap", _spec(profile), "/agent", "/bpf", resolv=None,
                            info_fd=-1)
    bwrap, agent = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    assert ("--root-ro" in agent) == (not get_profile(profile).root_writable)
    assert ("--remount-ro", "/") not in itertools.pairwise(bwrap)


def test_the_agent_copy_is_sealed_against_changes_of_its_content_and_mode() -> None:
    from agentkernel.backends.namespaces import _F_SEAL_EXEC, _seal_copy

    st = os.stat(sys.executable)
    fd = _seal_copy(sys.executable, (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
    assert fd is not None
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        want = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
        assert seals & want == want
        if seals & _F_SEAL_EXEC:  # (a kernel that has it: 6.3 on)
            with pytest.raises(PermissionError):
                os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
