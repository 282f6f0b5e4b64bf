"""One-shot runs: planned for the caller, served from the warm pool, torn down."""

# mypy: disable-error-code="misc"
# (the mixin's `self` is the SandboxManager that composes it, a subclass, not a supertype)

from __future__ import annotations

import os
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

if TYPE_CHECKING:
    from ..backends import Backend
    from ..planner import Plan
    from ..rootfs import HostRootfs, Mask
    from ..sandbox import Sandbox, SandboxSpec
    from .manager import SandboxManager


def _found_masks(rootfs: HostRootfs) -> tuple[Mask, ...] | None:
    """A one-shot sandbox's masks, its private dirs' entries included, from this daemon's
    walk while rootfs_watch says it is current: one walk for every sandbox, not one by
    each sandbox's agent. None (the agent walks) for a root filesystem without private
    dirs, or where the walk cannot be watched here."""
    if not rootfs.private_dirs:
        return None
    from ..rootfs_watch import kept_masks

    return kept_masks(rootfs)


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
            config_path=Path(req.config_path) if req.config_path else None,
            allow_hosts=tuple(req.allow_hosts), deny_hosts=tuple(req.deny_hosts),
            add_hosts=tuple(req.add_hosts), secrets=tuple(req.secrets), agent=req.agent,
            agent_key=req.agent_key, workspace_at=req.workspace_at,
            agent_settings=bool(req.agent_settings)), ctx)
        if req.agent_key and not req.agent_key_value:
            raise UsageError(f"run: the value of {req.agent_key} did not come with the run")
        return pool_key(plan), plan

    def _pool_spec(self: SandboxManager, key: PoolKey, rootfs: HostRootfs) -> SandboxSpec:
        from ..controlplane import control_masks
        from ..sandbox import SandboxSpec

        workspace = Path(key.workspace) if key.workspace else None
        home = Path(key.home) if key.home else None
        return SandboxSpec(name=f"pool-{secrets.token_hex(5)}", profile=key.profile,
                           rootfs=rootfs, image=key.image, workspace=workspace, home=home,
                           masks=control_masks(key.profile, workspace, home,
                                               key.workspace_at),
                           egress=key.egress, ro_binds=key.ro_binds,
                           workspace_at=key.workspace_at, user=key.user,
                           found_masks=_found_masks(rootfs))

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
            if key.egress is not None and key.egress.secrets:  # (off the request path:
                from ..egress_gate import wake  # a refill, or a start the run waits for)

                wake(sandbox.scratch)
            self.store.set_ephemeral_processes(
                spec.name, pid, procs.start_time(pid),
                [(h.pid, procs.start_time(h.pid)) for h in sandbox.helpers])
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

    def open_run(self: SandboxManager, req: RunRequest, *, stdin: bool = False,
                 pty: tuple[int, int] | None = None) -> ExecHandle:
        """A one-shot run: a warm sandbox if one is ready, else a fresh one; gone after.

        A run with secrets (your config's [secrets], an agent's key) takes a sandbox
        started without them, whose gate holds a certificate for their hosts: their
        values and this run's fresh placeholders go to that gate now (`_grant`), so a
        warm sandbox never holds a key, and no two runs share a placeholder."""
        if req.data_dir and Path(req.data_dir).resolve() != self.root.resolve():
            raise WrongDaemon(f"this daemon serves {self.root}, not {req.data_dir}")
        key, plan = self._plan_run(req)
        backend, rootfs = plan.backend, plan.rootfs
        started = time.monotonic()
        sandbox: Sandbox | None = None
        backend.pooled()  # e.g. wasm: make the compiling engine, once, in the background
        try:
            # (The masks as they are now: warm sandboxes made before a change in /etc go.)
            sandbox, pooled = self.pool.acquire(key, backend, rootfs, _found_masks(rootfs))
            if plan.egress is not None and plan.egress.secrets:
                _grant(sandbox, plan, req)
            if plan.home_files:  # run --agent --settings: into this run's fresh HOME
                from ..agents.settings import write_into

                write_into(sandbox.client, plan.home_files)
            execution = sandbox.client.exec(plan.argv, env=plan.env(sandbox.spec.name),
                                            cwd=plan.cwd, timeout=req.timeout, stdin=stdin,
                                            pty=pty, rlimits=sandbox.command_rlimits())
        except BaseException:
            self.pool.release(key)
            if sandbox is not None:
                self._destroy_later(sandbox)
            raise
        sb = sandbox
        agent = req.agent is not None

        def finish(_handle: ExecHandle, result: ExecResult | None) -> None:
            self.pool.release(key)
            if agent and result is not None:  # what its gate refused, for its stderr
                from ..egress_gate import refusals

                result.egress = refusals(sb.scratch)
            if result is not None and sb.reusable():
                self.pool.give_back(key, sb)  # a wasm worker: the next run is a new instance
            else:
                self._destroy_later(sb)

        info = {**plan.summary(), "backend": sb.backend, "isolation": sb.isolation,
                "pooled": pooled, "sandbox": sb.spec.name, "notes": list(sb.notes),
                "acquire_ms": round((time.monotonic() - started) * 1000, 2)}
        return ExecHandle(execution, timeout=req.timeout, oom=sb.oom_killed,
                          memory_mb=key.profile.memory_mb, finish=finish, info=info)

    def agent_keys(self: SandboxManager, agent: str) -> dict[str, object]:
        """What a `run --agent` client needs before its run (so that it reads no registry
        itself): the agent's key variables, in the order it looks for them, whether a
        stored secret covers it, and the note to print when it has no key at all."""
        from ..agents.launch import missing_key_note
        from ..agents.registry import get
        from ..agents.status import covering_secret

        spec = get(str(agent))
        return {"keys": [k.env for k in spec.keys],
                "stored": covering_secret(spec) is not None,
                "missing": missing_key_note(spec)}

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


def pool_key(plan: Plan) -> PoolKey:
    """What a plan's sandbox is, before a command and its secrets come: its pool key.
    Secrets' grants stay in it as slots without a placeholder (the sandbox's gate gets a
    certificate for their hosts, and nothing else, when it starts)."""
    egress = plan.egress
    if egress is not None and egress.secrets:
        egress = egress._replace(secrets=tuple(g._replace(placeholder="")
                                               for g in egress.secrets))
    return PoolKey(image=plan.image, rootfs=_rootfs_key(plan), backend=plan.backend.name,
                   profile=plan.profile,
                   workspace=str(plan.workspace) if plan.workspace else None,
                   home=str(plan.home) if plan.home else None,
                   egress=egress,  # the project's [network] lists, an agent's hosts
                   ro_binds=plan.ro_binds, workspace_at=plan.workspace_at, user=plan.user,
                   installs=install_ids(plan.ro_binds),
                   microvm=replace(plan.microvm, source="") if plan.microvm else None)


def _rootfs_key(plan: Plan) -> str:
    """What backs a plan's root in its pool key, such that runs after an image's tag moved
    to another image never get a warm sandbox of the old one: a container engine's image by
    its id (the plan asked the engine what the name is now), an image of our store by the
    tree it was composed into (one per manifest digest); else the plan's rootfs key."""
    from ..backends.container_engine import ENGINE_IMAGE

    name = plan.rootfs.name
    if name.startswith(ENGINE_IMAGE):
        return name
    trees = {os.path.dirname(e.source) for e in plan.rootfs.entries if e.source}
    if plan.rootfs_key != "host" and len(trees) == 1:
        return f"{plan.rootfs_key}@{os.path.basename(trees.pop())}"
    return plan.rootfs_key


def install_ids(ro_binds: tuple[tuple[str, str], ...]) -> tuple[tuple[int, int, int], ...]:
    """Each read-only bind's source as it is now: device, inode and change time of its
    dir (an agent's install: `agents install` renames a new one into place, so another
    inode; an in-place change of its top dir moves its ctime). (0, 0, 0) where it is
    gone: the start then fails as it would without a pool."""
    ids = []
    for src, _ in ro_binds:
        try:
            st = os.stat(src)
        except OSError:
            ids.append((0, 0, 0))
            continue
        ids.append((st.st_dev, st.st_ino, st.st_ctime_ns))
    return tuple(ids)


def _grant(sandbox: Sandbox, plan: Plan, req: RunRequest) -> None:
    """The run's secrets to the gate of the sandbox it took: each grant's fresh
    placeholder (in the plan: the command's variables hold it) and value, read now (a
    stored secret from the store; the caller's agent key from its request)."""
    from ..egress_gate import grant
    from ..secrets_store import load

    assert plan.egress is not None
    held = f"env:{req.agent_key}" if req.agent_key else None
    given: list[dict[str, object]] = []
    for g in plan.egress.secrets:
        value = req.agent_key_value if g.name == held else load(g.name).value
        given.append({"name": g.name, "hosts": list(g.hosts), "header": g.header,
                      "placeholder": g.placeholder, "value": value})
    grant(sandbox.scratch, given)
