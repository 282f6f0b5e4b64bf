"""Where agentkernel keeps things: data dir, runtime dir and the native binaries."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import SandboxError

_PKG_BIN = Path(__file__).resolve().parent / "_bin"


def data_dir() -> Path:
    """Persistent state (images, sandboxes, caches): $AGENTKERNEL_HOME or XDG data home."""
    env = os.environ.get("AGENTKERNEL_HOME")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local/share")
    return Path(base) / "agentkernel"


def runtime_dir() -> Path:
    """Per-user volatile state (sockets, per-sandbox scratch): $XDG_RUNTIME_DIR or /tmp."""
    env = os.environ.get("AGENTKERNEL_RUNTIME_DIR")
    if env:
        path = Path(env)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "agentkernel"
    else:
        path = Path(f"/tmp/agentkernel-{os.getuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        # A world-writable parent (/tmp) must not let another user pre-create our dir.
        raise SandboxError(f"runtime dir {path} is not private to uid {os.getuid()}")
    return path


def native_binary(name: str) -> Path:
    """Locate a binary built by `make -C agent` (ak-agent, ak-seccomp)."""
    override = os.environ.get("AGENTKERNEL_BIN_DIR")
    candidates = [Path(override)] if override else []
    candidates.append(_PKG_BIN)
    for directory in candidates:
        path = directory / name
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise SandboxError(
        f"native binary {name!r} not found in {', '.join(map(str, candidates))}; "
        "build it with `make -C agent`"
    )
