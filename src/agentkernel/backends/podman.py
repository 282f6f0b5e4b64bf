"""The `podman` backend: Podman through its API service (see container_engine), rootful or
rootless; the service is started for us when none runs.

Containers are created through Podman's own API (`/libpod/containers/create`): the
Docker-compatible one cannot say which host ids a container's user namespace maps to.
Started by root, each container gets an id range of ours (`idmap.allocate`), locked for as
long as it lives, so its root is never host root and no two sandboxes share a host id.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailable
from ..paths import which
from ..profiles import PTY_MAX
from ..sandbox import SandboxSpec
from .container_engine import LABEL_IDS, ContainerBackend, Ids, Mounts
from .engine_http import EngineAPI

# /proc paths Podman makes read-only by itself (containers.conf's defaults).
PODMAN_READONLY = ("/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                   "/proc/sysrq-trigger")
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

    def claim_ids(self, existing: dict[str, Any] | None) -> Ids | None:
        """Rootful: a range of ours for a new container; an existing one's own range (its
        map is fixed when it is created), locked again. Rootless: Podman's user namespace
        of the caller's ids (None)."""
        from ..idmap import RANGE_SIZE, HostRange, allocate, take

        if os.geteuid() != 0:
            return None
        if existing is None:
            rng, lock = allocate()
            return Ids(rng, lock)
        label = ((existing.get("Config") or {}).get("Labels") or {}).get(LABEL_IDS, "")
        uid, _, gid = str(label).partition(":")
        if not (uid.isdigit() and gid.isdigit()):
            from ..errors import SandboxError

            raise SandboxError(f"container {existing.get('Name', '?')} has no host id range "
                               "of ours (made by an older agentkernel?): remove the sandbox")
        rng = HostRange(int(uid), int(gid), RANGE_SIZE)
        return Ids(rng, take(rng))

    def create_container(self, api: EngineAPI, name: str, body: dict[str, Any],
                         ids: Ids | None) -> str:
        doc = api.call("POST", "/libpod/containers/create", body=specgen(name, body, ids),
                       expect=(201,), timeout=60)
        return str(doc["Id"])

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
        # Not per exec: one service, which exits by itself after SERVICE_IDLE unused. Its
        # working dir is /, not the caller's (the project): conmon writes its `oom` file
        # into its own, which is the service's.
        with open(own.with_suffix(".log"), "ab") as log:
            proc = subprocess.Popen([podman, "system", "service", f"--time={SERVICE_IDLE}",
                                     f"unix://{own}"], stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=log, start_new_session=True, close_fds=True,
                                    cwd="/")
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
        if not deep:  # (on every run: nothing more than needed to pick the backend)
            return Probe(True, self.socket_path() or "podman")
        if self.socket_path() is None:  # doctor starts no service
            return Probe(True, f"podman (its API service starts on first use); "
                               f"{self.root_note()}")
        return super().probe(deep)

    def missing_hint(self) -> str:
        return "podman is not installed: apt install podman"

    def engine_limits(self) -> bool:
        """Rootless Podman sets no cgroup limits on cgroup v1, nor on v2 without a
        delegated (systemd) cgroup: the rlimit floor is kept for an ordinary user."""
        return os.geteuid() == 0

    def host_overlay(self) -> bool:
        """Rootful: we mount the overlay (its lower the project's id-mapped view, so the
        sandbox's root owns what host root owns), nosuid and nodev; runc would mount
        Podman's overlay volume inside the container's user namespace, which cannot
        reach our private (0700) dirs."""
        return os.geteuid() == 0

    def overlay_mount(self, m: Mounts, spec: SandboxSpec, src: str, upper: Path,
                      work: Path) -> None:
        """Rootless: Podman's own overlay volume (`-v SRC:/workspace:O,upperdir=…,
        workdir=…`), its upper and work dirs ours, mounted in the user's namespace."""
        m.mounts.append({"Type": "overlay", "Source": src, "Target": spec.workspace_at,
                         "Upper": str(upper), "Work": str(work)})

    def engine_processes(self) -> list[int]:
        """Rootless: the API service's listener, then Podman's pause process (whose user
        and mount namespaces every rootless podman process joins)."""
        from ..paths import read_pid

        xdg = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
        return [*super().engine_processes(),
                read_pid(Path(xdg) / "libpod" / "tmp" / "pause.pid")]

    def root_note(self) -> str:
        if os.geteuid() != 0:
            return ("rootless: the sandbox's root is your own uid (a user namespace); "
                    "other ids come from /etc/subuid")
        from ..idmap import host_range

        block = host_range()
        return (f"the sandbox's root is an unprivileged host uid: each sandbox gets its own "
                f"range of 65536 ids from {block.uid} (user namespace; never host root, "
                "no two sandboxes share one)")


def _seccomp_file(options: list[str]) -> Path:
    """The profile create_body asked for (`seccomp=JSON`), as the file Podman wants."""
    from .container_seccomp import profile_file, profile_json

    for profile in ("permissive", "moderate", "restrictive"):
        if f"seccomp={profile_json(profile)}" in options:
            return profile_file(profile)
    raise ValueError("podman: no seccomp profile of ours in the create request")


def specgen(name: str, body: dict[str, Any], ids: Ids | None) -> dict[str, Any]:
    """Podman's create request (its SpecGenerator) for a Docker-form `body`."""
    host = body["HostConfig"]
    mounts: list[dict[str, Any]] = []
    overlays: list[dict[str, Any]] = []
    for m in host["Mounts"]:
        if m["Type"] == "overlay":  # ours (overlay_mount): Podman's overlay volume
            # Podman takes no other options with `O` (so no nosuid, nodev here): set-id
            # bits do nothing under no_new_privs, and the engine's device cgroup (a user
            # namespace's mount, rootless) refuses device nodes a project may hold.
            overlays.append({"destination": m["Target"], "source": m["Source"], "options": [
                f"upperdir={m['Upper']}", f"workdir={m['Work']}"]})
            continue
        if m["Type"] != "bind":
            raise ValueError(f"podman: mount type {m['Type']} not translated")
        options = ["rbind", "ro" if m.get("ReadOnly") else "rw", "rprivate"]
        if m["Source"] != "/dev/null":  # (a mask: a device, of course)
            options += ["nosuid", "nodev"]
        mounts.append({"destination": m["Target"], "type": "bind", "source": m["Source"],
                       "options": options})
    for target, options in host["Tmpfs"].items():
        mounts.append({"destination": target, "type": "tmpfs", "source": "tmpfs",
                       "options": options.split(",")})
    # Podman's own devpts has no `max`: one sandbox could hold every pty the host has left
    # (its devpts instances share the kernel's count). Ours replaces it, with our cap.
    mounts.append({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                   "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666",
                               "mode=0620", f"max={PTY_MAX}"]})
    limits: dict[str, Any] = {}
    if host["PidsLimit"] > 0:
        limits["pids"] = {"limit": host["PidsLimit"]}
    if host["Memory"]:
        limits["memory"] = {"limit": host["Memory"], "swap": host["MemorySwap"]}
    if host["NanoCpus"]:
        limits["cpu"] = {"quota": host["NanoCpus"] // 10000, "period": 100000}
    spec: dict[str, Any] = {
        "name": name, "image": body["Image"], "entrypoint": body["Entrypoint"],
        "command": [], "env": {}, "work_dir": body["WorkingDir"], "user": body["User"],
        "hostname": body["Hostname"], "labels": body["Labels"], "stop_signal": 9,
        "mounts": mounts, "overlay_volumes": overlays,
        "read_only_filesystem": host["ReadonlyRootfs"],
        # Our tmpfs mounts, none of Podman's: it would add /tmp, /run, /var/tmp of its own.
        "read_write_tmpfs": False,
        "cap_drop": ["ALL"], "cap_add": [], "no_new_privileges": True,
        # (Podman's API takes a profile's path, not its text: container_seccomp)
        "seccomp_profile_path": str(_seccomp_file(host["SecurityOpt"])),
        "netns": {"nsmode": "bridge" if host["NetworkMode"] == "bridge" else "none"},
        "ipcns": {"nsmode": "private"}, "remove": host["AutoRemove"],
        "restart_policy": "no", "systemd": "false", "privileged": False,
        "r_limits": [{"type": u["Name"], "soft": u["Soft"], "hard": u["Hard"]}
                     for u in _ulimits()],
        "resource_limits": limits,
        # Added to Podman's own masks; it has no read-only list of ours: those are masked.
        "mask": [*host["MaskedPaths"], *(p for p in host["ReadonlyPaths"]
                                         if p not in PODMAN_READONLY)],
    }
    if ids is not None:  # rootful: the sandbox's ids 0..65535 are our range
        rng = ids.range
        spec["userns"] = {"nsmode": "private"}
        spec["idmappings"] = {
            "UIDMap": [{"container_id": 0, "host_id": rng.uid, "size": rng.size}],
            "GIDMap": [{"container_id": 0, "host_id": rng.gid, "size": rng.size}]}
    return spec
