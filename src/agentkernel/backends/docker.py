"""The `docker` backend: Docker Engine through its API socket (see container_engine).

Docker has no user namespace per container: without `userns-remap` (or a rootless engine)
a container's root is host root, whoever asks the engine (root or a `docker` group
member: the same thing). Such an engine is refused. With `userns-remap` every container's
ids are the engine's one remapped range (shared by all its containers); the project and
home dirs are shown through id-mapped mounts of that range, so root's files stay root's.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from ..errors import BackendUnavailable
from .container_engine import ContainerBackend, Ids
from .engine_http import EngineAPI

REMAP_HINT = ('enable userns-remap: put {"userns-remap": "default"} in /etc/docker/daemon.json '
              "and restart dockerd (or use rootless Docker, or the podman backend)")


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


class Mode(NamedTuple):
    """Who a Docker engine's containers are on the host."""

    kind: str  # "remap" (userns-remap), "rootless", or "root" (refused)
    uid: int = -1  # remap: the host ids the containers' 0..size-1 are
    gid: int = -1
    size: int = 0


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

    def mode(self) -> Mode:
        return engine_mode(self.api())

    def root_uid(self) -> int | None:
        mode = self.mode()
        return mode.uid if mode.kind == "remap" else None

    def claim_ids(self, existing: dict[str, Any] | None) -> Ids | None:
        """The engine's remapped range (no lock: it is the engine's, not ours to share
        out); refused outright when the containers' root would be host root."""
        from ..idmap import HostRange

        mode = self.mode()
        if mode.kind == "root":
            raise BackendUnavailable(
                "the docker engine runs containers as host root (no user namespace): "
                f"refused; {REMAP_HINT}")
        if mode.kind == "rootless":
            return None
        return Ids(HostRange(mode.uid, mode.gid, mode.size), -1)

    def forget_engine(self) -> None:
        forget_mode(self.api())

    def probe(self, deep: bool = False) -> Any:
        from .base import Probe

        found = super().probe(deep)
        if not deep or not found.ok:
            return found
        ok = self.mode().kind != "root"
        return Probe(ok, found.detail)

    def engine_processes(self) -> list[int]:
        """Rootless: the API socket's listener, then RootlessKit's child (dockerd runs in
        its user and mount namespaces)."""
        from ..paths import read_pid

        xdg = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
        return [*super().engine_processes(),
                read_pid(Path(xdg) / "dockerd-rootless" / "child_pid")]

    def root_note(self) -> str:
        mode = self.mode()
        if mode.kind == "rootless":
            return "rootless Docker: the sandbox's root is the engine's user (user namespace)"
        if mode.kind == "remap":
            return (f"userns-remap: the sandbox's root is host uid {mode.uid} (a range of "
                    f"{mode.size} ids every container of this engine shares)")
        return (f"the sandbox's root would be host root (no userns-remap): refused; "
                f"{REMAP_HINT}")


_MODES: dict[tuple[str, int, int, int], Mode] = {}
MODE_FILE = "docker-mode.json"  # in our runtime dir: the last engine's mode, by socket


def _mode_key(path: str) -> tuple[str, int, int, int]:
    """Which engine a socket is: its path, and the identity of the socket file (a restarted
    dockerd makes a new one, and may run with another setting)."""
    try:
        st = os.stat(path)
    except OSError:
        return (path, 0, 0, 0)
    return (path, st.st_dev, st.st_ino, st.st_ctime_ns)


def engine_mode(api: EngineAPI) -> Mode:
    """Rootless, remapped or root: from the engine's /info (~10-90 ms: it counts every
    container and image), remembered per socket file in this process and, for the next
    CLI process, in our runtime dir. A stale answer cannot make a sandbox host root:
    every start checks the host uid its agent runs as (ContainerBackend.check_root) and
    forgets the mode when it is not the expected one."""
    key = _mode_key(api.path)
    mode = _MODES.get(key)
    if mode is None:
        mode = _load_mode(key)
        if mode is None:
            mode = _mode(api.call("GET", "/info", timeout=10))
            _store_mode(key, mode)
        _MODES[key] = mode
    return mode


def forget_mode(api: EngineAPI) -> None:
    """Drop what we remember of the engine's mode: the next start asks it again."""
    _MODES.pop(_mode_key(api.path), None)
    with contextlib.suppress(OSError):
        _mode_file().unlink()


def _mode_file() -> Path:
    from ..paths import runtime_dir

    return runtime_dir() / MODE_FILE


def _load_mode(key: tuple[str, int, int, int]) -> Mode | None:
    if key[1:] == (0, 0, 0):
        return None
    try:
        with open(_mode_file(), encoding="utf-8") as f:
            doc = json.loads(f.read(4096))
        if tuple(doc["key"]) != key:
            return None
        kind, uid, gid, size = doc["mode"]
        if kind not in ("remap", "rootless", "root"):
            return None
        return Mode(str(kind), int(uid), int(gid), int(size))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store_mode(key: tuple[str, int, int, int], mode: Mode) -> None:
    if key[1:] == (0, 0, 0):
        return
    with contextlib.suppress(OSError):
        path = _mode_file()
        tmp = path.with_name(f".{MODE_FILE}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"key": list(key), "mode": list(mode)}, f)
        os.replace(tmp, path)


def _mode(info: dict[str, Any]) -> Mode:
    options = [str(o) for o in info.get("SecurityOptions") or []]
    if any("name=rootless" in o for o in options):
        return Mode("rootless")
    if not any("name=userns" in o for o in options):
        return Mode("root")
    # With userns-remap, dockerd keeps its data in `<root>/<uid>.<gid>`.
    tail = str(info.get("DockerRootDir", "")).rstrip("/").rsplit("/", 1)[-1]
    uid, _, gid = tail.partition(".")
    if not (uid.isdigit() and gid.isdigit()):
        return Mode("root")  # not a layout we know: assume the worst
    return Mode("remap", int(uid), int(gid), _remap_size(int(uid)))


def _remap_size(start: int) -> int:
    """How many ids the remapped range has: the /etc/subuid entry starting at `start`
    (dockerd takes the first of its user's; 65536 when not found)."""
    try:
        with open("/etc/subuid") as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[1] == str(start) and parts[2].isdigit():
                    return min(int(parts[2]), 65536)
    except OSError:
        pass
    return 65536
