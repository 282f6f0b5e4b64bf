"""Can KVM boot a standard (non-PVM) Linux guest here? Read from what the host shows."""

from __future__ import annotations

import os


def kvm_verdict() -> tuple[bool, str]:
    """(usable, why) from /dev/kvm, the loaded modules and the CPU flags (no guest booted)."""
    if not os.path.exists("/dev/kvm"):
        return (False, "/dev/kvm does not exist: no hardware virtualization")
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
    except OSError as exc:
        return (False, f"/dev/kvm cannot be opened: {exc.strerror}")
    modules = ""
    try:
        with open("/proc/modules") as f:
            modules = f.read()
    except OSError:
        pass
    # /proc/modules may be hidden in containers; /sys/module lists loaded modules too.
    if "kvm_pvm" in modules or os.path.isdir("/sys/module/kvm_pvm"):
        return (False,
                "/dev/kvm is PVM (module kvm_pvm): it runs only guests built for PVM, so a "
                "standard guest kernel cannot boot; microVMs would need software emulation")
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        pass
    if " vmx" not in flags and " svm" not in flags:
        return (False, "/dev/kvm opens but the CPU shows no vmx/svm flag "
                       "(nested or paravirtual KVM): a standard guest may not boot")
    return (True, "/dev/kvm opens and the CPU has hardware virtualization")
