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
        raise BackendUnavailable(
            "the microvm backend is not available yet: this build has no microVM support "
            "(see `agentkernel doctor`)"
        )
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
    for candidate in ("gvisor", "namespaces"):
        backend = get_backend(candidate)
        probe = backend.probe()
        if probe.ok:
            return backend
        reasons.append(f"{candidate}: {probe.detail}")
    raise BackendUnavailable("no isolation backend works on this host: " + "; ".join(reasons))


__all__ = ["BACKEND_NAMES", "Backend", "Probe", "choose_backend", "get_backend"]
