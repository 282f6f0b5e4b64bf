"""MicroVM fixtures: run `setup --microvm` once, boot as few guests as possible (TCG here)."""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agentkernel.backends.microvm import MicrovmBackend
from agentkernel.profiles import get_profile
from agentkernel.rootfs import host_rootfs
from agentkernel.sandbox import Sandbox, SandboxSpec
from sandbox_helpers import HostServers

ALLOW = "AGENTKERNEL_MICROVM_ALLOW_EMULATION"


@pytest.fixture(scope="session")
def microvm_ready() -> Iterator[None]:
    """Guest kernel + initramfs prepared by the real setup code; emulation allowed."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86 is not installed")
    old = os.environ.get(ALLOW)
    os.environ[ALLOW] = "1"
    from agentkernel.vm import setup

    rc = setup.main(argparse.Namespace(kernel_deb=None, vmlinux=None, force=False,
                                       no_kvm_probe=False))
    assert rc == 0, "agentkernel setup --microvm failed"
    yield
    if old is None:
        os.environ.pop(ALLOW, None)
    else:
        os.environ[ALLOW] = old


def start_vm(name: str, profile: str, workspace: Path | None = None) -> Sandbox:
    spec = SandboxSpec(name=name, profile=get_profile(profile), rootfs=host_rootfs(),
                       image="busybox", workspace=workspace)
    return MicrovmBackend().start(spec)


@pytest.fixture(scope="session")
def vm_factory(microvm_ready: None) -> Callable[..., Sandbox]:
    return start_vm


@pytest.fixture(scope="session")
def vm_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    proj = tmp_path_factory.mktemp("vmproject")
    (proj / "hello.txt").write_text("hello from the host\n")
    return proj


@pytest.fixture(scope="session")
def moderate_vm(microvm_ready: None, vm_project: Path,
                host_address_servers: HostServers) -> Iterator[Sandbox]:
    # After the suite's test host and its veth: the fence lists the host's addresses when a
    # sandbox starts (an address added later is fenced only if it is in a private range).
    sandbox = start_vm(f"vmtest-mod-{os.getpid()}", "moderate", vm_project)
    yield sandbox
    sandbox.destroy()


@pytest.fixture(scope="session")
def restrictive_vm(microvm_ready: None, vm_project: Path) -> Iterator[Sandbox]:
    sandbox = start_vm(f"vmtest-res-{os.getpid()}", "restrictive", vm_project)
    yield sandbox
    sandbox.destroy()
