"""SandboxManager: persistent sandboxes, pooled one-shot runs, detached commands, snapshots."""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid as uuid_mod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..agent.client import AgentClient, Execution, ExitStatus, _ChanQueue
from ..agent.protocol import Frame
from ..errors import (
    AgentKernelError,
    AgentRequestError,
    Cancelled,
    Conflict,
    NotFound,
    ProtocolError,
    SandboxError,
    UsageError,
)
from ..names import validate_sandbox_name, validate_sandbox_path
from ..paths import data_dir
from . import procs, records
from .api import (
    BackendInfo,
    CreateRequest,
    DetachedInfo,
    ExecRequest,
    ExecResult,
    OnOutput,
    PoolKeyStatus,
    RunRequest,
    SandboxInfo,
    SnapshotInfo,
)
from .pool import PoolKey, WarmPool
from .state import StateDB, dumps, loads

if TYPE_CHECKING:
    from ..backends import Backend, CallerOptions, Choice
    from ..backends.container_engine import ContainerBackend
    from ..config import Config, DaemonSection
    from ..images import ImageConfig
    from ..images.registry import RegistryOptions
    from ..planner import CallerContext, Plan
    from ..planner import RunRequest as PlanRequest
    from ..profiles import Profile
    from ..rootfs import HostRootfs
    from ..sandbox import Sandbox, SandboxSpec

ROOTFS_CACHE_SECONDS = 60.0
BACKEND_CACHE_SECONDS = 10.0
HEALTH_INTERVAL = 5.0
# How often the disk use of sandboxes whose quota is not a mounted image is measured.
DISK_CHECK_INTERVAL = 30.0


class WrongDaemon(Conflict):
    """The caller's data dir is not this daemon's: it must run without the daemon."""


def _now() -> float:
    return time.time()


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


class AdoptingClient(AgentClient):
    """An AgentClient that keeps frames for channels it does not know yet.

    After a daemon restart the agent replays output of commands started over the previous
    connection under their old ids; the manager re-attaches its detached commands to them.
    """

    def __init__(self, *args: Any, expect: set[int] | None = None,
                 orphans: dict[int, list[Frame]] | None = None, **kwargs: Any) -> None:
        self._expect = set(expect or ())
        self._orphans: dict[int, list[Frame]] = dict(orphans or {})
        super().__init__(*args, **kwargs)
        # Commands of the lost connection that nobody adopts (a dead daemon's plain execs)
        # may still run under low ids: number this connection's channels far from them.
        self._next_chan = secrets.randbelow(1 << 30) + (1 << 20)

    @classmethod
    def connect(cls, path: Path, expect: set[int], timeout: float = 5.0,
                orphans: dict[int, list[Frame]] | None = None) -> AdoptingClient:
        import socket

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError:
            sock.close()
            raise
        sock.settimeout(None)

        def shut() -> None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

        from typing import BinaryIO, cast

        return cls(cast(BinaryIO, sock.makefile("rb", buffering=0)),
                   cast(BinaryIO, sock.makefile("wb", buffering=0)), on_close=shut,
                   expect=expect, orphans=orphans)

    def _deliver(self, frame: Frame) -> None:
        with self._lock:
            if frame.chan in self._expect and frame.chan not in self._chans:
                self._orphans.setdefault(frame.chan, []).append(frame)
                return
        super()._deliver(frame)

    def take_orphans(self) -> dict[int, list[Frame]]:
        """The frames kept so far for channels nobody adopted yet (for the next attempt)."""
        with self._lock:
            orphans, self._orphans = self._orphans, {}
        return orphans

    def adopt(self, chan: int, pid: int) -> Execution:
        """An Execution for a command started over an earlier connection."""
        q: _ChanQueue = self._new_queue(chan)
        with self._lock:
            self._expect.discard(chan)
            for frame in self._orphans.pop(chan, []):
                q.put(frame, wait=False)  # already in memory; a full queue asks for PAUSE
            if not self._alive:
                q.end()
            self._chans[chan] = q
            self._next_chan = max(self._next_chan, chan + 1)
        return Execution(self, chan, q, pid)


@dataclass
class Live:
    """A running persistent sandbox: its agent channel and what must be torn down."""

    name: str
    backend: str
    client: AgentClient
    scratch: Path
    pid: int | None
    pid_start: int | None
    helpers: list[tuple[int, int | None]]
    sandbox: Sandbox | None = None  # None when adopted from an earlier daemon
    execs: set[ExecHandle] = field(default_factory=set)


class ExecHandle:
    """A started command: feed stdin, signal, resize, then `pump` its output to the end."""

    def __init__(self, execution: Execution, *, timeout: float | None,
                 oom: Callable[[], bool], memory_mb: int | None,
                 finish: Callable[[ExecHandle, ExecResult | None], None] | None = None,
                 info: dict[str, Any] | None = None) -> None:
        self.execution = execution
        self.timeout = timeout
        self._oom = oom
        self._memory_mb = memory_mb
        self._finish = finish
        self._finished = False
        self.aborted = False
        self._lock = threading.Lock()
        self.info: dict[str, Any] = info or {}

    def write_stdin(self, data: bytes) -> None:
        with contextlib.suppress(ProtocolError):
            self.execution.write_stdin(data)

    def close_stdin(self) -> None:
        with contextlib.suppress(ProtocolError):
            self.execution.close_stdin()

    def signal(self, signo: int) -> None:
        with contextlib.suppress(ProtocolError, ValueError):
            self.execution.signal(signo)

    def resize(self, rows: int, cols: int) -> None:
        with contextlib.suppress(ProtocolError, ValueError):
            self.execution.resize(rows, cols)

    def pump(self, on_output: OnOutput | None = None, *, collect: bool = True,
             max_output: int | None = None) -> ExecResult:
        """Deliver output as it comes until the command exits; then finish the handle.

        on_output runs on this thread: while it blocks, the agent is told to pause the
        command (back-pressure). With `collect`, at most `max_output` bytes (stdout and
        stderr together) are kept; the command runs on, its result says `truncated`.
        Raises Cancelled once `abort` was called.
        """
        out: list[bytes] = []
        err: list[bytes] = []
        room = max_output if max_output is not None else -1
        truncated = False
        result: ExecResult | None = None
        try:
            try:
                for kind, payload in self.execution.events():
                    if isinstance(payload, bytes):
                        if collect:
                            keep = payload if room < 0 else payload[:room]
                            truncated = truncated or len(keep) < len(payload)
                            room = room if room < 0 else room - len(keep)
                            if keep:
                                (out if kind == "stdout" else err).append(keep)
                        if on_output is not None:
                            on_output("stdout" if kind == "stdout" else "stderr", payload)
                    elif isinstance(payload, ExitStatus):
                        result = self._result(payload, b"".join(out), b"".join(err))
                        result.truncated = truncated
            except Cancelled:
                raise
            except ProtocolError:
                if self.aborted:
                    raise Cancelled("the command was cancelled") from None
                if not self._oom():
                    raise SandboxError("the sandbox died while the command ran") from None
                result = self._result(None, b"".join(out), b"".join(err))
                result.truncated = truncated
            if result is None:
                raise ProtocolError("the agent ended the command without an exit status")
            return result
        finally:
            self.finish(result)

    def abort(self) -> None:
        """The caller went away: kill the command and release everything.

        Never waits for the agent: the channel is dropped at once (a thread pumping it
        raises Cancelled) and the kill is sent by the agent client's own thread.
        """
        self.aborted = True
        self.execution.cancel()
        self.finish(None)

    def kill(self) -> None:
        """End the command (its sandbox is going away); its pump still gets the end."""
        self.signal(signal.SIGKILL)
        self.finish(None)

    def finish(self, result: ExecResult | None) -> None:
        with self._lock:
            if self._finished:
                return
            self._finished = True
        if self._finish is not None:
            self._finish(self, result)

    def _result(self, status: ExitStatus | None, out: bytes, err: bytes) -> ExecResult:
        """planner.outcome's answer (None: the sandbox died under the command)."""
        from ..planner import outcome

        o = outcome(status, timeout=self.timeout, oom=self._oom, memory_mb=self._memory_mb)
        return ExecResult(o.exit_code, out, err, o.signal, timed_out=o.timed_out,
                          oom_killed=o.oom_killed, message=o.message)


def failed_start(exc: AgentRequestError) -> ExecResult:
    """A command that could not start (not found, not executable) as a result, not an error."""
    from ..planner import failed_start as failed

    o = failed(exc.exit_code, exc.message)
    return ExecResult(o.exit_code, b"", b"", message=o.message)


@dataclass
class _Resolved:
    """A sandbox spec resolved from its stored description."""

    spec: SandboxSpec
    backend: Backend
    env: dict[str, str]
    cwd: str


class SandboxManager:
    """Implements `SandboxService` (daemon/api.py). Thread-safe."""

    def __init__(self, config: Config | None = None, *, start_threads: bool = True,
                 configured_pools: bool = True) -> None:
        from ..config import DaemonSection

        self.config = config
        self.settings: DaemonSection = config.daemon if config is not None else DaemonSection()
        self.root = data_dir()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.db = StateDB(self.root / "state.db")
        self.recovered: list[str] = list(self.db.problems)  # what opening and recover() did
        self._lock = threading.RLock()
        self._name_locks: dict[str, threading.RLock] = {}
        self._live: dict[str, Live] = {}
        self._detached_threads: dict[str, threading.Thread] = {}
        self._detached_execs: dict[str, Execution] = {}
        self._rootfs_cache: dict[tuple[str, str, str], tuple[float, Any]] = {}
        self._backend_cache: dict[tuple[str, CallerOptions], tuple[float, Choice]] = {}
        # Whom HTTP requests are planned for: this daemon's own environment and config
        # (an SDK caller has no context of ours to send; the CLI sends its own).
        self.own_context = _own_context(config)
        self._closed = threading.Event()
        self._empty = self.root / "empty"
        self._empty.mkdir(mode=0o755, exist_ok=True)
        self.recover()
        _precompile_seccomp()
        self.pool = WarmPool(self._pool_start, self._destroy_ephemeral,
                             adhoc_min=self.settings.adhoc_min,
                             adhoc_max=self.settings.pool_max,
                             idle_seconds=self.settings.adhoc_idle_seconds,
                             max_total=self.settings.pool_max_total,
                             memory_bytes=self.settings.pool_memory_mb * 1024 * 1024,
                             refills=self.settings.pool_refills)
        self._threads: list[threading.Thread] = []
        if start_threads:
            if configured_pools:
                self._configure_pools()
            t = threading.Thread(target=self._reaper, name="ak-reaper", daemon=True)
            t.start()
            self._threads.append(t)

    # ------------------------------------------------------------------ lifecycle

    def holds_user_state(self) -> bool:
        """Whether stopping now would touch something a user owns: a kept sandbox that
        runs, a detached command, a pooled run in progress. (Warm pools are ours to drop.)"""
        with self._lock:
            if self._live or any(t.is_alive() for t in self._detached_threads.values()):
                return True
        if any(key.in_use for key in self.pool.status()):
            return True
        return bool(self.db.all("SELECT name FROM sandboxes WHERE status = 'running'", ()))

    def close(self) -> None:
        """Stop the daemon's side: pool destroyed, persistent sandboxes left running."""
        self._closed.set()
        self.pool.close()
        for t in self._threads:
            t.join(timeout=10)
        with self._lock:
            lives = list(self._live.values())
            self._live.clear()
        for live in lives:
            # Hang up only: an agent started with --listen keeps its commands running and
            # waits for the next daemon.
            with contextlib.suppress(Exception):
                live.client.close()
        self.db.close()

    def recover(self) -> None:
        """Re-adopt persistent sandboxes that survived the previous daemon; clean up the rest.

        The database is first brought in line with the sandboxes' own records on disk (a
        damaged one was replaced by its backup or an empty one: see records.py).
        """
        self.recovered.extend(records.reconcile(self.db, self.root))
        for row in self.db.all("SELECT * FROM ephemeral"):
            self._cleanup_dead(row["name"], row["backend"], row["scratch"], row["pid"],
                               row["pid_start"], loads(row["helpers"], []))
            self.db.execute("DELETE FROM ephemeral WHERE name=?", (row["name"],))
            self.recovered.append(f"cleaned up pool sandbox {row['name']}")
        self._cleanup_unrecorded_pool()
        for row in self.db.all("SELECT name, spec FROM sandboxes"):
            try:  # a reboot unmounted them; a daemon restart did not
                self._attach_disk(row["name"], loads(row["spec"], {}))
            except AgentKernelError as exc:
                self.recovered.append(f"{row['name']}: {exc.message}")
        for row in self.db.all("SELECT * FROM sandboxes WHERE status='running'"):
            name = row["name"]
            if self._adopt(row):
                self.recovered.append(f"re-adopted {name}")
                continue
            self._cleanup_dead(name, row["backend"], row["scratch"], row["pid"],
                               row["pid_start"], loads(row["helpers"], []))
            self.db.execute("UPDATE sandboxes SET status='stopped', pid=NULL, pid_start=NULL, "
                            "helpers='[]', scratch=NULL WHERE name=?", (name,))
            self._saved(name)
            self._fail_detached(name)
            self._audit(name, "sandbox_stopped", reason="found dead by a restarted daemon")
            self.recovered.append(f"marked {name} stopped (it died while no daemon ran)")
        for row in self.db.all("SELECT * FROM sandboxes WHERE status='stopped'"):
            self._cleanup_stopped(row)
        self.recovered.extend(_sweep_containers(
            {r["name"] for r in self.db.all("SELECT name FROM sandboxes")}))

    def _cleanup_unrecorded_pool(self) -> None:
        """Pool sandboxes the database lost (damaged): their scratch dirs and cgroups.

        Only a daemon starts `pool-*` sandboxes, and only one daemon runs per runtime and
        data dir (the locks): any found now belong to a dead one.
        """
        from ..cgroups import scoped_names
        from ..paths import runtime_dir

        found = set(scoped_names("pool-"))
        with contextlib.suppress(OSError):
            found.update(p.name for p in (runtime_dir() / "sandboxes").glob("pool-*"))
        for name in sorted(found):
            with contextlib.suppress(AgentKernelError):
                validate_sandbox_name(name)
                backend = _scratch_owner(self._runtime_scratch(name))
                self._cleanup_dead(name, backend, str(self._runtime_scratch(name)), None, None,
                                   [])
                self.recovered.append(f"cleaned up unrecorded pool sandbox {name}")

    def _cleanup_stopped(self, row: dict[str, Any]) -> None:
        """A sandbox recorded as stopped must have nothing running: a stale record (its
        start was not written down) leaves processes, a cgroup, a scratch dir. They go."""
        from ..cgroups import Cgroup

        name = row["name"]
        scratch = self._runtime_scratch(name)
        with contextlib.suppress(Exception):
            if scratch.exists() or any(_has_procs(d) for d in Cgroup.open(name).dirs):
                _shut_agent(scratch / "ctl" / "agent.sock")  # where no cgroup can kill it
                self._cleanup_dead(name, row["backend"], str(scratch), None, None, [])
                self.recovered.append(f"stopped what was left running of {name}")

    def _saved(self, name: str) -> None:
        """Mirror a sandbox's row to its record on disk (after every change of the row)."""
        records.save_sandbox(self.db, name)

    def _adopt(self, row: dict[str, Any]) -> bool:
        if not procs.alive(row["pid"], row["pid_start"]) or not row["scratch"]:
            return False
        sock = Path(row["scratch"]) / "ctl" / "agent.sock"
        running = self.db.all("SELECT * FROM detached WHERE sandbox=? AND status='running'",
                              (row["name"],))
        # A microVM's agent notices a hang-up by polling its port: a connection made before
        # it did is no new session to it (no HELLO), but gets that session's frames. Keep
        # those of the detached commands, hang up and try again.
        timeouts = _facts(row["backend"]).adopt_hello_timeouts
        carried: dict[int, list[Frame]] = {}
        for attempt, timeout in enumerate(timeouts):
            client: AdoptingClient | None = None
            try:
                client = AdoptingClient.connect(sock, {int(r["chan"]) for r in running},
                                                orphans=carried)
                client.hello(timeout=timeout)
                break
            except (OSError, AgentKernelError):
                if client is not None:
                    client.close()
                    carried = client.take_orphans()
                if attempt + 1 == len(timeouts) or not procs.alive(row["pid"],
                                                                   row["pid_start"]):
                    return False
                time.sleep(0.2)
        assert client is not None
        live = Live(row["name"], row["backend"], client, Path(row["scratch"]), row["pid"],
                    row["pid_start"], [tuple(h) for h in loads(row["helpers"], [])])
        self._live[row["name"]] = live
        for r in running:
            execution = client.adopt(int(r["chan"]), int(r["pid"]))
            self._drain_detached(row["name"], r["id"], execution)
        self._audit(row["name"], "sandbox_adopted")
        return True

    def _cleanup_dead(self, name: str, backend: str, scratch: str | None, pid: int | None,
                      pid_start: int | None, helpers: list[Any]) -> None:
        """Remove whatever a sandbox whose owner died left on the host."""
        procs.kill(pid, pid_start)
        with contextlib.suppress(Exception):
            from ..cgroups import Cgroup

            Cgroup.open(name).destroy()
        for h in helpers:
            procs.kill(h[0], h[1] if len(h) > 1 else None)
        if scratch:
            path = Path(scratch)
            with contextlib.suppress(Exception):
                _facts(backend).cleanup_dead(name, path)
            procs.rmtree(path)

    def _name_lock(self, name: str) -> threading.RLock:
        with self._lock:
            lock = self._name_locks.get(name)
            if lock is None:
                lock = self._name_locks[name] = threading.RLock()
            return lock

    # ------------------------------------------------------------------ resolution

    def _backend(self, name: str) -> Backend:
        from ..backends import CallerOptions

        return self._choice(name, CallerOptions()).backend

    def _choice(self, name: str, options: CallerOptions) -> Choice:
        """backends.choose, remembered briefly per caller's settings: `auto` reads the same
        cached functional probe verdicts as the CLI does, so both pick the same backend, and
        a backend upgraded while the daemon runs is probed again within
        BACKEND_CACHE_SECONDS."""
        from ..backends import choose

        key = (name, options)
        with self._lock:
            hit = self._backend_cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < BACKEND_CACHE_SECONDS:
            return hit[1]
        choice = choose(name, options)
        with self._lock:
            self._backend_cache[key] = (time.monotonic(), choice)
        return choice

    def _rootfs(self, image: str, config: Config | None, registry: RegistryOptions,
                quiet: bool = True) -> tuple[HostRootfs, ImageConfig | None, str, str | None]:
        """planner.resolve_rootfs, cached briefly (an unreachable registry must not cost
        every run), under the caller's registry settings: one caller's failed resolve never
        answers another's with other mirrors."""
        from ..planner import resolve_rootfs

        fallback = config.images.offline_fallback if config is not None else "host"
        ck = (image, registry.fingerprint(), fallback)
        with self._lock:
            hit = self._rootfs_cache.get(ck)
        if hit is not None and time.monotonic() - hit[0] < ROOTFS_CACHE_SECONDS:
            return hit[1]  # type: ignore[no-any-return]
        value = resolve_rootfs(image, config, registry, True)
        with self._lock:
            self._rootfs_cache[ck] = (time.monotonic(), value)
        return value

    def _plan(self, req: PlanRequest, ctx: CallerContext, *, persistent: bool = False) -> Plan:
        """planner.plan with this daemon's caches (backends, root filesystems)."""
        from ..planner import Resolvers, plan

        return plan(req, ctx, quiet=True, persistent=persistent,
                    resolvers=Resolvers(choose=self._choice, rootfs=self._rootfs))

    def _context(self, caller_env: dict[str, str] | None, user_config: str | None
                 ) -> CallerContext:
        """The context a request is planned for: the one its client sent, else ours."""
        if caller_env is None:
            if user_config is not None:
                raise UsageError("user_config comes with caller_env")
            return self.own_context
        from ..planner import CallerContext

        return CallerContext.from_wire(caller_env, user_config)

    def _resolve(self, name: str, doc: dict[str, Any]) -> _Resolved:
        """The SandboxSpec of a persistent sandbox from its stored description."""
        from ..controlplane import control_masks
        from ..images.registry import RegistryOptions
        from ..planner import sandbox_cwd, sandbox_env
        from ..profiles import Profile, get_profile
        from ..sandbox import SandboxSpec

        if isinstance(doc.get("profile_fields"), dict):
            profile = Profile(**doc["profile_fields"])
        else:
            profile = get_profile(doc["profile"]).with_overrides(
                network=False if doc.get("no_network") else None,
                memory_mb=doc.get("memory_mb"), cpus=doc.get("cpus"))
        backend = self._backend(doc["backend"])
        registry = RegistryOptions.from_doc(doc["registry"]) if isinstance(
            doc.get("registry"), dict) else RegistryOptions.from_config(self.config)
        engine = backend.engine_image(doc["image"])  # a container engine's own store
        rootfs, image_config, _note, _warning = (*engine, None) if engine is not None else \
            self._rootfs(doc.get("rootfs") or doc["image"], None, registry)
        rootfs = _engine_snapshot_rootfs(doc, rootfs)
        ws = doc.get("workspace")
        workspace = Path(ws) if ws and profile.workspace != "none" else None
        if workspace is not None and not workspace.is_dir():
            raise NotFound(f"the sandbox's project dir {ws} no longer exists")
        # The creator's home (planner: the caller's HOME), for sandboxes of older daemons ours.
        home = Path(doc["home"]) if doc.get("home") else Path(os.path.expanduser("~"))
        home_opt = home if profile.mount_home and home.is_dir() else None
        spec = SandboxSpec(name=name, profile=profile, rootfs=rootfs, image=doc["image"],
                           workspace=workspace, home=home_opt, persistent=True,
                           state_dir=self._layers_dir(name),
                           masks=control_masks(profile, workspace, home_opt),
                           egress=_egress_of(doc))
        env = sandbox_env(name, image_config, profile, home_opt, doc.get("host_env", {}))
        env.update(doc.get("env", {}))
        cwd = sandbox_cwd(None, workspace is not None, image_config)
        return _Resolved(spec, backend, env, cwd)

    def _state_dir(self, name: str) -> Path:
        validate_sandbox_name(name)
        return self.root / "sandboxes" / name

    def _disk_mb(self, config: Config | None) -> int | None:
        """The disk quota of a new persistent sandbox: its project's, the daemon's, or the
        default; None when one of them says `unlimited`."""
        from .quota import DEFAULT_DISK_MB

        for cfg in (config, self.config):
            if cfg is not None and cfg.resources.disk is not None:
                return cfg.resources.disk or None
        return DEFAULT_DISK_MB

    def _attach_disk(self, name: str, doc: dict[str, Any]) -> bool:
        """Mount the sandbox's quota-sized disk for its layers (see daemon/quota.py)."""
        from . import quota

        return quota.attach(self._state_dir(name), doc.get("disk_mb"))

    def _layers_dir(self, name: str) -> Path:
        """Where the sandbox's writable layers are: its mounted disk, or its state dir."""
        from . import quota

        return quota.layers_dir(self._state_dir(name))

    @staticmethod
    def _wipe_state(state_dir: Path) -> None:
        """A state dir and its disk are gone: unmounted, image deleted, files removed."""
        from . import quota

        quota.detach(state_dir)
        procs.rmtree(state_dir)

    # ------------------------------------------------------------------ persistent sandboxes

    def create(self, req: CreateRequest) -> SandboxInfo:
        from ..planner import RunRequest as PlanRequest

        validate_sandbox_name(req.name)
        if req.ttl_seconds is not None and req.ttl_seconds <= 0:
            raise UsageError("ttl must be a positive number of seconds")
        for key in req.env:
            if not key or "=" in key or "\0" in key or "\0" in req.env[key]:
                raise UsageError(f"invalid environment variable {key!r}")
        workspace: Path | None = None
        if req.workdir_source:
            workspace = Path(req.workdir_source)
            if not workspace.is_absolute():
                raise UsageError("the project dir must be an absolute path")
            if not workspace.is_dir():
                raise NotFound(f"project dir {req.workdir_source} does not exist")
        cpus = req.cpus if req.cpus is not None else (float(req.vcpus) if req.vcpus else None)
        ctx = self._context(req.caller_env, req.user_config)
        with self._name_lock(req.name):
            if self.db.one("SELECT name FROM sandboxes WHERE name=?", (req.name,)):
                raise Conflict(f"sandbox {req.name!r} already exists")
            plan = self._plan(PlanRequest(
                argv=[], cwd=workspace, image=req.image, profile=req.profile,
                backend=req.backend, memory_mb=req.memory_mb, pids=req.pids, cpus=cpus,
                allow_hosts=tuple(req.allow_hosts), deny_hosts=tuple(req.deny_hosts),
                add_hosts=tuple(req.add_hosts)),
                ctx, persistent=True)
            backend, profile, image = plan.backend, plan.profile, plan.image
            doc = {
                "image": image, "rootfs": plan.rootfs_key,
                "profile": profile.name, "backend": backend.name,
                "memory_mb": profile.memory_mb, "cpus": profile.cpus,
                "no_network": profile.network == "none",
                "workspace": str(workspace) if workspace else None,
                "env": dict(req.env), "host_env": dict(plan.pass_env),
                "home": str(plan.home) if plan.home else None,
                "registry": plan.registry.to_doc() if plan.registry else None,
                "profile_fields": profile._asdict(), "rootfs_note": plan.rootfs_note,
                # A microVM's writable disks are images of a fixed size already.
                "disk_mb": None if backend.sized_disks else self._disk_mb(plan.config),
                # egress_policy: the policy it was created with (secrets are not kept)
                "egress": plan.egress.to_json() if plan.egress is not None else None,
            }
            uid = str(uuid_mod.uuid4())
            state_dir = self._state_dir(req.name)
            if state_dir.exists():
                self._wipe_state(state_dir)  # left by a crash between insert and cleanup
            state_dir.mkdir(mode=0o700, parents=True)
            try:
                self._attach_disk(req.name, doc)
            except BaseException:
                self._wipe_state(state_dir)
                raise
            created = _now()
            expires = created + req.ttl_seconds if req.ttl_seconds else None
            self.db.execute(
                "INSERT INTO sandboxes (name, uuid, status, backend, isolation, image, profile,"
                " spec, created, expires, state_dir) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (req.name, uid, "stopped", backend.name, backend.isolation, image,
                 profile.name, dumps(doc), created, expires, str(state_dir)))
            self._saved(req.name)
            self._audit(req.name, "sandbox_created", image=image, backend=backend.name,
                        profile=profile.name)
            try:
                self._start_live(req.name)
            except BaseException:
                self.db.execute("DELETE FROM sandboxes WHERE name=?", (req.name,))
                self._wipe_state(state_dir)
                raise
            return self.get(req.name)

    def _row(self, name: str) -> dict[str, Any]:
        validate_sandbox_name(name)
        row = self.db.one("SELECT * FROM sandboxes WHERE name=?", (name,))
        if row is None:
            raise NotFound(f"sandbox {name!r} not found")
        return row

    def _info(self, row: dict[str, Any]) -> SandboxInfo:
        doc = loads(row["spec"], {})
        cpus = doc.get("cpus")
        return SandboxInfo(
            name=row["name"], uuid=row["uuid"], status=row["status"], backend=row["backend"],
            isolation=row["isolation"], image=row["image"], profile=row["profile"],
            vcpus=max(1, round(cpus)) if cpus else None, memory_mb=doc.get("memory_mb"),
            created_at=rfc3339(row["created"]) or "", expires_at=rfc3339(row["expires"]),
            rootfs=str(doc.get("rootfs_note") or ""))

    def get(self, name: str) -> SandboxInfo:
        return self._info(self._row(name))

    def get_by_uuid(self, uuid: str) -> SandboxInfo:
        row = self.db.one("SELECT * FROM sandboxes WHERE uuid=?", (str(uuid),))
        if row is None:
            raise NotFound(f"no sandbox with uuid {str(uuid)[:64]!r}")
        return self._info(row)

    def list_sandboxes(self) -> list[SandboxInfo]:
        return [self._info(r) for r in self.db.all("SELECT * FROM sandboxes ORDER BY name")]

    def _start_live(self, name: str) -> Live:
        row = self._row(name)
        doc = loads(row["spec"], {})
        res = self._resolve(name, doc)
        self._cleanup_dead(name, row["backend"], row["scratch"], row["pid"], row["pid_start"],
                           loads(row["helpers"], []))
        self._attach_disk(name, doc)  # mounted again after a reboot
        sandbox = res.backend.start(res.spec)
        pid = sandbox.process.pid
        live = Live(name, sandbox.backend, sandbox.client, sandbox.scratch, pid,
                    procs.start_time(pid),
                    [(h.pid, procs.start_time(h.pid)) for h in sandbox.helpers], sandbox)
        try:
            self.db.execute(
                "UPDATE sandboxes SET status='running', pid=?, pid_start=?, helpers=?, "
                "scratch=?, isolation=? WHERE name=?",
                (pid, live.pid_start, dumps(live.helpers), str(sandbox.scratch),
                 sandbox.isolation, name))
        except BaseException:
            sandbox.destroy()  # not written down, it would run on unmanaged
            raise
        self._saved(name)
        with self._lock:
            self._live[name] = live
        self._audit(name, "sandbox_started", profile=res.spec.profile.name,
                    backend=sandbox.backend)
        return live

    def start(self, name: str) -> SandboxInfo:
        with self._name_lock(name):
            row = self._row(name)
            with self._lock:
                live = self._live.get(name)
            if row["status"] == "running" and live is not None and live.client.alive:
                return self._info(row)
            if live is not None:
                self._teardown(live)
            self._start_live(name)
            return self.get(name)

    def stop(self, name: str) -> SandboxInfo:
        with self._name_lock(name):
            row = self._row(name)
            if not _facts(row["backend"]).stoppable:
                raise Conflict(
                    f"sandbox {name!r} runs on the {row['backend']} backend, which keeps its "
                    "filesystem in memory: stopping it would lose it (remove it instead)")
            self._stop_locked(name, row)
            self._audit(name, "sandbox_stopped")
            return self.get(name)

    def _stop_locked(self, name: str, row: dict[str, Any]) -> None:
        with self._lock:
            live = self._live.pop(name, None)
        if live is not None:
            self._teardown(live)
        else:
            self._cleanup_dead(name, row["backend"], row["scratch"], row["pid"],
                               row["pid_start"], loads(row["helpers"], []))
        self.db.execute("UPDATE sandboxes SET status='stopped', pid=NULL, pid_start=NULL, "
                        "helpers='[]', scratch=NULL WHERE name=?", (name,))
        self._saved(name)
        self._fail_detached(name)

    def _teardown(self, live: Live) -> None:
        """Everything of a running sandbox goes: commands, processes, cgroups, scratch."""
        for handle in list(live.execs):
            handle.kill()  # its client is told how the command ended, not cut off
        if live.sandbox is not None:
            live.sandbox.destroy()
            return
        with contextlib.suppress(Exception):
            if live.client.alive:
                live.client.shutdown()
        live.client.close()
        # Let it end by itself first (a VM's guest has synced its disks once it answered).
        deadline = time.monotonic() + 2.0
        while procs.alive(live.pid, live.pid_start) and time.monotonic() < deadline:
            time.sleep(0.01)
        self._cleanup_dead(live.name, live.backend, str(live.scratch), live.pid,
                           live.pid_start, list(live.helpers))

    def remove(self, name: str) -> None:
        with self._name_lock(name):
            row = self._row(name)
            self._stop_locked(name, row)
            self.db.execute("DELETE FROM detached WHERE sandbox=?", (name,))
            self.db.execute("DELETE FROM sandboxes WHERE name=?", (name,))
            self._wipe_state(Path(row["state_dir"]))
            _remove_container(row["backend"], name)
        with self._lock:
            self._name_locks.pop(name, None)

    def extend(self, name: str, seconds: float) -> str | None:
        if not seconds or seconds <= 0:
            raise UsageError("extend needs a positive number of seconds")
        with self._name_lock(name):
            row = self._row(name)
            base = max(_now(), row["expires"] or _now())
            expires = base + seconds
            self.db.execute("UPDATE sandboxes SET expires=? WHERE name=?", (expires, name))
            self._saved(name)
            self._audit(name, "ttl_extended", expires_at=rfc3339(expires))
            return rfc3339(expires)

    # ------------------------------------------------------------------ commands

    def _running(self, name: str) -> tuple[Live, dict[str, Any]]:
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

    def _oom_check(self, name: str, live: Live) -> Callable[[], bool]:
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

    def open_exec(self, name: str, req: ExecRequest, *, stdin: bool = False,
                  pty: tuple[int, int] | None = None) -> ExecHandle:
        """Start a command in a running sandbox; the caller pumps it."""
        if not req.argv:
            raise UsageError("no command given")
        live, row = self._running(name)
        doc = loads(row["spec"], {})
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

    def _output_cap(self, max_output: int | None) -> int:
        return self.settings.max_output_bytes if max_output is None else max(0, max_output)

    def exec(self, name: str, req: ExecRequest, on_output: OnOutput | None = None, *,
             max_output: int | None = None) -> ExecResult:
        """Run a command to its end; its collected output is capped (`truncated` says so)."""
        try:
            handle = self.open_exec(name, req)
        except AgentRequestError as exc:
            if exc.exit_code in (126, 127):
                return failed_start(exc)
            raise
        return handle.pump(on_output, max_output=self._output_cap(max_output))

    # ---- one-shot runs (warm pool) ----

    def _plan_run(self, req: RunRequest) -> tuple[PoolKey, Plan]:
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
                      egress=plan.egress)  # the project's [network] lists
        return key, plan

    def _pool_spec(self, key: PoolKey, rootfs: HostRootfs) -> SandboxSpec:
        from ..controlplane import control_masks
        from ..sandbox import SandboxSpec

        workspace = Path(key.workspace) if key.workspace else None
        home = Path(key.home) if key.home else None
        return SandboxSpec(name=f"pool-{secrets.token_hex(5)}", profile=key.profile,
                           rootfs=rootfs, image=key.image, workspace=workspace, home=home,
                           masks=control_masks(key.profile, workspace, home),
                           egress=key.egress)

    def _pool_start(self, key: PoolKey, backend: Backend, rootfs: HostRootfs) -> Sandbox:
        """Start an ephemeral sandbox, recorded so that a crashed daemon's leftovers go."""
        spec = self._pool_spec(key, rootfs)
        scratch = self._runtime_scratch(spec.name)
        self.db.execute("INSERT INTO ephemeral (name, backend, scratch) VALUES (?,?,?)",
                        (spec.name, backend.name, str(scratch)))
        try:
            sandbox = backend.start(spec)
        except BaseException:
            self.db.execute("DELETE FROM ephemeral WHERE name=?", (spec.name,))
            raise
        pid = sandbox.process.pid
        try:
            self.db.execute("UPDATE ephemeral SET pid=?, pid_start=?, helpers=? WHERE name=?",
                            (pid, procs.start_time(pid),
                             dumps([(h.pid, procs.start_time(h.pid)) for h in sandbox.helpers]),
                             spec.name))
        except BaseException:
            self._destroy_ephemeral(sandbox)  # unrecorded, it would outlive us
            raise
        return sandbox

    @staticmethod
    def _runtime_scratch(name: str) -> Path:
        from ..paths import runtime_dir

        return runtime_dir() / "sandboxes" / name

    def _destroy_ephemeral(self, sandbox: Sandbox) -> None:
        try:
            sandbox.destroy()
        finally:
            try:
                self.db.execute("DELETE FROM ephemeral WHERE name=?", (sandbox.spec.name,))
            except Exception as exc:  # e.g. a full disk: the sandbox itself is gone already
                print(f"agentkernel daemon: could not forget {sandbox.spec.name}: {exc}",
                      file=sys.stderr, flush=True)

    def open_run(self, req: RunRequest, *, stdin: bool = False) -> ExecHandle:
        """A one-shot run: a warm sandbox if one is ready, else a fresh one; gone after."""
        if req.data_dir and Path(req.data_dir).resolve() != self.root.resolve():
            raise WrongDaemon(f"this daemon serves {self.root}, not {req.data_dir}")
        key, plan = self._plan_run(req)
        backend, rootfs = plan.backend, plan.rootfs
        started = time.monotonic()
        sandbox: Sandbox | None = None
        try:
            sandbox, pooled = self.pool.acquire(key, backend, rootfs)
            execution = sandbox.client.exec(plan.argv, env=plan.env(sandbox.spec.name),
                                            cwd=plan.cwd, timeout=req.timeout, stdin=stdin,
                                            rlimits=sandbox.command_rlimits())
        except BaseException:
            self.pool.release(key)
            if sandbox is not None:
                self._destroy_later(sandbox)
            raise
        sb = sandbox

        def finish(_handle: ExecHandle, _result: ExecResult | None) -> None:
            self.pool.release(key)
            self._destroy_later(sb)

        info = {**plan.summary(), "backend": sb.backend, "isolation": sb.isolation,
                "pooled": pooled, "sandbox": sb.spec.name, "notes": list(sb.notes),
                "acquire_ms": round((time.monotonic() - started) * 1000, 2)}
        return ExecHandle(execution, timeout=req.timeout, oom=sb.oom_killed,
                          memory_mb=key.profile.memory_mb, finish=finish, info=info)

    def run(self, req: RunRequest, on_output: OnOutput | None = None, *,
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

    def _destroy_later(self, sandbox: Sandbox) -> None:
        # Tearing a sandbox down takes a few ms: the caller already has its answer. The
        # pool's teardown queue is bounded (a full one makes this caller wait).
        self.pool.discard(sandbox)

    # ---- detached commands ----

    def _exec_dir(self, name: str) -> Path:
        path = self._state_dir(name) / "exec"
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path

    def exec_detached(self, name: str, req: ExecRequest) -> DetachedInfo:
        handle = self.open_exec(name, req)
        cmd_id = f"cmd-{secrets.token_hex(6)}"
        started = _now()
        self.db.execute("INSERT INTO detached (id, sandbox, command, pid, chan, status, started)"
                        " VALUES (?,?,?,?,?,?,?)",
                        (cmd_id, name, dumps(list(req.argv)), handle.execution.pid,
                         handle.execution.id, "running", started))
        records.save_detached(self.db, cmd_id, self._exec_dir(name))
        self._drain_detached(name, cmd_id, handle.execution, handle)
        return self.detached_status(name, cmd_id)

    def _drain_detached(self, name: str, cmd_id: str, execution: Execution,
                        handle: ExecHandle | None = None) -> None:
        from .quota import CappedLog

        out_dir = self._exec_dir(name)
        cap = self._log_cap()

        def drain() -> None:
            status, code = "failed", None
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
                    self.db.execute("UPDATE detached SET status=?, exit_code=? WHERE id=? AND "
                                    "status='running'", (status, code, cmd_id))
                    records.save_detached(self.db, cmd_id, out_dir)

        t = threading.Thread(target=drain, name=f"ak-detached-{cmd_id}", daemon=True)
        self._detached_threads[cmd_id] = t
        self._detached_execs[cmd_id] = execution
        t.start()

    def _detached_row(self, name: str, cmd_id: str) -> dict[str, Any]:
        self._row(name)
        row = self.db.one("SELECT * FROM detached WHERE id=? AND sandbox=?", (str(cmd_id), name))
        if row is None:
            raise NotFound(f"no detached command {str(cmd_id)[:64]!r} in sandbox {name!r}")
        return row

    def _detached_info(self, row: dict[str, Any]) -> DetachedInfo:
        from .quota import dropped

        base = self._state_dir(row["sandbox"]) / "exec"
        cut = any(dropped(base / f"{row['id']}.{stream}") for stream in ("stdout", "stderr"))
        return DetachedInfo(id=row["id"], sandbox=row["sandbox"],
                            command=loads(row["command"], []), pid=row["pid"],
                            status=row["status"], started_at=rfc3339(row["started"]) or "",
                            exit_code=row["exit_code"], truncated=cut)

    def detached_list(self, name: str) -> list[DetachedInfo]:
        self._row(name)
        return [self._detached_info(r) for r in
                self.db.all("SELECT * FROM detached WHERE sandbox=? ORDER BY started", (name,))]

    def detached_status(self, name: str, cmd_id: str) -> DetachedInfo:
        return self._detached_info(self._detached_row(name, cmd_id))

    def _log_cap(self) -> int:
        from .quota import DEFAULT_LOG_BYTES

        cap = self.config.resources.detached_log if self.config is not None else None
        return DEFAULT_LOG_BYTES if cap is None else cap * 1024 * 1024

    def detached_logs(self, name: str, cmd_id: str, *, max_bytes: int | None = None
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

    def detached_kill(self, name: str, cmd_id: str) -> None:
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

    def _fail_detached(self, name: str) -> None:
        running = self.db.all("SELECT id FROM detached WHERE sandbox=? AND status='running'",
                              (name,))
        self.db.execute("UPDATE detached SET status='failed' WHERE sandbox=? AND "
                        "status='running'", (name,))
        exec_dir = self._state_dir(name) / "exec"
        for row in running:
            records.save_detached(self.db, row["id"], exec_dir)

    # ---- audit log ----

    def _audit(self, name: str, event: str, **fields: Any) -> None:
        entry = {"timestamp": rfc3339(_now()), "pid": os.getpid(), "user": _user(),
                 "type": event, "sandbox": name, **fields}
        with contextlib.suppress(OSError):
            path = self._state_dir(name)
            if path.is_dir():
                with open(path / "audit.jsonl", "a") as f:
                    f.write(json.dumps(entry) + "\n")

    def logs(self, name: str) -> list[dict[str, object]]:
        self._row(name)
        entries: list[dict[str, object]] = []
        with contextlib.suppress(OSError), open(self._state_dir(name) / "audit.jsonl") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    item = json.loads(line)
                    if isinstance(item, dict):
                        entries.append(item)
        return entries

    # ------------------------------------------------------------------ files

    def read_file(self, name: str, path: str, *, max_bytes: int | None = None) -> bytes:
        """A regular file's content; larger than max_bytes (default: the configured
        max_file_read_bytes) is refused with TooLarge, a device or FIFO by the agent."""
        path = validate_sandbox_path(path)
        cap = self.settings.max_file_read_bytes if max_bytes is None else max(0, max_bytes)
        live, _ = self._running(name)
        data = live.client.read_file(path, max_bytes=cap)
        self._audit(name, "file_read", path=path)
        return data

    def read_file_to(self, name: str, path: str, out: Any, *,
                     max_bytes: int | None = None) -> int:
        """Stream a regular file out of a sandbox (for `cp`): `out.write` blocking pauses
        the transfer at the agent; no size cap unless `max_bytes`."""
        path = validate_sandbox_path(path)
        live, _ = self._running(name)
        size = live.client.read_file_to(path, out, max_bytes=max_bytes)
        self._audit(name, "file_read", path=path)
        return size

    def write_file(self, name: str, path: str, data: Any, mode: int = 0o644) -> int:
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

    def delete_file(self, name: str, path: str) -> None:
        path = validate_sandbox_path(path)
        if path == "/":
            raise UsageError("cannot delete /")
        live, _ = self._running(name)
        live.client.remove(path, recursive=False)
        self._audit(name, "file_deleted", path=path)

    def stat_file(self, name: str, path: str) -> dict[str, Any]:
        path = validate_sandbox_path(path)
        live, _ = self._running(name)
        st = live.client.stat(path)
        return {"type": st.type, "mode": st.mode, "size": st.size}

    # ------------------------------------------------------------------ snapshots

    def _snap_dir(self) -> Path:
        path = self.root / "snapshots"
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    @staticmethod
    def _snap_info(row: dict[str, Any]) -> SnapshotInfo:
        doc = loads(row["spec"], {})
        cpus = doc.get("cpus")
        return SnapshotInfo(name=row["name"], sandbox=row["sandbox"],
                            image_tag=f"agentkernel-snapshot:{row['name']}",
                            backend=row["backend"], created_at=rfc3339(row["created"]) or "",
                            base_image=row["image"],
                            vcpus=max(1, round(cpus)) if cpus else None,
                            memory_mb=doc.get("memory_mb"))

    def snapshot(self, name: str, snapshot_name: str | None = None) -> SnapshotInfo:
        snap = snapshot_name or f"{name}-{time.strftime('%Y%m%d%H%M%S')}"
        validate_sandbox_name(snap)
        with self._name_lock(name):
            row = self._row(name)
            if _engine(row["backend"]) is not None:  # the engine's `commit`: an image
                if self.db.one("SELECT name FROM snapshots WHERE name=?", (snap,)):
                    raise Conflict(f"snapshot {snap!r} already exists")
                self._save_snapshot(name, row, snap, _engine_commit(row["backend"], name, snap))
                return self.get_snapshot(snap)
            facts = _facts(row["backend"])
            if not facts.snapshots:
                raise Conflict(f"the {row['backend']} backend cannot snapshot a sandbox's "
                               f"filesystem ({facts.snapshot_refusal})")
            if self.db.one("SELECT name FROM snapshots WHERE name=?", (snap,)):
                raise Conflict(f"snapshot {snap!r} already exists")
            target = self._snap_dir() / f"{snap}.tar"
            tmp = target.with_suffix(".tmp")
            state = self._layers_dir(name)
            members = [m for m in ("layers", "dirs") if (state / m).exists()]
            # GNU tar keeps overlayfs whiteouts (0/0 devices) and opaque-dir xattrs.
            argv = ["tar", "--xattrs", "--xattrs-include=user.*", "--xattrs-include=trusted.*",
                    "--exclude=./layers/*/work", "-C", str(state), "-cf", str(tmp),
                    *[f"./{m}" for m in members]]
            proc = subprocess.run(argv, capture_output=True, check=False, timeout=600)
            if proc.returncode not in (0, 1):  # 1: a file changed while read (running)
                tmp.unlink(missing_ok=True)
                raise SandboxError("snapshot failed: " +
                                   proc.stderr.decode(errors="replace").strip()[-300:])
            tmp.rename(target)
            self._save_snapshot(name, row, snap, str(target))
        return self.get_snapshot(snap)

    def _save_snapshot(self, name: str, row: dict[str, Any], snap: str, path: str) -> None:
        self.db.execute("INSERT INTO snapshots (name, sandbox, image, backend, profile, "
                        "spec, created, path) VALUES (?,?,?,?,?,?,?,?)",
                        (snap, name, row["image"], row["backend"], row["profile"],
                         row["spec"], _now(), path))
        records.save_snapshot(self.db, snap, self._snap_dir())
        self._audit(name, "snapshot_taken", snapshot=snap)

    def snapshots(self) -> list[SnapshotInfo]:
        return [self._snap_info(r) for r in self.db.all("SELECT * FROM snapshots ORDER BY name")]

    def _snap_row(self, snapshot_name: str) -> dict[str, Any]:
        validate_sandbox_name(snapshot_name)
        row = self.db.one("SELECT * FROM snapshots WHERE name=?", (snapshot_name,))
        if row is None:
            raise NotFound(f"snapshot {snapshot_name!r} not found")
        return row

    def get_snapshot(self, snapshot_name: str) -> SnapshotInfo:
        return self._snap_info(self._snap_row(snapshot_name))

    def delete_snapshot(self, snapshot_name: str) -> None:
        row = self._snap_row(snapshot_name)
        self.db.execute("DELETE FROM snapshots WHERE name=?", (snapshot_name,))
        if not _engine_snapshot_remove(row["backend"], row["path"]):
            Path(row["path"]).unlink(missing_ok=True)
        (self._snap_dir() / f"{snapshot_name}.json").unlink(missing_ok=True)

    def restore_snapshot(self, snapshot_name: str, new_name: str | None = None) -> SandboxInfo:
        """A new sandbox from a snapshot: named after its original sandbox if that name is
        free, else after the snapshot, else `<snapshot>-<hex>`."""
        row = self._snap_row(snapshot_name)
        candidates = [new_name] if new_name else [row["sandbox"], snapshot_name,
                                                 f"{snapshot_name[:50]}-{secrets.token_hex(3)}"]
        for name in candidates:
            validate_sandbox_name(name)
            with self._name_lock(name):
                if self.db.one("SELECT name FROM sandboxes WHERE name=?", (name,)):
                    if new_name:
                        raise Conflict(f"sandbox {name!r} already exists")
                    continue
                return self._restore_into(name, row)
        raise Conflict("no free name to restore the snapshot into")

    def _restore_into(self, name: str, snap: dict[str, Any]) -> SandboxInfo:
        state_dir = self._state_dir(name)
        if state_dir.exists():
            self._wipe_state(state_dir)
        state_dir.mkdir(mode=0o700, parents=True)
        spec_doc = snap["spec"]
        if _engine(snap["backend"]) is not None:  # an engine's image: no layers of ours
            spec_doc = dumps({**loads(spec_doc, {}), ENGINE_SNAPSHOT_KEY: snap["path"]})
            proc: subprocess.CompletedProcess[bytes] = subprocess.CompletedProcess([], 0)
        else:
            try:
                self._attach_disk(name, loads(snap["spec"], {}))
            except BaseException:
                self._wipe_state(state_dir)
                raise
            proc = subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "-C",
                                   str(self._layers_dir(name)), "-xf", snap["path"]],
                                  capture_output=True, check=False, timeout=600)
        if proc.returncode != 0:
            self._wipe_state(state_dir)
            raise SandboxError("restore failed: " +
                               proc.stderr.decode(errors="replace").strip()[-300:])
        backend = self._backend(snap["backend"])
        self.db.execute(
            "INSERT INTO sandboxes (name, uuid, status, backend, isolation, image, profile, spec,"
            " created, state_dir) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (name, str(uuid_mod.uuid4()), "stopped", backend.name, backend.isolation,
             snap["image"], snap["profile"], spec_doc, _now(), str(state_dir)))
        self._saved(name)
        self._audit(name, "sandbox_restored", snapshot=snap["name"])
        try:
            self._start_live(name)
        except BaseException:
            self.db.execute("DELETE FROM sandboxes WHERE name=?", (name,))
            self._wipe_state(state_dir)
            raise
        return self.get(name)

    # ------------------------------------------------------------------ the host

    def backends(self) -> list[BackendInfo]:
        from ..backends import BACKEND_NAMES, get_backend
        from ..backends.functional import cached

        infos = []
        for name in BACKEND_NAMES:
            backend = get_backend(name)
            probe = backend.probe()
            usable, reason = probe.ok, probe.detail
            seen = cached(backend) if probe.ok else None
            if seen is not None and not seen.ok:
                # It starts, yet a real command fails in it: `auto` skips it; asked for by
                # name it still runs (configured), but it is not one to rely on (usable).
                usable, reason = False, f"its functional probe failed: {seen.detail}"
            try:
                isolation = backend.isolation
            except Exception:
                isolation = name
            infos.append(BackendInfo(backend=name, configured=probe.ok, usable=usable,
                                     readiness_reason=reason, isolation=isolation,
                                     capabilities=backend.capabilities()))
        return infos

    def pool_status(self) -> list[PoolKeyStatus]:
        return self.pool.status()

    def _configure_pools(self) -> None:
        """Declare the configured pool keys (resolved as a plain `run` would)."""
        for entry in self.settings.pools:
            try:
                req = RunRequest(argv=["true"], image=entry.image, profile=entry.profile,
                                 backend=entry.backend)
                key, plan = self._plan_run(req)
                backend, rootfs = plan.backend, plan.rootfs
            except AgentKernelError as exc:
                print(f"agentkernel daemon: pool {entry}: {exc.message}", flush=True,
                      file=sys.stderr)
                continue
            lo = entry.min if entry.min is not None else self.settings.pool_min
            hi = entry.max if entry.max is not None else self.settings.pool_max
            self.pool.configure(key, backend, rootfs, lo, hi)

    # ------------------------------------------------------------------ background

    def _reaper(self) -> None:
        last_health = last_disk = time.monotonic()
        while not self._closed.wait(self.settings.reaper_interval):
            now = _now()
            for row in self.db.all("SELECT name FROM sandboxes WHERE expires IS NOT NULL AND "
                                   "expires <= ?", (now,)):
                with contextlib.suppress(Exception):
                    self.remove(row["name"])
                    print(f"agentkernel daemon: sandbox {row['name']} expired and was removed",
                          file=sys.stderr, flush=True)
            if time.monotonic() - last_health >= HEALTH_INTERVAL:
                last_health = time.monotonic()
                self._health()
            if time.monotonic() - last_disk >= DISK_CHECK_INTERVAL:
                last_disk = time.monotonic()
                self.check_disks()

    def check_disks(self) -> list[str]:
        """Stop running sandboxes that grew past a quota no mounted image enforces (a
        daemon run by an ordinary user); returns their names."""
        from . import quota

        stopped = []
        for row in self.db.all("SELECT name, spec, state_dir FROM sandboxes "
                               "WHERE status='running'"):
            limit = loads(row["spec"], {}).get("disk_mb")
            state = Path(row["state_dir"])
            if not limit or quota.image_path(state).exists() or \
                    quota.usage(state) <= limit * quota.MIB:
                continue
            with contextlib.suppress(Exception), self._name_lock(row["name"]):
                self._stop_locked(row["name"], self._row(row["name"]))
                self._audit(row["name"], "sandbox_stopped",
                            reason=f"its files outgrew the disk quota ({limit} MiB)")
                stopped.append(row["name"])
        return stopped

    def _health(self) -> None:
        with self._lock:
            lives = list(self._live.values())
        for live in lives:
            dead = not live.client.alive or (
                live.sandbox.process.poll() is not None if live.sandbox is not None
                else not procs.alive(live.pid, live.pid_start))
            if not dead:
                continue
            with contextlib.suppress(Exception), self._name_lock(live.name):
                row = self._row(live.name)
                self._stop_locked(live.name, row)
                self._audit(live.name, "sandbox_stopped", reason="it died")


def _facts(backend: str) -> type[Backend]:
    """The facts of backend `backend` (its class): what it can do, how it is cleaned up."""
    from ..backends import backend_class

    return backend_class(backend)


def _scratch_owner(scratch: Path) -> str:
    """The backend whose sandbox left `scratch` (the plainest one when none claims it)."""
    from ..backends import BACKEND_NAMES, backend_class, by_strength

    for name in BACKEND_NAMES:
        if backend_class(name).owns_scratch(scratch):
            return name
    return by_strength()[-1]


def _own_context(config: Config | None) -> CallerContext:
    """This daemon's own context: its environment, its config in the user config's place."""
    from ..context import caller_env
    from ..planner import CallerContext

    return CallerContext(env=caller_env(), loaded_user_config=config)


def _shut_agent(sock: Path) -> None:
    """Ask a persistent sandbox's agent to end it (best effort)."""
    if not sock.exists():
        return
    with contextlib.suppress(Exception):
        client = AdoptingClient.connect(sock, set(), timeout=2.0)
        try:
            client.hello(timeout=2.0)
            client.shutdown()
        finally:
            client.close()


def _has_procs(group_dir: Path) -> bool:
    with contextlib.suppress(OSError):
        return any(p.read_text().strip() for p in group_dir.rglob("cgroup.procs"))
    return False


def _precompile_seccomp() -> None:
    """Compile every profile's seccomp program once, before concurrent starts race on it."""
    from ..profiles import PROFILES
    from ..seccomp import compile_bpf

    for profile in PROFILES.values():
        with contextlib.suppress(Exception):
            compile_bpf(profile.seccomp, no_setid=profile.workspace == "rw")


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return str(os.getuid())


# --- container engines (docker, podman): their containers outlive us in the engine ---------
def _remove_container(backend: str, name: str) -> None:
    """A removed sandbox's container (and its layer) goes from the engine too."""
    from ..backends import get_backend
    from ..backends.container_engine import ContainerBackend

    engine = get_backend(backend)
    if isinstance(engine, ContainerBackend):
        engine.remove_container(name)


def _sweep_containers(known: set[str]) -> list[str]:
    """What a dead daemon left in the engines: its pool's containers, and the containers of
    persistent sandboxes no longer recorded. Engines that are not running are skipped."""
    from ..backends import BACKEND_NAMES, get_backend
    from ..backends.container_engine import ContainerBackend

    out = []
    for name in BACKEND_NAMES:
        engine = get_backend(name)
        if not isinstance(engine, ContainerBackend) or engine.socket_path() is None:
            continue
        with contextlib.suppress(AgentKernelError):
            out += [f"removed {name} container of {gone}" for gone in engine.sweep(known)]
    return out


def _egress_of(doc: dict[str, Any]) -> Any:
    """A persistent sandbox's egress policy, from its record (egress_policy)."""
    from ..egress_policy import Policy

    return Policy.from_json(doc["egress"]) if doc.get("egress") else None


# Snapshots of container sandboxes: the engine's `commit` (an image in the engine's store,
# recorded as the snapshot's path); a restored sandbox's container is made from it.
ENGINE_SNAPSHOT_KEY = "engine_snapshot"


def _engine(backend: str) -> ContainerBackend | None:
    """Backend `backend` when it drives a container engine (docker, podman)."""
    from ..backends import get_backend
    from ..backends.container_engine import ContainerBackend

    engine = get_backend(backend)
    return engine if isinstance(engine, ContainerBackend) else None


def _engine_commit(backend: str, name: str, snap: str) -> str:
    from ..backends.container_engine import snapshot_ref

    engine = _engine(backend)
    assert engine is not None
    return snapshot_ref(engine.commit(name, snap))


def _engine_snapshot_rootfs(doc: dict[str, Any], rootfs: Any) -> Any:
    from ..backends.container_engine import snapshot_rootfs

    ref = doc.get(ENGINE_SNAPSHOT_KEY)
    return snapshot_rootfs(rootfs, ref) if ref else rootfs


def _engine_snapshot_remove(backend: str, path: str) -> bool:
    """Remove a snapshot's image from its engine; False when `path` is not one."""
    from ..backends.container_engine import remove_snapshot

    engine = _engine(backend)
    return engine is not None and remove_snapshot(engine, path)
