"""Isolation backends and the choice between them (`--backend`, config, `auto`)."""

from __future__ import annotations

from ..errors import BackendUnavailable, UsageError
from .base import Backend, Probe

BACKEND_NAMES = ("namespaces", "gvisor", "microvm")


def get_backend(name: str) -> Backend:
    key = name.strip().lower()
    if key == "namespaces":
        from .namespaces import NamespacesBackend

        return NamespacesBackend()
    if key == "gvisor":
        from .gvisor import GVisorBackend

        return GVisorBackend()
    if key == "microvm":
        from .microvm import MicrovmBackend

        return MicrovmBackend()
    raise UsageError(f"unknown backend {name!r}: choose auto, {', '.join(BACKEND_NAMES)}")


def choose_backend(name: str) -> Backend:
    """Resolve `auto` to the strongest backend whose probe passes; never silently downgrade."""
    if name.strip().lower() != "auto":
        backend = get_backend(name)
        probe = backend.probe()
        if not probe.ok:
            raise BackendUnavailable(f"backend {backend.name!r} is not available: {probe.detail}")
        return backend
    reasons = []
    microvm = _auto_microvm()
    if microvm is not None:
        return microvm
    for candidate in ("gvisor", "namespaces"):
        backend = get_backend(candidate)
        probe = backend.probe()
        if probe.ok:
            return backend
        reasons.append(f"{candidate}: {probe.detail}")
    raise BackendUnavailable("no isolation backend works on this host: " + "; ".join(reasons))


def _auto_microvm() -> Backend | None:
    """`auto` takes a microVM only when KVM really boots guests here, or when the config
    allows emulation; the latter is announced on stderr, as it costs seconds per sandbox."""
    from ..vm.settings import current

    if current().vmm == "none":
        return None
    backend = get_backend("microvm")
    probe = backend.probe()
    if not probe.ok:
        return None
    if "TCG" in backend.isolation:
        import sys

        print("agentkernel: auto picked the microvm backend under software emulation (TCG), "
              "because [microvm] allow_emulation is on: expect seconds per boot",
              file=sys.stderr)
    return backend


__all__ = ["BACKEND_NAMES", "Backend", "Probe", "choose_backend", "get_backend"]
