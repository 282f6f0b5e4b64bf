"""One-shot runs: planned for the caller, served from the warm pool, torn down."""

# mypy: disable-error-code="misc"
# (the mixin's `self` is the SandboxManager that composes it, a subclass, not a supertype)

from __future__ import annotations

import os
import secrets
import sys
import threading
import time
import weakref
from collections import OrderedDict
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
    from collections.abc import Callable

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
        """The planner's answer for a one-shot run, and the pool key it is served from:
        remembered briefly for a wasm run asked again as it was (_PlanMemo)."""
        with _MEMO_LOCK:
            memo = _PLAN_MEMO.setdefault(self, _PlanMemo())
        key = memo.key(req)
        hit = memo.get(key) if key is not None else None
        if hit is not None:
            return _fresh_masks(hit)
        answer = self._plan_afresh(req)
        if key is not None:
            memo.put(key, answer)
        return answer

    def _plan_afresh(self: SandboxManager, req: RunRequest) -> tuple[PoolKey, Plan]:
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
            agent_settings=bool(req.agent_settings),
            registry_public_only=req.registry_public_only is True), ctx)
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
        values and this run's fresh placeholders go to that gate now (`_grant`, beside
        the command's start), so a warm sandbox never holds a key, and no two runs share
        a placeholder."""
        if req.data_dir and not self.serves(req.data_dir):
            raise WrongDaemon(f"this daemon serves {self.root}, not {req.data_dir}")
        key, plan = self._plan_run(req)
        backend, rootfs = plan.backend, plan.rootfs
        started = time.monotonic()
        sandbox: Sandbox | None = None
        backend.pooled()  # e.g. wasm: make the compiling engine, once, in the background
        try:
            # (The masks as they are now: warm sandboxes made before a change in /etc go.)
            sandbox, pooled = self.pool.acquire(key, backend, rootfs, _found_masks(rootfs))
            granting: list[Callable[[], None]] = []  # the grant's answer, awaited below
            grant = None
            if plan.egress is not None and plan.egress.secrets:
                taken = sandbox

                def grant() -> None:  # once the command's start is asked for: beside it
                    granting.append(_grant(taken, plan, req))
            if plan.home_files:  # run --agent --settings: into this run's fresh HOME
                from ..agents.settings import write_into

                write_into(sandbox.client, plan.home_files)
            execution = sandbox.client.exec(plan.argv, env=plan.env(sandbox.spec.name),
                                            cwd=plan.cwd, timeout=req.timeout, stdin=stdin,
                                            pty=pty, rlimits=sandbox.command_rlimits(),
                                            sent=grant)
            for answered in granting:  # (refused: the sandbox goes, its command with it)
                answered()
        except BaseException:
            self.pool.release(key)
            if sandbox is not None:
                self._destroy_later(sandbox)
            raise
        sb = sandbox
        # (A wasm worker has no network at all, so no gate and no refusals to read.)
        gated = plan.egress is not None and sb.backend != "wasm"

        def finish(_handle: ExecHandle, result: ExecResult | None) -> None:
            if gated and result is not None:  # what its gate refused, for its stderr
                # (as an in-process run says it: cli/run.py run_in_process)
                from ..egress_gate import refusals

                result.egress = refusals(sb.scratch)
            try:
                if result is not None and sb.reusable():
                    self.pool.give_back(key, sb)  # a wasm worker: the next run, a new instance
                else:
                    self._destroy_later(sb)
            finally:
                # Released once it is back: a release that found the key's one worker still
                # out would wake the refill threads for a start nobody needs.
                self.pool.release(key)

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


# ---- the plan memo (hotpath: a warm run's planning, ~0.3-0.5 ms of a wasm run's ~2.5
# and of the ~0.7 ms a warm namespaces run's request spends in the daemon's Python) ----

PLAN_MEMO_SECONDS = 2.0  # well under the backend choice's own cache (BACKEND_CACHE_SECONDS)
PLAN_MEMO_MAX = 32


class _PlanMemo:
    """Plans of wasm runs and of namespaces runs on the host's userland, remembered for
    PLAN_MEMO_SECONDS under everything they depend on: the whole request (its argv, env,
    flags, the caller's environment and user config path) and the identity (device,
    inode, size, times, mode, owner) of every file and dir the planner reads for it: the
    project dir and its agentkernel.toml, --config, the caller's user config, their home.
    Any change there plans afresh. Only plans that carry nothing per run (no secrets, so
    no placeholders; no agent, no files for its home) are kept, and only on the wasm
    backend (whose worker takes neither image nor masks: the pool key and the request
    say all) or on namespaces with the host's userland, whose always-masked paths are
    looked up again on every hit (`_fresh_masks`, as a fresh plan does: rootfs.
    host_rootfs); one plan may serve runs in parallel, read-only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._plans: OrderedDict[str, tuple[float, tuple[PoolKey, Plan]]] = OrderedDict()

    @staticmethod
    def key(req: RunRequest) -> str | None:
        """The request's memo key; None if it is not one a plan is remembered for."""
        from ..detect import is_wasm_module

        if (req.agent or req.agent_key or req.secrets or req.allow_hosts or req.add_hosts
                or req.agent_settings):
            return None
        wasm = req.backend in (None, "wasm") and is_wasm_module(req.argv)
        host = req.backend in (None, "namespaces") and req.image in (None, "host")
        if not (wasm or host):
            return None
        caller = req.caller_env or {}
        files = [req.cwd, req.config_path, req.user_config, caller.get("HOME"),
                 os.path.join(req.cwd, "agentkernel.toml") if req.cwd else None]
        return repr((sorted((k, repr(v)) for k, v in vars(req).items()),
                     [(f, _identity(f)) for f in files]))

    def get(self, key: str) -> tuple[PoolKey, Plan] | None:
        with self._lock:
            hit = self._plans.get(key)
            if hit is None or time.monotonic() - hit[0] >= PLAN_MEMO_SECONDS:
                return None
            self._plans.move_to_end(key)
            return hit[1]

    def put(self, key: str, answer: tuple[PoolKey, Plan]) -> None:
        plan = answer[1]
        host = plan.backend.name == "namespaces" and _on_host(plan)
        if ((plan.backend.name != "wasm" and not host)
                or (plan.egress is not None and plan.egress.secrets)
                or plan.home_files or plan.secret_env or plan.ro_binds):
            return
        with self._lock:
            self._plans[key] = (time.monotonic(), answer)
            self._plans.move_to_end(key)
            while len(self._plans) > PLAN_MEMO_MAX:
                self._plans.popitem(last=False)


# One per manager (a daemon has one; tests make several, which must not share plans).
_PLAN_MEMO: weakref.WeakKeyDictionary[SandboxManager, _PlanMemo] = weakref.WeakKeyDictionary()
_MEMO_LOCK = threading.Lock()


def _on_host(plan: Plan) -> bool:
    """Whether `plan` runs on the host's userland (not an image, nor one that fell back)."""
    return (plan.image == "host" and plan.rootfs.name == "host"
            and plan.rootfs_key == "host" and plan.image_config is None)


def _fresh_masks(answer: tuple[PoolKey, Plan]) -> tuple[PoolKey, Plan]:
    """A remembered plan with the host's always-masked paths looked up now (a path that
    appeared since is masked from this run on, and the pool drops warm sandboxes made
    without it), as every fresh plan has them."""
    key, plan = answer
    if plan.backend.name != "namespaces":
        return answer
    from ..rootfs import host_rootfs

    return key, replace(plan, rootfs=host_rootfs())


def _identity(path: str | None) -> tuple[int, ...] | None:
    if not path:
        return None
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode,
            st.st_uid)


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
        # A project's pinned .git (agents/gitpin) changes its ctime at every git command
        # of the user's: only another .git (a new clone) makes a warm sandbox stale.
        ctime = 0 if os.path.basename(src) == ".git" else st.st_ctime_ns
        ids.append((st.st_dev, st.st_ino, ctime))
    return tuple(ids)


def _grant(sandbox: Sandbox, plan: Plan, req: RunRequest) -> Callable[[], None]:
    """The run's secrets sent to the gate of the sandbox it took: each grant's fresh
    placeholder (in the plan: the command's variables hold it) and value, read now (a
    stored secret from the store; the caller's agent key from its request). Sent once the
    command's start is asked for; returns the wait for the gate's answer (the command
    starts meanwhile: its gate holds its connections to those hosts until the grant is
    in), its `started` goes out after."""
    from ..egress_gate import grant_sent
    from ..secrets_store import load

    assert plan.egress is not None
    held = f"env:{req.agent_key}" if req.agent_key else None
    given: list[dict[str, object]] = []
    for g in plan.egress.secrets:
        value = req.agent_key_value if g.name == held else load(g.name).value
        given.append({"name": g.name, "hosts": list(g.hosts), "header": g.header,
                      "placeholder": g.placeholder, "value": value})
    return grant_sent(sandbox.scratch, given)
