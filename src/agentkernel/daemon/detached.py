"""Detached commands: started, drained to capped logs, listed, killed."""

# mypy: disable-error-code="misc"
# (the mixin's `self` is the SandboxManager that composes it, a subclass, not a supertype)

from __future__ import annotations

import contextlib
import secrets
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from ..agent.client import Execution, ExitStatus
from ..errors import Conflict, NotFound, ProtocolError
from . import records
from .api import DetachedInfo, ExecRequest
from .common import _now, rfc3339
from .handles import ExecHandle

if TYPE_CHECKING:
    from .manager import SandboxManager
    from .store import DetachedRow, DetachedStatus


class DetachedMixin:
    """SandboxManager's detached (a mixin: the manager is `self`; manager.py composes them)."""

    def _exec_dir(self: SandboxManager, name: str) -> Path:
        path = self._state_dir(name) / "exec"
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path

    def exec_detached(self: SandboxManager, name: str, req: ExecRequest) -> DetachedInfo:
        handle = self.open_exec(name, req)
        cmd_id = f"cmd-{secrets.token_hex(6)}"
        started = _now()
        self.store.add_detached(cmd_id=cmd_id, sandbox=name, command=list(req.argv),
                                pid=handle.execution.pid, chan=handle.execution.id,
                                started=started)
        records.save_detached(self.store, cmd_id, self._exec_dir(name))
        self._drain_detached(name, cmd_id, handle.execution, handle)
        return self.detached_status(name, cmd_id)

    def _drain_detached(self: SandboxManager, name: str, cmd_id: str, execution: Execution,
                        handle: ExecHandle | None = None) -> None:
        from .quota import CappedLog

        out_dir = self._exec_dir(name)
        cap = self._log_cap()

        def drain() -> None:
            status: DetachedStatus = "failed"
            code: int | None = None
            try:
                with CappedLog(out_dir / f"{cmd_id}.stdout", cap) as out, \
                        CappedLog(out_dir / f"{cmd_id}.stderr", cap) as err:
                    for kind, payload in execution.events():
                        if isinstance(payload, bytes):
                            (out if kind == "stdout" else err).write(payload)
                        elif isinstance(payload, ExitStatus):
                            status, code = "completed", payload.shell_code
            except Exception as exc:  # the sandbox went away: the command failed
                if not self._closed.is_set():
                    print(f"agentkernel daemon: detached command {cmd_id} of {name}: {exc}",
                          file=sys.stderr, flush=True)
            finally:
                self._detached_execs.pop(cmd_id, None)
                if handle is not None:
                    handle.finish(None)
            if not self._closed.is_set():
                with contextlib.suppress(Exception):
                    self.store.finish_detached(cmd_id, status, code)
                    records.save_detached(self.store, cmd_id, out_dir)

        t = threading.Thread(target=drain, name=f"ak-detached-{cmd_id}", daemon=True)
        self._detached_threads[cmd_id] = t
        self._detached_execs[cmd_id] = execution
        t.start()

    def _detached_row(self: SandboxManager, name: str, cmd_id: str) -> DetachedRow:
        self._row(name)
        row = self.store.detached(str(cmd_id), name)
        if row is None:
            raise NotFound(f"no detached command {str(cmd_id)[:64]!r} in sandbox {name!r}")
        return row

    def _detached_info(self: SandboxManager, row: DetachedRow) -> DetachedInfo:
        from .quota import dropped

        base = self._state_dir(row["sandbox"]) / "exec"
        cut = any(dropped(base / f"{row['id']}.{stream}") for stream in ("stdout", "stderr"))
        return DetachedInfo(id=row["id"], sandbox=row["sandbox"],
                            command=row["command"], pid=row["pid"],
                            status=row["status"], started_at=rfc3339(row["started"]) or "",
                            exit_code=row["exit_code"], truncated=cut)

    def detached_list(self: SandboxManager, name: str) -> list[DetachedInfo]:
        self._row(name)
        return [self._detached_info(r) for r in
                self.store.detached_of(name)]

    def detached_status(self: SandboxManager, name: str, cmd_id: str) -> DetachedInfo:
        return self._detached_info(self._detached_row(name, cmd_id))

    def _log_cap(self: SandboxManager) -> int:
        from .quota import DEFAULT_LOG_BYTES

        cap = self.config.resources.detached_log if self.config is not None else None
        return DEFAULT_LOG_BYTES if cap is None else cap * 1024 * 1024

    def detached_logs(self: SandboxManager, name: str, cmd_id: str, *, max_bytes: int | None = None
                      ) -> tuple[bytes, bytes]:
        """The logs' first max_bytes each (default: max_output_bytes, what any collected
        result may hold; the files themselves keep at most [resources] detached_log, the
        newest output, behind a marker where older output was dropped)."""
        from .quota import read_log

        row = self._detached_row(name, cmd_id)
        cap = self._output_cap(max_bytes)
        base = self._exec_dir(name)
        parts = []
        for stream in ("stdout", "stderr"):
            parts.append(read_log(base / f"{row['id']}.{stream}")[:cap])
        return parts[0], parts[1]

    def detached_kill(self: SandboxManager, name: str, cmd_id: str) -> None:
        row = self._detached_row(name, cmd_id)
        if row["status"] != "running":
            return
        self._running(name)
        execution = self._detached_execs.get(row["id"])
        if execution is None:
            raise Conflict(f"detached command {cmd_id!r} is not attached to this daemon")
        # The command leads its own process group (the agent's EXEC contract): kill it all.
        with contextlib.suppress(ProtocolError):
            execution.kill()
        t = self._detached_threads.get(row["id"])
        if t is not None:
            t.join(timeout=5)

    def _fail_detached(self: SandboxManager, name: str) -> None:
        running = self.store.detached_of(name, running=True)
        self.store.fail_detached_of(name)
        exec_dir = self._state_dir(name) / "exec"
        for row in running:
            records.save_detached(self.store, row["id"], exec_dir)
