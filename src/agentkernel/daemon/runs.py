"""One-shot runs: planned for the caller, served from the warm pool, torn down."""

# mypy: disable-error-code="misc"
# (the mixin's `self` is the SandboxManager that composes it, a subclass, not a supertype)

from __future__ import annotations

import secrets
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from .. import procs
from ..errors import AgentRequestError, UsageError
from .api import ExecResult, OnOutput, RunRequest
from .common import WrongDaemon
from .handles import ExecHandle, failed_start
from .pool import PoolKey
from .state import dumps

if TYPE_CHECKING:
    from ..backends import Backend
    from ..planner import Plan
    from ..rootfs import HostRootfs
    from ..sandbox import Sandbox, SandboxSpec
    from .manager import SandboxManager


class RunsMixin:
    """SandboxManager's runs (a mixin: the manager is `self`; manager.py composes them)."""

    def _plan_run(self: SandboxManager, req: RunRequest) -> tuple[PoolKey, Plan]:
        """The planner's answer for a one-shot run, and the pool key it is served from."""
        from ..planner import RunRequest as PlanRequest

        cwd = Path(req.cwd) if req.cwd else None
        if cwd is not None and (not cwd.is_absolute() or not cwd.is_dir()):
            raise UsageError(f"run: project dir {req.cwd!r} is not an existing absolute path")
        ctx = self._context(req.caller_env, req.user_config)
        plan = self._plan(PlanRequest(
            argv=list(req.argv), cwd=cwd, image=req.image, profile=req.profile,
            backend=req.backend, no_network=req.no_network, env=req.env, workdir=req.workdir,
            timeout=req.timeout, memory_mb=req.memory_mb, pids=req.pids, cpus=req.cpus,
            config_path=Path(req.config_path) if req.config_path else None), ctx)
        key = PoolKey(image=plan.image, rootfs=plan.rootfs_key, backend=plan.backend.name,
                      profile=plan.profile,
                      workspace=str(plan.workspace) if plan.workspace else None,
                      home=str(plan.home) if plan.home else None,
                      egress=plan.egress,  # the project's [network] lists
                      microvm=replace(plan.microvm, source="") if plan.microvm else None)
        return key, plan

    def _pool_spec(self: SandboxManager, key: PoolKey, rootfs: HostRootfs) -> SandboxSpec:
        from ..controlplane import control_masks
        from ..sandbox import SandboxSpec

        workspace = Path(key.workspace) if key.workspace else None
        home = Path(key.home) if key.home else None
        return SandboxSpec(name=f"pool-{secrets.token_hex(5)}", profile=key.profile,
                           rootfs=rootfs, image=key.image, workspace=workspace, home=home,
                           masks=control_masks(key.profile, workspace, home),
                           egress=key.egress)

    def _pool_start(self: SandboxManager, key: PoolKey, backend: Backend,
                    rootfs: HostRootfs) -> Sandbox:
        """Start an ephemeral sandbox, recorded so that a crashed daemon's leftovers go."""
        spec = self._pool_spec(key, rootfs)
        scratch = self._runtime_scratch(spec.name)
        self.store.add_ephemeral(spec.name, backend.name, str(scratch))
        try:
            sandbox = backend.start(spec)
        except BaseException:
            self.store.delete_ephemeral(spec.name)
            raise
        pid = sandbox.process.pid
        try:
            self.store.set_ephemeral_processes(
                spec.name, pid, procs.start_time(pid),
                dumps([(h.pid, procs.start_time(h.pid)) for h in sandbox.helpers]))
        except BaseException:
            self._destroy_ephemeral(sandbox)  # unrecorded, it would outlive us
            raise
        return sandbox

    @staticmethod
    def _runtime_scratch(name: str) -> Path:
        from ..paths import runtime_dir

        return runtime_dir() / "sandboxes" / name

    def _destroy_ephemeral(self: SandboxManager, sandbox: Sandbox) -> None:
        try:
            sandbox.destroy()
        finally:
            try:
                self.store.delete_ephemeral(sandbox.spec.name)
            except Exception as exc:  # e.g. a full disk: the sandbox itself is gone already
                print(f"agentkernel daemon: could not forget {sandbox.spec.name}: {exc}",
                      file=sys.stderr, flush=True)

    def open_run(self: SandboxManager, req: RunRequest, *, stdin: bool = False) -> ExecHandle:
        """A one-shot run: a warm sandbox if one is ready, else a fresh one; gone after."""
        if req.data_dir and Path(req.data_dir).resolve() != self.root.resolve():
            raise WrongDaemon(f"this daemon serves {self.root}, not {req.data_dir}")
        key, plan = self._plan_run(req)
        backend, rootfs = plan.backend, plan.rootfs
        started = time.monotonic()
        sandbox: Sandbox | None = None
        backend.pooled()  # e.g. wasm: make the compiling engine, once, in the background
        # Secrets (your config's [secrets]) have a fresh placeholder per run, known to its
        # gate only: such a run gets a sandbox of its own, never a pooled one.
        own = plan.egress is not None and bool(plan.egress.secrets)

        def release() -> None:
            if not own:
                self.pool.release(key)

        try:
            sandbox, pooled = (self._pool_start(key, backend, rootfs), False) if own else \
                self.pool.acquire(key, backend, rootfs)
            execution = sandbox.client.exec(plan.argv, env=plan.env(sandbox.spec.name),
                                            cwd=plan.cwd, timeout=req.timeout, stdin=stdin,
                                            rlimits=sandbox.command_rlimits())
        except BaseException:
            release()
            if sandbox is not None:
                self._destroy_later(sandbox)
            raise
        sb = sandbox

        def finish(_handle: ExecHandle, result: ExecResult | None) -> None:
            release()
            if not own and result is not None and sb.reusable():
                self.pool.give_back(key, sb)  # a wasm worker: the next run is a new instance
            else:
                self._destroy_later(sb)

        info = {**plan.summary(), "backend": sb.backend, "isolation": sb.isolation,
                "pooled": pooled, "sandbox": sb.spec.name, "notes": list(sb.notes),
                "acquire_ms": round((time.monotonic() - started) * 1000, 2)}
        return ExecHandle(execution, timeout=req.timeout, oom=sb.oom_killed,
                          memory_mb=key.profile.memory_mb, finish=finish, info=info)

    def run(self: SandboxManager, req: RunRequest, on_output: OnOutput | None = None, *,
            max_output: int | None = None) -> ExecResult:
        """A one-shot run; its collected output is capped (`truncated` says so)."""
        try:
            handle = self.open_run(req)
        except AgentRequestError as exc:
            if exc.exit_code in (126, 127):
                return failed_start(exc)
            raise
        handle.close_stdin()
        return handle.pump(on_output, max_output=self._output_cap(max_output))

    def _destroy_later(self: SandboxManager, sandbox: Sandbox) -> None:
        # Tearing a sandbox down takes a few ms: the caller already has its answer. The
        # pool's teardown queue is bounded (a full one makes this caller wait).
        self.pool.discard(sandbox)
