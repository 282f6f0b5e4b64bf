"""Commands in a persistent sandbox: exec with live output, limits, OOM checks."""

# mypy: disable-error-code="misc"
# (the mixin's `self` is the SandboxManager that composes it, a subclass, not a supertype)

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import AgentRequestError, Conflict, SandboxError, UsageError
from .api import ExecRequest, ExecResult, OnOutput
from .common import _facts
from .handles import ExecHandle, Live, failed_start

if TYPE_CHECKING:
    from ..profiles import Profile
    from .manager import SandboxManager
    from .store import SandboxRow


class ExecMixin:
    """SandboxManager's execs (a mixin: the manager is `self`; manager.py composes them)."""

    def _running(self: SandboxManager, name: str) -> tuple[Live, SandboxRow]:
        row = self._row(name)
        with self._lock:
            live = self._live.get(name)
        if row["status"] != "running" or live is None:
            state = ": it is stopped" if row["status"] == "stopped" else ""
            raise Conflict(f"sandbox {name!r} is not running{state} "
                           f"(start it: agentkernel start {name})")
        if not live.client.alive:
            with self._name_lock(name):
                self._stop_locked(name, row)
            self._audit(name, "sandbox_stopped", reason="its agent went away")
            raise SandboxError(f"sandbox {name!r} died; it is stopped now (start it again)")
        return live, row

    def _oom_check(self: SandboxManager, name: str, live: Live) -> Callable[[], bool]:
        def check() -> bool:
            if live.sandbox is not None:
                return live.sandbox.oom_killed()
            with contextlib.suppress(Exception):
                from ..cgroups import Cgroup

                return Cgroup.open(name).oom_killed()
            return False

        return check

    @staticmethod
    def _rlimits(name: str, live: Live, profile: Profile) -> list[tuple[int, int, int]]:
        """The rlimit floor of a persistent sandbox's commands (also once re-adopted)."""
        if live.sandbox is not None:
            return live.sandbox.command_rlimits()
        from ..cgroups import Cgroup
        from ..sandbox import command_rlimits

        cgroup = None
        with contextlib.suppress(Exception):
            cgroup = Cgroup.open(name)
        return command_rlimits(profile, cgroup, memory_floor=_facts(live.backend).memory_floor)

    def open_exec(self: SandboxManager, name: str, req: ExecRequest, *, stdin: bool = False,
                  pty: tuple[int, int] | None = None) -> ExecHandle:
        """Start a command in a running sandbox; the caller pumps it."""
        if not req.argv:
            raise UsageError("no command given")
        live, row = self._running(name)
        doc = row["spec"]
        res = self._resolve(name, doc)
        env = dict(res.env)
        env.update(req.env)
        cwd = req.workdir or res.cwd
        if not cwd.startswith("/"):
            raise UsageError(f"workdir must be an absolute path inside the sandbox, got {cwd!r}")
        execution = live.client.exec(req.argv, env=env, cwd=cwd, timeout=req.timeout,
                                     stdin=stdin or req.stdin is not None, pty=pty,
                                     rlimits=self._rlimits(name, live, res.spec.profile))

        def finish(handle: ExecHandle, result: ExecResult | None) -> None:
            live.execs.discard(handle)
            self._audit(name, "command_executed", command=list(req.argv),
                        exit_code=result.exit_code if result else None)

        handle = ExecHandle(execution, timeout=req.timeout, oom=self._oom_check(name, live),
                            memory_mb=doc.get("memory_mb"), finish=finish)
        live.execs.add(handle)
        if req.stdin is not None:
            handle.write_stdin(req.stdin)
            handle.close_stdin()
        return handle

    def _output_cap(self: SandboxManager, max_output: int | None) -> int:
        return self.settings.max_output_bytes if max_output is None else max(0, max_output)

    def exec(self: SandboxManager, name: str, req: ExecRequest,
             on_output: OnOutput | None = None, *,
             max_output: int | None = None) -> ExecResult:
        """Run a command to its end; its collected output is capped (`truncated` says so)."""
        try:
            handle = self.open_exec(name, req)
        except AgentRequestError as exc:
            if exc.exit_code in (126, 127):
                return failed_start(exc)
            raise
        return handle.pump(on_output, max_output=self._output_cap(max_output))
