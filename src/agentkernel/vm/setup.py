"""`agentkernel setup --microvm`: prepare the guest kernel and initramfs, probe the accelerator."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AgentKernelError

if TYPE_CHECKING:
    from . import kernel as k


def main(args: argparse.Namespace) -> int:
    """Prepare everything a microVM needs; prints what it did. Returns an exit status."""
    from . import kernel as k  # heavy: only when setup really runs

    out = sys.stdout
    start = time.monotonic()
    try:
        if getattr(args, "vmlinux", None):
            info = _custom_vmlinux(Path(args.vmlinux))
        else:
            deb = getattr(args, "kernel_deb", None)
            info = k.prepare_debian_cloud(force=bool(getattr(args, "force", False)),
                                          deb=Path(deb) if deb else None)
        k.select(info)
        print(f"guest kernel: {info.release} ({info.source} {info.package_version}) "
              f"-> {info.vmlinux}", file=out)
        if info.modules:
            print(f"  modules loaded at boot: {', '.join(info.modules)}", file=out)
        from .initramfs import ensure_initramfs

        initrd = ensure_initramfs(info)
        print(f"initramfs: {initrd} ({initrd.stat().st_size // 1024} KiB, our agent as /init)",
              file=out)
        from ..rootfs import host_rootfs
        from .disk import ensure_root_image

        image, desc = ensure_root_image(host_rootfs())
        print(f"base root disk: {image} ({desc})", file=out)
        from .qemu import qemu_binary

        if qemu_binary() is None:
            print("warning: QEMU is missing: apt install qemu-system-x86", file=out)
        elif not getattr(args, "no_kvm_probe", False):
            from ..backends.microvm_guest import choose_accel
            from ..config import configure_microvm_here
            from .settings import current

            configure_microvm_here()

            accel, why = choose_accel(current(), deep=True, kernel=Path(info.vmlinux),
                                      initrd=initrd, modules=info.modules)
            print(f"accelerator: {accel or 'none'}: {why}", file=out)
        print(f"done in {time.monotonic() - start:.1f} s", file=out)
        return 0
    except AgentKernelError as exc:
        print(f"agentkernel setup --microvm: {exc.message}", file=sys.stderr)
        return 1


def _custom_vmlinux(path: Path) -> k.KernelInfo:
    from . import kernel as k

    path = path.expanduser().resolve()
    if not path.is_file() or not k.is_elf(path):
        raise k.KernelError(f"{path} is not an ELF vmlinux")
    import hashlib

    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    dest = k.kernels_dir() / f"custom-{digest}"
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / "vmlinux"
    if not target.exists():
        shutil.copyfile(path, target)
    info = k.KernelInfo(release=f"custom-{digest}", source="minimal", package_version=digest,
                        vmlinux=str(target), modules=[], module_dir=str(dest))
    info.save()
    return info

