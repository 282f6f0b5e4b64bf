"""The HTTP API's bearer key: generated on the first `serve`, kept 0600 in the data dir."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat

from ..errors import ConfigError

KEY_FILE = "api.key"
KEY_BYTES = 32  # secrets.token_urlsafe(32): 43 characters, 256 bits
_MAX_KEY = 512
_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~+/=")


def key_path() -> str:
    """Where the generated key lives: `<data dir>/api.key`."""
    from ..paths import data_dir_str

    return os.path.join(data_dir_str(), KEY_FILE)


def _check_private_dir(path: str) -> None:
    """The dir must be ours and writable by nobody else (else another user could swap the key)."""
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} is not a directory")
    if st.st_uid != os.geteuid():
        raise ConfigError(f"{path} belongs to uid {st.st_uid}, not to this user: refusing to "
                          "keep the API key there")
    if st.st_mode & 0o022:
        raise ConfigError(f"{path} is writable by other users (mode {st.st_mode & 0o777:o}): "
                          "refusing to keep the API key there")


def read_key(path: str | None = None) -> str | None:
    """The stored key; None if there is none. ConfigError if the file is not private."""
    path = path or key_path()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read the API key file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"the API key file {path} is not a regular file")
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise ConfigError(f"the API key file {path} must belong to this user and have "
                              f"mode 0600 (it has uid {st.st_uid}, mode "
                              f"{st.st_mode & 0o777:o})")
        raw = os.read(fd, _MAX_KEY + 2)
    finally:
        os.close(fd)
    key = raw.decode("ascii", "replace").strip()
    if not key or len(key) > _MAX_KEY or not set(key) <= _KEY_CHARS:
        raise ConfigError(f"the API key file {path} does not hold a key "
                          "(remove it: serve makes a new one)")
    return key


def read_key_quietly(path: str | None = None) -> str | None:
    """`read_key` for our client: a missing, foreign or unreadable file is simply no key."""
    try:
        return read_key(path)
    except (ConfigError, OSError):
        return None


def ensure_key(path: str | None = None) -> tuple[str, bool]:
    """The stored key, made first if there is none; (key, whether it was made just now).

    Written under a private temporary name (O_EXCL|O_NOFOLLOW, 0600) and linked into place,
    so a reader never sees half a key and two servers starting at once agree on one.
    """
    path = path or key_path()
    parent = os.path.dirname(path)
    os.makedirs(parent, mode=0o700, exist_ok=True)
    _check_private_dir(parent)
    key = read_key(path)
    if key is not None:
        return key, False
    tmp = os.path.join(parent, f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    made = False
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_urlsafe(KEY_BYTES) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            made = True
        except FileExistsError:
            pass  # another server made one first: use theirs
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    key = read_key(path)
    if key is None:
        raise ConfigError(f"the API key file {path} vanished while it was made")
    return key, made
