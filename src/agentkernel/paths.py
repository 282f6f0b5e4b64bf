"""Where agentkernel keeps things: data dir, runtime dir, the daemon's sockets (and how a
private socket is made), native binaries.

pathlib is imported only by the functions that return a Path: the daemon's hot path (the
string functions) must not pay for it.
"""

from __future__ import annotations

import contextlib
import os

from .errors import SandboxError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from pathlib import Path

DAEMON_SOCKET = "daemon.sock"  # in the runtime dir: the daemon's JSON-lines socket
API_SOCKET = "api.sock"  # in the runtime dir: the daemon's REST API (the SDKs'), for our client


def data_dir_str() -> str:
    """Persistent state (images, sandboxes, caches): $AGENTKERNEL_HOME or XDG data home."""
    env = os.environ.get("AGENTKERNEL_HOME")
    if env:
        return env
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"),
                                                            ".local/share")
    return os.path.join(base, "agentkernel")


def runtime_dir_str() -> str:
    """Per-user volatile state (sockets, per-sandbox scratch): $XDG_RUNTIME_DIR or /tmp."""
    env = os.environ.get("AGENTKERNEL_RUNTIME_DIR")
    if env:
        return env
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "agentkernel")
    return f"/tmp/agentkernel-{os.getuid()}"


def data_dir() -> Path:
    from pathlib import Path

    return Path(data_dir_str())


def runtime_dir() -> Path:
    """The runtime dir, created private to this user (refused if someone else owns it)."""
    from pathlib import Path

    path = Path(runtime_dir_str())
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        # A world-writable parent (/tmp) must not let another user pre-create our dir.
        raise SandboxError(f"runtime dir {path} is not private to uid {os.getuid()}")
    return path


def daemon_socket() -> str:
    return os.path.join(runtime_dir_str(), DAEMON_SOCKET)


def api_socket_path() -> str:
    return os.path.join(runtime_dir_str(), API_SOCKET)


def listen_unix(path: str | os.PathLike[str], backlog: int) -> socket.socket:
    """A listening unix socket at `path` that is mode 0600 before anyone can see it there.

    Bound under a hidden temporary name, made private, then renamed over `path` (replacing
    a stale socket). No umask games: those would race with the daemon's other threads.
    """
    import socket

    path = os.fspath(path)
    head, tail = os.path.split(path)
    tmp = os.path.join(head, f".{tail}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        sock.listen(backlog)
        os.replace(tmp, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return sock


def which(name: str) -> str | None:
    """`shutil.which` for a bare command name, without shutil's compression imports (~1.5 ms
    of every CLI call)."""
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(directory or ".", name)
        if os.access(path, os.X_OK) and os.path.isfile(path):
            return path
    return None


def native_binary(name: str) -> Path:
    """Locate a binary built by `make -C agent` (ak-agent, ak-seccomp)."""
    from pathlib import Path

    override = os.environ.get("AGENTKERNEL_BIN_DIR")
    candidates = [Path(override)] if override else []
    candidates.append(Path(__file__).resolve().parent / "_bin")
    for directory in candidates:
        path = directory / name
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise SandboxError(
        f"native binary {name!r} not found in {', '.join(map(str, candidates))}; "
        "build it with `make -C agent`"
    )
