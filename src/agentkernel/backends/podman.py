"""The `podman` backend: Podman through its Docker-compatible API service (see
container_engine), rootful or rootless; the service is started for us when none runs."""

from __future__ import annotations

import os
import subprocess
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailable
from ..paths import which
from ..sandbox import SandboxSpec
from .container_engine import ContainerBackend, Mounts
from .engine_http import EngineAPI

SERVICE_IDLE = 600  # seconds our own `podman system service` lingers unused


def _ulimits() -> list[dict[str, Any]]:
    """runc fails under Podman's default rlimits where they exceed the host's hard limits
    (raising one needs a capability the container's user namespace lacks): ours, capped."""
    import resource

    out = []
    # The service's own hard limits may be lower than ours (seen: nproc 32768 against our
    # 96555), and are not ours to read: stay well below any plausible one.
    for name, res, want in (("nofile", resource.RLIMIT_NOFILE, 20000),
                            ("nproc", resource.RLIMIT_NPROC, 4096)):
        hard = resource.getrlimit(res)[1]
        hard = want if hard == resource.RLIM_INFINITY else min(hard, want)
        out.append({"Name": name, "Soft": min(hard, 1024 if name == "nofile" else hard),
                    "Hard": hard})
    return out


def _candidates() -> list[str]:
    out = []
    host = os.environ.get("CONTAINER_HOST", "")
    if host.startswith("unix://"):
        out.append(host.removeprefix("unix://"))
    if os.geteuid() == 0:
        out.append("/run/podman/podman.sock")
    else:
        xdg = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
        out.append(f"{xdg}/podman/podman.sock")
    out.append(str(_own_socket()))
    return out


def _own_socket() -> Path:
    from ..paths import runtime_dir

    return runtime_dir() / "podman.sock"  # private: our runtime dir is 0700


def _answers(path: str) -> bool:
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        return False
    finally:
        sock.close()
    return True


class PodmanBackend(ContainerBackend):
    name = "podman"
    engine = "podman"
    tmpfs_extra = ",notmpcopyup"

    @property
    def host_config_extra(self) -> dict[str, Any]:  # type: ignore[override]
        extra: dict[str, Any] = {"Ulimits": _ulimits()}
        if os.geteuid() == 0 and _auto_userns():
            # Rootful: a fresh unprivileged id range per container (/etc/subuid's
            # `containers` entry), so the sandbox's root is not host root.
            extra["UsernsMode"] = "auto"
        return extra

    def socket_path(self) -> str | None:
        for path in _candidates():
            if os.path.exists(path) and _answers(path):
                return path
        return None

    def ensure_socket(self) -> str:
        path = self.socket_path()
        if path is not None:
            return path
        podman = which("podman")
        if podman is None:
            raise BackendUnavailable(self.missing_hint())
        own = _own_socket()
        own.unlink(missing_ok=True)
        # Not per exec: one service, which exits by itself after SERVICE_IDLE unused.
        with open(own.with_suffix(".log"), "ab") as log:
            proc = subprocess.Popen([podman, "system", "service", f"--time={SERVICE_IDLE}",
                                     f"unix://{own}"], stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=log, start_new_session=True, close_fds=True)
        own.with_suffix(".pid").write_text(str(proc.pid))  # for whoever must stop it
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if own.exists() and _answers(str(own)):
                return str(own)
            time.sleep(0.02)
        raise BackendUnavailable(f"podman system service did not start (see {own}.log)")

    def probe(self, deep: bool = False) -> Any:
        from .base import Probe

        if not deep and which("podman") is None and self.socket_path() is None:
            return Probe(False, self.missing_hint())
        if not deep or self.socket_path() is None:  # doctor starts no service
            return Probe(True, (self.socket_path() or "podman (its API service starts on "
                                "first use)") + f"; {self.root_note()}")
        return super().probe(deep)

    def missing_hint(self) -> str:
        return "podman is not installed: apt install podman"

    def overlay_mount(self, m: Mounts, spec: SandboxSpec, src: str, upper: Path,
                      work: Path) -> None:
        """Not yet: through the compatible API Podman's local volume driver ignores overlay
        options (the volume comes up empty), and its own `:O` bind fails under
        --userns=auto on this build. The project is shown read-only instead (said so)."""
        m.bind(src, "/workspace", read_only=True)
        m.notes.append("copy-on-write workspace not available on podman yet: read-only")

    def container_root(self, api: EngineAPI, cid: str) -> int | None:
        """--userns=auto picks the range when the container is created: ask (the libpod
        API has it; the compatible one does not). Rootless: root is the calling user."""
        if os.geteuid() != 0 or not _auto_userns():
            return None
        doc = api.call("GET", f"/libpod/containers/{cid}/json", timeout=10)
        maps = ((doc.get("HostConfig") or {}).get("IDMappings") or {}).get("UidMap") or []
        for entry in maps:
            inside, host, _ = [*str(entry).split(":"), "", ""][:3]
            if inside == "0" and host.isdigit():
                return int(host)
        return None

    def root_note(self) -> str:
        if os.geteuid() != 0:
            return ("rootless: the sandbox's root is your own uid (a user namespace); "
                    "other ids come from /etc/subuid")
        if _auto_userns():
            return "the sandbox's root is an unprivileged host uid (--userns=auto)"
        return ("the sandbox's root is host root (no `containers` entry in /etc/subuid for "
                "--userns=auto; no capabilities, no_new_privs, seccomp)")


@lru_cache(maxsize=1)
def _auto_userns() -> bool:
    """Rootful `--userns=auto` needs /etc/subuid and /etc/subgid entries for `containers`."""
    try:
        return all(any(line.split(":")[0] == "containers" for line in
                       Path(f).read_text().splitlines()) for f in ("/etc/subuid", "/etc/subgid"))
    except OSError:
        return False
