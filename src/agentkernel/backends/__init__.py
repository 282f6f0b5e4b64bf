"""Isolation backends and the choice between them (`--backend`, config, `auto`)."""

from __future__ import annotations

from typing import NamedTuple

from ..errors import BackendUnavailable, UsageError
from .base import Backend, CallerOptions, Probe

BACKEND_NAMES = ("namespaces", "gvisor", "microvm", "docker", "podman", "wasm")
# `auto` after the microVM (decided by KVM and [microvm] settings): strongest first, each
# taken only once its functional probe passed. The container engines are never picked by
# `auto`: they share the host kernel like namespaces, and without a user namespace (Docker's
# default) the sandbox's root is host root; they are chosen by name (docs/backends.md).
AUTO_ORDER = ("gvisor", "namespaces")


def backend_class(name: str) -> type[Backend]:
    """The class of backend `name`: its facts (capabilities, clean-up) without an instance.
    Each is imported only when asked for; a new backend adds its branch here."""
    key = name.strip().lower()
    if key == "namespaces":
        from .namespaces import NamespacesBackend

        return NamespacesBackend
    if key == "gvisor":
        from .gvisor import GVisorBackend

        return GVisorBackend
    if key == "microvm":
        from .microvm import MicrovmBackend

        return MicrovmBackend
    if key == "docker":
        from .docker import DockerBackend

        return DockerBackend
    if key == "podman":
        from .podman import PodmanBackend

        return PodmanBackend
    if key == "wasm":
        from .wasm import WasmBackend

        return WasmBackend
    if key == "hyperlight":  # the original's name: Hyperlight where it can run, else wasm
        from .wasm import HyperlightBackend

        return HyperlightBackend
    raise UsageError(f"unknown backend {name!r}: choose auto, {', '.join(BACKEND_NAMES)}, "
                     "hyperlight")


def get_backend(name: str, options: CallerOptions | None = None) -> Backend:
    """Backend `name`, set up with a caller's settings when given (Backend.for_caller)."""
    backend = backend_class(name)()
    return backend.for_caller(options) if options is not None else backend


def by_strength() -> tuple[str, ...]:
    """Every backend's name, strongest isolation first (what `auto` prefers)."""
    return tuple(sorted(BACKEND_NAMES, key=lambda n: -backend_class(n).strength))


class Choice(NamedTuple):
    """The backend a run gets, the stronger ones `auto` passed over (and why), and a
    warning when a backend asked for by name failed its functional probe."""

    backend: Backend
    skipped: tuple[str, ...] = ()
    warning: str | None = None


def choose_backend(name: str) -> Backend:
    return choose(name).backend


def choose(name: str, options: CallerOptions | None = None) -> Choice:
    """Resolve `auto` to the strongest backend that works (functional probe, cached per
    backend version); a backend named explicitly is used whatever its probe said.
    `options`: the settings of the caller the run is planned for (planner.py)."""
    from .functional import cached, verdict

    if name.strip().lower() != "auto":
        backend = get_backend(name, options)
        probe = backend.probe()
        if not probe.ok:
            raise BackendUnavailable(f"backend {backend.name!r} is not available: {probe.detail}")
        seen = cached(backend)  # only what is known: an explicit choice never probes
        warning = None if seen is None or seen.ok else (
            f"backend {backend.name} failed its functional probe ({seen.detail}); "
            "using it because it was asked for")
        return Choice(backend, (), warning or backend.substitute)
    skipped: list[str] = []
    microvm, why = _auto_microvm(options)
    if microvm is not None:
        return Choice(microvm)
    if why:
        skipped.append(f"microvm skipped: {why}")
    for candidate in AUTO_ORDER:
        backend = get_backend(candidate, options)
        probe = backend.probe()
        if not probe.ok:
            skipped.append(f"{candidate} skipped: {probe.detail}")
            continue
        seen = verdict(backend)
        if seen.ok:
            return Choice(backend, tuple(skipped))
        skipped.append(f"{candidate} skipped: its functional probe failed: {seen.detail}; "
                       f"--backend {candidate} forces it")
    raise BackendUnavailable("no isolation backend works on this host: " + "; ".join(skipped))


def _auto_microvm(options: CallerOptions | None) -> tuple[Backend | None, str | None]:
    """`auto` takes a microVM only when KVM really boots guests here, or when the config
    allows emulation; the latter is announced on stderr, as it costs seconds per sandbox.
    Otherwise returns why not (None: microVMs are turned off)."""
    from ..vm.settings import current

    settings = options.microvm if options is not None and options.microvm else current()
    if settings.vmm == "none":
        return None, None
    backend = get_backend("microvm", options)
    probe = backend.probe()
    if not probe.ok:
        return None, probe.detail
    if "TCG" in backend.isolation:
        import sys

        print("agentkernel: auto picked the microvm backend under software emulation (TCG), "
              "because [microvm] allow_emulation is on: expect seconds per boot",
              file=sys.stderr)
    return backend, None


__all__ = ["AUTO_ORDER", "BACKEND_NAMES", "Backend", "CallerOptions", "Choice", "Probe",
           "backend_class", "by_strength", "choose", "choose_backend", "get_backend"]
