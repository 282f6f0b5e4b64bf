"""The `docker` backend: Docker Engine through its API socket (see container_engine)."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any, ClassVar

from .container_engine import ContainerBackend


def docker_socket() -> str | None:
    """$DOCKER_HOST when it names a unix socket, else the standard one, if it exists."""
    host = os.environ.get("DOCKER_HOST", "")
    if host.startswith("unix://"):
        path = host.removeprefix("unix://")
        return path if os.path.exists(path) else None
    if host:  # tcp:// or ssh://: not spoken here (a socket on another machine)
        return None
    for path in ("/var/run/docker.sock", "/run/docker.sock"):
        if os.path.exists(path):
            return path
    return None


class DockerBackend(ContainerBackend):
    name = "docker"
    engine = "docker"
    # The engine keeps the agent's fatal messages, but no more than this.
    host_config_extra: ClassVar[dict[str, Any]] = {
        "LogConfig": {"Type": "json-file", "Config": {"max-size": "1m", "max-file": "1"}}}

    def socket_path(self) -> str | None:
        return docker_socket()

    def missing_hint(self) -> str:
        return ("no Docker engine socket (/var/run/docker.sock or DOCKER_HOST=unix://…): "
                "apt install docker.io and start dockerd")

    def root_uid(self) -> int | None:
        return _remapped_root(self.api().path)


@lru_cache(maxsize=4)
def _remapped_root(path: str) -> int | None:
    """With `userns-remap`, dockerd keeps its data in `<root>/<uid>.<gid>` and the container's
    root is that uid; without it the container's root is host root."""
    from .engine_http import EngineAPI

    info = EngineAPI(path, what="docker").call("GET", "/info", timeout=10)
    if not any("name=userns" in str(opt) for opt in info.get("SecurityOptions") or []):
        return None
    tail = str(info.get("DockerRootDir", "")).rstrip("/").rsplit("/", 1)[-1]
    uid, _, _ = tail.partition(".")
    return int(uid) if uid.isdigit() else None
