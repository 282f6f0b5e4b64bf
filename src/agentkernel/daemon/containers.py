"""Container engines (docker, podman): their containers outlive us in the engine."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from ..errors import AgentKernelError

if TYPE_CHECKING:
    from ..backends.container_engine import ContainerBackend


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


# Snapshots of container sandboxes: the engine's `commit` (an image in the engine's store,
# recorded as the snapshot's path); a restored sandbox's container is made from it.
ENGINE_SNAPSHOT_KEY = "engine_snapshot"


def _engine(backend: str) -> ContainerBackend | None:
    """Backend `backend` when it drives a container engine (docker, podman)."""
    from ..backends import get_backend
    from ..backends.container_engine import ContainerBackend

    engine = get_backend(backend)
    return engine if isinstance(engine, ContainerBackend) else None


def _engine_commit(backend: str, name: str, snap: str) -> str:
    from ..backends.container_engine import snapshot_ref

    engine = _engine(backend)
    assert engine is not None
    return snapshot_ref(engine.commit(name, snap))


def _engine_snapshot_rootfs(doc: dict[str, Any], rootfs: Any) -> Any:
    from ..backends.container_engine import snapshot_rootfs

    ref = doc.get(ENGINE_SNAPSHOT_KEY)
    return snapshot_rootfs(rootfs, ref) if ref else rootfs


def _engine_snapshot_remove(backend: str, path: str) -> bool:
    """Remove a snapshot's image from its engine; False when `path` is not one."""
    from ..backends.container_engine import remove_snapshot

    engine = _engine(backend)
    return engine is not None and remove_snapshot(engine, path)
