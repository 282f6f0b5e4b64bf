"""Where agentkernel keeps things: data dir, runtime dir, the daemon's sockets (and how a
private socket is made), native binaries.

pathlib is imported only by the functions that return a Path: the daemon's hot path (the
string functions) must not pay for it.
"""

from __future__ import annotations

import os

from .errors import SandboxError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable, Mapping
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


USER_CONFIG_NAME = "config.toml"  # in $XDG_CONFIG_HOME/agentkernel: the user's defaults
LEGACY_DAEMON_CONFIG_NAME = "agentkernel.toml"  # the daemon's file there before config.toml


def user_config_dir_str(env: Mapping[str, str] | None = None) -> str:
    """$XDG_CONFIG_HOME/agentkernel (~/.config/agentkernel), from `env` (default: ours).

    A relative $XDG_CONFIG_HOME is ignored, as the XDG spec says.
    """
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or ""
    if not os.path.isabs(base):
        home = env.get("HOME") or os.path.expanduser("~")
        base = os.path.join(home, ".config")
    return os.path.join(base, "agentkernel")


def user_config_path_str(env: Mapping[str, str] | None = None) -> str:
    """The user's config file (it may not exist): $XDG_CONFIG_HOME/agentkernel/config.toml."""
    return os.path.join(user_config_dir_str(env), USER_CONFIG_NAME)


ROOT_RUNTIME_DIR = "/run/agentkernel"  # root's: /run is root's own, never world-writable
TMP_RUNTIME_DIR = "/tmp/agentkernel-{uid}"  # users without $XDG_RUNTIME_DIR
FALLBACK_RECORD = "runtime-dir"  # in the data dir: the private dir used instead of the above


def runtime_dir_str() -> str:
    """Per-user volatile state (sockets, per-sandbox scratch).

    $AGENTKERNEL_RUNTIME_DIR, else /run/agentkernel for root, else
    $XDG_RUNTIME_DIR/agentkernel, else /tmp/agentkernel-UID — unless someone else got there
    first (any local user may create that name in /tmp): then a private dir of our own,
    recorded in the data dir.
    """
    env = os.environ.get("AGENTKERNEL_RUNTIME_DIR")
    if env:
        return env
    if os.geteuid() == 0 and os.access("/run", os.W_OK):
        return ROOT_RUNTIME_DIR
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "agentkernel")
    path = TMP_RUNTIME_DIR.format(uid=os.getuid())
    return path if _private_or_absent(path) else fallback_runtime_dir()


def is_private_dir(path: str) -> bool:
    """A real directory (not a symlink to one) of ours that nobody else may enter."""
    import stat

    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def _root_owned_dir(path: str) -> bool:
    import stat

    st = os.lstat(path)
    return stat.S_ISDIR(st.st_mode) and st.st_uid == 0 == os.getuid()


def _private_or_absent(path: str) -> bool:
    return not os.path.lexists(path) or is_private_dir(path)


def fallback_runtime_dir() -> str:
    """The private runtime dir used when the /tmp one was planted: the recorded one, else a
    new `mkdtemp` dir (recorded, with a one-line warning). Never follows a planted name."""
    import contextlib
    import sys
    import tempfile

    record = os.path.join(data_dir_str(), FALLBACK_RECORD)
    recorded = _read_record(record)
    if recorded and is_private_dir(recorded):
        return recorded
    os.makedirs(data_dir_str(), mode=0o700, exist_ok=True)
    path = tempfile.mkdtemp(prefix=f"agentkernel-{os.getuid()}-")  # 0700, made with O_EXCL
    tmp = f"{record}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(path + "\n")
    try:
        if recorded:  # a stale record (its dir is gone or not ours any more)
            os.replace(tmp, record)
        else:
            os.link(tmp, record)  # fails if a racing process recorded one first
    except FileExistsError:
        os.rmdir(path)
        path = _read_record(record) or path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    planted = TMP_RUNTIME_DIR.format(uid=os.getuid())
    print(f"agentkernel: warning: {planted} is not a private dir of uid {os.getuid()} "
          f"(made by another user?); using {path} instead", file=sys.stderr)
    return path


def _read_record(record: str) -> str:
    try:
        fd = os.open(record, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return ""
    with os.fdopen(fd) as f:
        return f.read(4096).strip()


def data_dir() -> Path:
    """The data dir, made 0700 if absent: what goes in it (the state, its SQLite journal,
    logs, caches) is for this user only, whichever part of us makes it first."""
    from pathlib import Path

    path = data_dir_str()
    if not os.path.isdir(path):
        os.makedirs(path, mode=0o700, exist_ok=True)
    return Path(path)


def runtime_dir() -> Path:
    """The runtime dir, created private to this user (refused if it is not: a symlink,
    someone else's, open to others); a planted /tmp default falls back instead."""
    import contextlib
    from pathlib import Path

    path = runtime_dir_str()
    if not os.path.lexists(path):
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)  # mkdir never follows a symlink planted meanwhile
    if not is_private_dir(path) and path == ROOT_RUNTIME_DIR and _root_owned_dir(path):
        os.chmod(path, 0o700)  # only root makes dirs in /run: a loose mode is ours to fix
    if not is_private_dir(path):
        if path == TMP_RUNTIME_DIR.format(uid=os.getuid()) and \
                not os.environ.get("AGENTKERNEL_RUNTIME_DIR"):
            return Path(fallback_runtime_dir())  # planted between the check and the mkdir
        raise SandboxError(f"runtime dir {path} is not a private directory of uid "
                           f"{os.getuid()} (a symlink, someone else's, or open to others)")
    return Path(path)


def daemon_socket() -> str:
    return os.path.join(runtime_dir_str(), DAEMON_SOCKET)


def api_socket_path() -> str:
    return os.path.join(runtime_dir_str(), API_SOCKET)


def listen_unix(path: str | os.PathLike[str], backlog: int) -> socket.socket:
    """A listening unix socket at `path` that is mode 0600 before anyone can see it there.

    Bound under a hidden temporary name, made private, then renamed over `path` (replacing
    a stale socket). No umask games: those would race with the daemon's other threads.
    """
    import contextlib
    import socket

    path = os.fspath(path)
    head, tail = os.path.split(path)
    tmp = os.path.join(head, f".{tail}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _via_dir(sock.bind, tmp)
        os.chmod(tmp, 0o600)
        sock.listen(backlog)
        os.replace(tmp, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return sock


SUN_PATH_MAX = 107  # sockaddr_un's 108 bytes, one of them the terminating NUL


def connect_unix(sock: socket.socket, path: str | os.PathLike[str]) -> None:
    """`sock.connect(path)`, also where `path` is longer than a unix socket address may be
    (a deep runtime dir): then through its directory's descriptor, /proc/self/fd/N/NAME."""
    _via_dir(sock.connect, os.fspath(path))


def connect_socket_file(sock: socket.socket, path: str | os.PathLike[str]) -> None:
    """`sock.connect(path)` to the socket file at `path` itself: never through a symlink
    in its last component, and never to anything but a socket (ConnectionRefusedError).

    For a sandbox's agent socket: the dir it sits in may be writable from inside the
    sandbox (a container's or gVisor's root), and a symlink planted in place of the
    socket would otherwise make the daemon connect wherever it points (as root)."""
    import errno
    import stat

    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"{os.fspath(path)} is not a socket")
        sock.connect(f"/proc/self/fd/{fd}")  # the inode opened, whatever the path is now
    finally:
        os.close(fd)


def _via_dir(call: Callable[[str], None], path: str) -> None:
    """call(path), through the path's directory's descriptor when the path is too long
    for a unix socket address (bind and connect both resolve /proc/self/fd/N/NAME)."""
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        call(path)
        return
    head, tail = os.path.split(path)
    dfd = os.open(head or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        call(f"/proc/self/fd/{dfd}/{tail}")
    finally:
        os.close(dfd)


def plain_entries_only(directory: str, names: list[str]) -> set[str]:
    """`shutil.copytree`'s `ignore` for a project someone else may have written: what is
    not a directory, a regular file or a symlink is left out. A copy reads each file it
    copies, as the copier's user (root for root's), so a device node's *contents* landed in
    the copy (a block device of the host's disk, in a sandbox's project), a FIFO hung it."""
    import stat

    out = set()
    for name in names:
        try:
            mode = os.lstat(os.path.join(directory, name)).st_mode
        except OSError:
            continue  # gone: copytree says so itself
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            out.add(name)
    return out


def write_cache(path: Path, text: str) -> None:
    """Best effort: replace the small cache file `path` (in our private data dir) whole,
    so a concurrent reader sees the old text or the new, never half of it."""
    import contextlib

    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(OSError):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    with contextlib.suppress(OSError):
        tmp.unlink()


PID_MAX = 1 << 22  # the kernel's highest pid_max


def read_pid(path: str | os.PathLike[str]) -> int:
    """A pid file's pid (ASCII digits, surrounding white space allowed, the file 32 bytes at
    the most), 0 if it has none, not one a pid can be, or cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read(33)
    except OSError:
        return 0
    text = data.strip()
    pid = int(text) if len(data) <= 32 and text.isdigit() else 0
    return pid if pid <= PID_MAX else 0


def which(name: str) -> str | None:
    """`shutil.which` for a bare command name, without shutil's compression imports (~1.5 ms
    of every CLI call)."""
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        if not directory.startswith("/"):  # "", "." or "bin": the (project's) current dir
            continue
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK) and os.path.isfile(path):
            return path
    return None


_PACKAGE_BIN: list[Path] = []  # a cache without functools (and collections) on the hot path


def _package_bin() -> Path:
    """Our package's `_bin` dir (resolved once: a realpath walk per sandbox start adds up)."""
    if not _PACKAGE_BIN:
        from pathlib import Path

        _PACKAGE_BIN.append(Path(__file__).resolve().parent / "_bin")
    return _PACKAGE_BIN[0]


_FOUND: dict[tuple[str | None, str], Path] = {}  # (override, name) -> where it was found


def native_binary(name: str) -> Path:
    """Locate a binary built by `make -C agent` (ak-agent, ak-seccomp). Where one was
    found is remembered (four lookups per sandbox start); it is used again while it is
    still an executable file."""
    from pathlib import Path

    override = os.environ.get("AGENTKERNEL_BIN_DIR")
    found = _FOUND.get((override, name))
    if found is not None and os.access(found, os.X_OK) and os.path.isfile(found):
        return found
    candidates = [Path(override)] if override else []
    candidates.append(_package_bin())
    for directory in candidates:
        path = directory / name
        if path.is_file() and os.access(path, os.X_OK):
            _FOUND[(override, name)] = path
            return path
    raise SandboxError(
        f"native binary {name!r} not found in {', '.join(map(str, candidates))}; "
        "build it with `make -C agent`"
    )
