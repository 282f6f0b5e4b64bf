"""The host's control plane (runtime and data dirs) kept out of every sandbox's view.

A sandbox shows host dirs inside it (the project dir at /workspace, the home dir at
/home/user). When one of those contains agentkernel's own runtime dir (the daemon's
sockets, other sandboxes' agent sockets) or data dir (state, logs, other sandboxes' files),
`connect()` on a socket in there would work even through a read-only mount. So each such
dir is masked at its in-sandbox path (an empty read-only tmpfs, by the agent), and a host
dir that lies *inside* one of them is refused outright.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .profiles import Profile
    from .sandbox import SandboxSpec

WORKSPACE = "/workspace"
HOME = "/home/user"


def control_dirs() -> dict[str, str]:
    """Real path -> what it is, for every dir that holds agentkernel's control plane here:
    the runtime and data dirs in use, and the default ones (another daemon of this user,
    started with other settings, may use those)."""
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
    return found


def _own_dir(path: str) -> bool:
    """A directory of this user's, not a symlink (nobody else can make one)."""
    import stat

    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()


def control_masks(profile: Profile, workspace: Path | None, home: Path | None
                  ) -> tuple[str, ...]:
    """The in-sandbox paths to mask so that no control dir shows through a host dir the
    sandbox mounts; a mounted dir inside a control dir is refused (UsageError)."""
    mounts: list[tuple[Path, str]] = []
    if workspace is not None and profile.workspace != "none":
        mounts.append((workspace, WORKSPACE))
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
    cannot leave the control dirs out, so such a project dir is refused."""
    hidden = [m for m in spec.masks if m.startswith(WORKSPACE + "/")]
    if hidden:
        raise UsageError(
            f"the {backend} backend copies the project dir {spec.workspace} into the VM, and "
            f"it contains agentkernel's own state ({', '.join(hidden)} inside): use a "
            "project dir that does not")
