"""What the QEMU and Firecracker microVM backends share: guest sizes, disk serials, the
guest's kernel modules and the choice of accelerator (KVM, or TCG when allowed)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from ..vm import qemu as q
from ..vm.settings import ENV_ALLOW_EMULATION, MicrovmSettings

VMM_MEMORY_OVERHEAD_MB = 160  # QEMU's own memory on top of the guest's, for the host cgroup
DEFAULT_MEMORY_MB = 512
GUEST_MIN_MEMORY_MB = 128  # the cloud kernel with its modules wants this much to boot
ROOT_SERIAL = "akroot"
LAYER_SERIAL = "akrw"  # a per-VM ext4 writable layer (agent --rw akrw), for stop/start
WORKSPACE_SERIAL = "akwork"
NET_MODULES = frozenset({"failover", "net_failover", "virtio_net"})
VSOCK_MODULES = frozenset({"vsock", "vmw_vsock_virtio_transport_common",
                           "vmw_vsock_virtio_transport"})


@lru_cache(maxsize=1)
def _verdict() -> tuple[bool, str]:
    from ..vm.kvm import kvm_verdict

    return kvm_verdict()


def module_args(modules: list[str], *, net: bool, vsock: bool = False) -> list[str]:
    """One --insmod with every module the guest needs (network/vsock drivers only if used)."""
    from ..vm.initramfs import MODULE_DIR

    skip: set[str] = set()
    if not net:
        skip |= NET_MODULES
    if not vsock:
        skip |= VSOCK_MODULES
    paths = [f"{MODULE_DIR}/{name}.ko" for name in modules if name not in skip]
    return ["--insmod", ",".join(paths)] if paths else []


def choose_accel(settings: MicrovmSettings, *, deep: bool = False,
                 kernel: Path | None = None, initrd: Path | None = None,
                 modules: list[str] | None = None) -> tuple[q.Accel | None, str]:
    """KVM if a standard guest really boots under it, else TCG only if allowed.

    The quick path trusts the host's signs (no /dev/kvm, PVM, no vmx/svm) and a cached boot
    probe; `deep` (doctor, setup) boots a guest under KVM once and caches the answer.
    """
    kvm_ok, kvm_detail = _verdict()
    if kvm_ok and kernel is not None:
        cached = q.cached_kvm_probe(kernel)
        if cached is None and initrd is not None:
            cached = q.probe_kvm_boot(kernel, initrd, module_args(modules or [], net=False))
        if cached is not None:
            kvm_ok, kvm_detail = cached
    elif deep and kernel is not None and initrd is not None and os.path.exists("/dev/kvm"):
        # The signs say no; a deep probe boots once anyway, so doctor reports what happened.
        ok, detail = q.cached_kvm_probe(kernel) or q.probe_kvm_boot(
            kernel, initrd, module_args(modules or [], net=False))
        kvm_ok, kvm_detail = ok, f"{kvm_detail}; boot probe: {detail}"
    if kvm_ok:
        return "kvm", kvm_detail
    if settings.allow_emulation:
        return "tcg", (f"software emulation (TCG), allowed by {settings.source}: {kvm_detail}. "
                       "Expect seconds per boot, not milliseconds")
    return None, (f"{kvm_detail}; software emulation is off (set [microvm] allow_emulation = "
                  f"true or {ENV_ALLOW_EMULATION}=1 to use TCG)")
