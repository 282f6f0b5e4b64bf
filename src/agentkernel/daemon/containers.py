"""Container engines (docker, podman): their containers outlive us in the engine."""

from __future__ import annotations

import contextlib

from ..errors import AgentKernelError


# --- container engines (docker, podman): their containers outlive us in the engine ---------
def _remove_container(backend: str, name: str) -> None:
    """A removed sandbox's container (and its layer) goes from the engine too."""
    from ..backends import get_backend
    from ..backends.container_engine import ContainerBackend

    engine = get_backend(backend)
    if isinstance(engine, ContainerBackend):
        engine.remove_container(name)


def _sweep_containers(known: set[str]) -> list[str]:
    """What a dead daemon left in the engines: its pool's containers, and the containers of
    persistent sandboxes no longer recorded. Engines that are not running are skipped."""
    from ..backends import BACKEND_NAMES, get_backend
    from ..backends.container_engine import ContainerBackend

    out = []
    for name in BACKEND_NAMES:
        engine = get_backend(name)
        if not isinstance(engine, ContainerBackend) or engine.socket_path() is None:
            continue
        with contextlib.suppress(AgentKernelError):
            out += [f"removed {name} container of {gone}" for gone in engine.sweep(known)]
    return out
