"""Files in a persistent sandbox: read, write, delete, stat."""

# mypy: disable-error-code="misc"
# (the mixin's `self` is the SandboxManager that composes it, a subclass, not a supertype)

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..names import validate_sandbox_path

if TYPE_CHECKING:
    from .manager import SandboxManager


class FilesMixin:
    """SandboxManager's files (a mixin: the manager is `self`; manager.py composes them)."""

    def read_file(self: SandboxManager, name: str, path: str, *,
                  max_bytes: int | None = None) -> bytes:
        """A regular file's content; larger than max_bytes (default: the configured
        max_file_read_bytes) is refused with TooLarge, a device or FIFO by the agent."""
        path = validate_sandbox_path(path)
        cap = self.settings.max_file_read_bytes if max_bytes is None else max(0, max_bytes)
        live, _ = self._running(name)
        data = live.client.read_file(path, max_bytes=cap)
        self._audit(name, "file_read", path=path)
        return data

    def read_file_to(self: SandboxManager, name: str, path: str, out: Any, *,
                     max_bytes: int | None = None) -> int:
        """Stream a regular file out of a sandbox (for `cp`): `out.write` blocking pauses
        the transfer at the agent; no size cap unless `max_bytes`."""
        path = validate_sandbox_path(path)
        live, _ = self._running(name)
        size = live.client.read_file_to(path, out, max_bytes=max_bytes)
        self._audit(name, "file_read", path=path)
        return size

    def write_file(self: SandboxManager, name: str, path: str, data: Any, mode: int = 0o644) -> int:
        """Write bytes (or a readable stream) to a file in the sandbox, parents created."""
        path = validate_sandbox_path(path)
        if path == "/":
            raise UsageError("cannot write to /")
        if not 0 <= int(mode) <= 0o7777:
            raise UsageError(f"invalid file mode {mode!r}")
        live, _ = self._running(name)
        size = live.client.write_file(path, data, mode=int(mode), mkdirs=True)
        self._audit(name, "file_written", path=path)
        return size

    def delete_file(self: SandboxManager, name: str, path: str) -> None:
        path = validate_sandbox_path(path)
        if path == "/":
            raise UsageError("cannot delete /")
        live, _ = self._running(name)
        live.client.remove(path, recursive=False)
        self._audit(name, "file_deleted", path=path)

    def stat_file(self: SandboxManager, name: str, path: str) -> dict[str, Any]:
        path = validate_sandbox_path(path)
        live, _ = self._running(name)
        st = live.client.stat(path)
        return {"type": st.type, "mode": st.mode, "size": st.size}
