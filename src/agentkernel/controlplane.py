"""The host's control plane (runtime, data and config dirs) kept out of every sandbox's view.

A sandbox shows host dirs inside it (the project dir at /workspace, the home dir at
/home/user). When one of those contains agentkernel's own runtime dir (the daemon's
sockets, other sandboxes' agent sockets), data dir (state, logs, other sandboxes' files,
the API key) or config dir (the API key when `[api] api_key` sets it), or the host's /run
(every other daemon's sockets: docker.sock, containerd, podman), `connect()` on a socket in
there would work even through a read-only mount, and a key read there opens the API. So each such
dir is masked at its in-sandbox path (an empty read-only tmpfs, by the agent), and a host
dir that lies *inside* one of them is refused outright.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

from .errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .profiles import Profile
    from .sandbox import SandboxSpec

WORKSPACE = "/workspace"
HOME = "/home/user"


# control_dirs' answer is remembered this long per set of inputs (a daemon plans every run:
# the realpaths cost more than the rest of a wasm run's plan). The dirs are ours and
# change seldom; a pooled sandbox's masks are older than this anyway (made at its start).
CONTROL_DIRS_SECONDS = 1.0
_CONTROL_DIRS: dict[tuple[object, ...], tuple[float, dict[str, str]]] = {}
_CONTROL_DIRS_LOCK = threading.Lock()


def control_dirs() -> dict[str, str]:
    """Real path -> what it is, for every dir that holds agentkernel's control plane here:
    the runtime and data dirs in use, and the default ones (another daemon of this user,
    started with other settings, may use those). Remembered for CONTROL_DIRS_SECONDS."""
    from . import paths

    inputs = (paths.runtime_dir_str(), paths.data_dir_str(), os.getuid(), os.geteuid(),
              os.environ.get("XDG_RUNTIME_DIR"), os.environ.get("XDG_DATA_HOME"),
              os.environ.get("XDG_CONFIG_HOME"), os.environ.get("HOME"))
    now = time.monotonic()
    with _CONTROL_DIRS_LOCK:
        hit = _CONTROL_DIRS.get(inputs)
    if hit is not None and now - hit[0] < CONTROL_DIRS_SECONDS:
        return dict(hit[1])
    found = _find_control_dirs()
    with _CONTROL_DIRS_LOCK:
        if len(_CONTROL_DIRS) >= 16:  # bounded: one entry per set of inputs seen lately
            _CONTROL_DIRS.clear()
        _CONTROL_DIRS[inputs] = (now, found)
    return dict(found)


def _find_control_dirs() -> dict[str, str]:
    from . import paths

    uid = os.getuid()
    found: dict[str, str] = {}

    def add(path: str | None, what: str, in_use: bool = False) -> None:
        # A default one counts only if it is a real dir of ours: anyone may plant
        # /tmp/agentkernel-UID as a symlink to, say, our home, and refusing every project
        # dir there would be theirs to decide.
        if path and (in_use or _own_dir(path)):
            found.setdefault(os.path.realpath(path), what)

    # The ones in use exist before any sandbox starts, so the masks always land.
    add(str(paths.runtime_dir()), "runtime dir", in_use=True)
    data = paths.data_dir_str()
    os.makedirs(data, mode=0o700, exist_ok=True)
    add(data, "data dir", in_use=True)
    if os.geteuid() == 0:
        add(paths.ROOT_RUNTIME_DIR, "runtime dir")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    add(os.path.join(xdg, "agentkernel") if xdg else None, "runtime dir")
    add(paths.TMP_RUNTIME_DIR.format(uid=uid), "runtime dir")
    xdg_data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"),
                                                               ".local/share")
    add(os.path.join(xdg_data, "agentkernel"), "data dir")
    # The user's config: its [api] api_key is the HTTP API's key when set, and a permissive
    # sandbox (the home dir read-only, the host's network) read it and drove the API
    # (tests/test_redteam7_config_key.py). The default one too, whatever XDG_CONFIG_HOME says.
    # Made now where missing (in a home of ours): a mask lands only on a dir that exists
    # when the sandbox starts, and a config written during a long run, or after a pool's
    # sandboxes started, showed through (the review of round 7).
    for config in (paths.user_config_dir_str(),
                   os.path.join(os.path.expanduser("~"), ".config", "agentkernel")):
        _make_if_ours(config)
        add(config, "config dir")
    # Not only ours: /run is where the host's daemons listen (docker.sock, containerd,
    # podman, systemd, users' runtime dirs). A project that contains it (run from /) showed
    # their sockets bound, not copied, under restrictive and permissive, and a root-started
    # sandbox's root owns root's files on that id-mapped mount: docker.sock answered it.
    add("/run", "the host's runtime dir (its daemons' sockets)", in_use=True)
    for var in ("DOCKER_HOST", "CONTAINER_HOST"):  # an engine's socket elsewhere
        host = os.environ.get(var, "")
        if host.startswith("unix://") and os.path.exists(host.removeprefix("unix://")):
            add(host.removeprefix("unix://"), f"engine socket (${var})", in_use=True)
    return found


def _make_if_ours(path: str) -> None:
    """Make `path` (0700) if it is missing and the nearest dir above it that exists is this
    user's: never a dir of ours in someone else's home (root run with another's HOME)."""
    if os.path.lexists(path):
        return
    above = os.path.dirname(path)
    while above and not os.path.lexists(above):
        above = os.path.dirname(above)
    if not _own_dir(above or "/"):
        return
    with contextlib.suppress(OSError):
        os.makedirs(path, mode=0o700, exist_ok=True)


def _own_dir(path: str) -> bool:
    """A directory of this user's, not a symlink (nobody else can make one)."""
    import stat

    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()


def control_masks(profile: Profile, workspace: Path | None, home: Path | None,
                  workspace_at: str = WORKSPACE) -> tuple[str, ...]:
    """The in-sandbox paths to mask so that no control dir shows through a host dir the
    sandbox mounts (the project at `workspace_at`); a mounted dir inside a control dir is
    refused (UsageError)."""
    mounts: list[tuple[Path, str]] = []
    if workspace is not None and profile.workspace != "none":
        mounts.append((workspace, workspace_at))
    if home is not None and profile.mount_home:
        mounts.append((home, HOME))
    if not mounts:
        return ()
    dirs = control_dirs()
    masks: list[str] = []
    for host, inside in mounts:
        real = os.path.realpath(host)
        prefix = real.rstrip("/") + "/"
        for ctl, what in sorted(dirs.items()):
            if real == ctl or real.startswith(ctl + "/"):
                raise UsageError(
                    f"{host} is inside agentkernel's {what} {ctl}: a sandbox must never see "
                    "the host's control plane; use another project dir")
            if ctl.startswith(prefix):
                masks.append(f"{inside}/{ctl[len(prefix):]}")
    return tuple(dict.fromkeys(masks))


def refuse_copied(spec: SandboxSpec, backend: str) -> None:
    """For backends that copy the project dir into the sandbox (a microVM's disk): a copy
    cannot leave the control dirs out, so such a project dir is refused. Such a copy is
    shown at /workspace only (an agent's own-path target is the namespaces backend's)."""
    if spec.workspace is not None and spec.workspace_at != WORKSPACE:
        raise UsageError(f"the {backend} backend shows the project at {WORKSPACE} only")
    hidden = [m for m in spec.masks if m.startswith(spec.workspace_at + "/")]
    if hidden:
        raise UsageError(
            f"the {backend} backend copies the project dir {spec.workspace} into the VM, and "
            f"it contains agentkernel's own state ({', '.join(hidden)} inside): use a "
            "project dir that does not")


# ---------------------------------------------------------------------- the project's path

# Top-level dirs a sandbox builds itself or takes from its root filesystem: a project shown
# at, under or above one would hide (or be hidden by) what the sandbox needs. /lib* is
# matched by prefix (lib, lib32, lib64, libx32, ...).
SYSTEM_DIRS = ("/proc", "/sys", "/dev", "/etc", "/usr", "/bin", "/sbin", "/boot", "/tmp",
               "/run", "/var/run", "/var/tmp", "/var/lock", "/root")
# Empty dirs the sandbox makes: a project may sit under one (/home/alice/proj), not be one.
EMPTY_DIRS = ("/home",)
_MAX_TARGET = 1024
# Characters the mount plumbing gives a meaning (the agent's `fd:target` and overlay
# `a:b:c` arguments, OCI/engine option lists): a path with one keeps /workspace.
_UNSAFE = frozenset(":,\\")


def workspace_target(project: Path, occupied: tuple[str, ...] = ()) -> str:
    """The in-sandbox path that shows `project` at its own host path (`run --agent`,
    `create --agent`): that path itself, checked strictly before any mount is
    built. UsageError when it may not be: not absolute or not normalized, a symlink on
    the way, `/`, a system dir the sandbox needs (SYSTEM_DIRS, /lib*) or a path at, under
    or above one of `occupied` (the sandbox's own other mounts: the root filesystem's
    entries, the agent's install, the mounted home)."""
    import stat

    raw = str(project)
    if raw == "/":
        raise UsageError("the project is the root directory")
    if any(ord(c) < 32 or ord(c) == 127 for c in raw):
        raise UsageError("the project path has control characters")
    if not os.path.isabs(raw) or os.path.normpath(raw) != raw or raw.startswith("//"):
        raise UsageError(f"the project path {raw[:200]!r} is not absolute and normalized")
    if len(raw) > _MAX_TARGET or _UNSAFE.intersection(raw):
        raise UsageError("the project path is too long or has ':', ',' or '\\' in it")
    walked = ""
    for part in raw.strip("/").split("/"):
        walked += "/" + part
        try:
            st = os.lstat(walked)
        except OSError as exc:
            raise UsageError(f"the project path {walked}: {exc.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            raise UsageError(f"the project path goes through the symlink {walked}")
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"the project path {raw} is not a directory")
    top = "/" + raw.split("/")[1]
    if top.startswith("/lib"):
        raise UsageError(f"{raw} is under {top}, which the sandbox needs for itself")
    if raw in EMPTY_DIRS:
        raise UsageError(f"the project is {raw} itself")
    for sys_dir in (*SYSTEM_DIRS, *occupied):
        if raw == sys_dir or raw.startswith(sys_dir.rstrip("/") + "/") \
                or sys_dir.startswith(raw + "/"):
            raise UsageError(f"{raw} would overlap {sys_dir}, which the sandbox needs "
                             "for itself")
    return raw
