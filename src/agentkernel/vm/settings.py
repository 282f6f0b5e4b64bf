"""The [microvm] settings the backend runs with: config section, environment, defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

ENV_ALLOW_EMULATION = "AGENTKERNEL_MICROVM_ALLOW_EMULATION"
ENV_KERNEL = "AGENTKERNEL_MICROVM_KERNEL"
ENV_VMM = "AGENTKERNEL_MICROVM_VMM"
ENV_SNAPSHOT = "AGENTKERNEL_MICROVM_SNAPSHOT"


@dataclass(frozen=True)
class MicrovmSettings:
    allow_emulation: bool = False
    kernel: str | None = None  # a prepared kernel dir or an ELF vmlinux; None: what setup chose
    vmm: str = "auto"  # auto | qemu | firecracker
    boot_timeout: float = 60.0
    source: str = "defaults"
    snapshot: bool = False  # start VMs from a saved template VM instead of booting them


_configured: MicrovmSettings | None = None


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def configure(section: Any | None) -> None:
    """Use a config's [microvm] section (a MicrovmSection); None forgets it."""
    global _configured
    if section is None:
        _configured = None
        return
    _configured = _section_settings(section)


def current() -> MicrovmSettings:
    """Configured settings (configure(): the daemon's config, or config.configure_microvm_here
    for doctor and setup), with environment overrides on top. A run's own come from its
    plan (resolve()), never from here."""
    return with_env(_configured or MicrovmSettings(), os.environ)


def resolve(section: Any | None, env: Mapping[str, str]) -> MicrovmSettings:
    """A caller's settings: its config's [microvm] section under its environment (see
    planner.py), over this process's configured ones (the daemon's own [microvm], via
    configure()) where the caller has none: without a section of its own, or without a
    guest kernel named. No files read."""
    host = _configured or MicrovmSettings()
    if section is None:
        return with_env(host, env)
    base = _section_settings(section)
    if base.kernel is None and host.kernel is not None:
        base = replace(base, kernel=host.kernel)
    return with_env(base, env)


def _section_settings(section: Any) -> MicrovmSettings:
    return MicrovmSettings(
        allow_emulation=bool(getattr(section, "allow_emulation", False)),
        kernel=getattr(section, "kernel", None),
        vmm=str(getattr(section, "vmm", "auto") or "auto"),
        boot_timeout=float(getattr(section, "boot_timeout", 60.0) or 60.0),
        source="config",
        snapshot=bool(getattr(section, "snapshot", False)),
    )


def with_env(base: MicrovmSettings, env: Mapping[str, str]) -> MicrovmSettings:
    """`base` with the AGENTKERNEL_MICROVM_* variables of `env` on top."""
    allow = base.allow_emulation
    source = base.source
    snapshot = base.snapshot
    if env.get(ENV_SNAPSHOT) is not None:
        snapshot = _truthy(env[ENV_SNAPSHOT])
    flag = env.get(ENV_ALLOW_EMULATION)
    if flag is not None:
        allow = _truthy(flag)
        source = f"${ENV_ALLOW_EMULATION}"
    return MicrovmSettings(
        allow_emulation=allow,
        kernel=env.get(ENV_KERNEL) or base.kernel,
        vmm=env.get(ENV_VMM) or base.vmm,
        boot_timeout=base.boot_timeout,
        source=source,
        snapshot=snapshot,
    )


def doctor_lines() -> list[tuple[str, bool, str]]:
    """What `doctor` says about microVMs: the VMMs found and the accelerator they would use."""
    import shutil

    from .kernel import current_kernel
    from .qemu import cached_kvm_probe, qemu_binary

    settings = current()
    lines: list[tuple[str, bool, str]] = []
    qemu = qemu_binary()
    lines.append(("qemu", qemu is not None,
                  qemu or "qemu-system-x86_64 missing: apt install qemu-system-x86"))
    fc = shutil.which("firecracker")
    lines.append(("firecracker", fc is not None, fc or
                  "not on PATH (Debian has no package; microVMs use QEMU microvm)"))
    kernel = current_kernel(settings.kernel)
    lines.append(("guest kernel", kernel is not None,
                  f"{kernel.release} ({kernel.source}) at {kernel.vmlinux}" if kernel else
                  "not prepared: run `agentkernel setup --microvm`"))
    probe = cached_kvm_probe(Path(kernel.vmlinux)) if kernel else None
    if probe is not None:
        lines.append(("kvm boot probe", probe[0], probe[1]))
    lines.append(("microvm accel", settings.allow_emulation,
                  "TCG allowed (" + settings.source + ") when KVM cannot boot guests"
                  if settings.allow_emulation else
                  "TCG off ([microvm] allow_emulation = false): microVMs need a working KVM"))
    return lines
