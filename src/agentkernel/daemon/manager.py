"""SandboxManager, the daemon's one facade: composed of one mixin per resource (sandboxes,
execs, runs, detached, files, snapshots, recovery); here its state, lifecycle, resolution
(backends, root filesystems, plans) and background threads."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import procs
from ..agent.client import Execution
from ..errors import AgentKernelError, NotFound, UsageError
from ..names import validate_sandbox_name
from ..paths import data_dir
from .api import BackendInfo, PoolKeyStatus, RunRequest
from .common import _now
from .containers import _engine_snapshot_rootfs
from .detached import DetachedMixin
from .execs import ExecMixin
from .files import FilesMixin
from .handles import Live
from .pool import WarmPool
from .recovery import RecoveryMixin
from .runs import RunsMixin
from .sandboxes import SandboxesMixin
from .snapshots import SnapshotsMixin
from .state import StateDB
from .store import Store

if TYPE_CHECKING:
    from ..backends import Backend, CallerOptions, Choice
    from ..config import Config, DaemonSection
    from ..images import ImageConfig
    from ..images.registry import RegistryOptions
    from ..planner import CallerContext, Plan
    from ..planner import RunRequest as PlanRequest
    from ..rootfs import HostRootfs
    from ..sandbox import SandboxSpec

ROOTFS_CACHE_SECONDS = 60.0  # a resolve that fell back to the host's userland (offline)
IMAGE_CACHE_SECONDS = 2.0  # an image found in the store (`images pull` may move its tag)
BACKEND_CACHE_SECONDS = 10.0
HEALTH_INTERVAL = 5.0
# How often the disk use of sandboxes whose quota is not a mounted image is measured.
DISK_CHECK_INTERVAL = 30.0


@dataclass
class _Resolved:
    """A sandbox spec resolved from its stored description."""

    spec: SandboxSpec
    backend: Backend
    env: dict[str, str]
    cwd: str


def _fresh_host(value: Any) -> tuple[HostRootfs, ImageConfig | None, str, str | None]:
    """A cached resolve, with the host's userland described anew (its always-masked paths
    are looked up per plan: rootfs.host_rootfs) when that is what it resolved to."""
    from ..rootfs import host_rootfs

    rootfs, *rest = value
    return (host_rootfs(), *rest) if rootfs.name == "host" else value


class SandboxManager(RecoveryMixin, SandboxesMixin, ExecMixin, RunsMixin, DetachedMixin,
                     FilesMixin, SnapshotsMixin):
    """Implements `SandboxService` (daemon/api.py). Thread-safe."""

    def __init__(self, config: Config | None = None, *, start_threads: bool = True,
                 configured_pools: bool = True) -> None:
        from ..config import DaemonSection

        self.config = config
        self.settings: DaemonSection = config.daemon if config is not None else DaemonSection()
        self.root = data_dir()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.db = StateDB(self.root / "state.db")
        self.store = Store(self.db)  # every query of the state: store.py
        from ..egress_forkserver import enable
        from ..paths import runtime_dir

        # Egress gates forked from a pre-imported server (~85 ms less CPU each), which
        # listens in our runtime dir for the daemon after us if we are killed (recover).
        enable(str(runtime_dir() / "gate-forks"))
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
        return self.store.any_running()

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
        answers another's with other mirrors. An image the store has is looked up again
        after IMAGE_CACHE_SECONDS: a pull that moved its tag counts from then on."""
        from ..planner import resolve_rootfs

        fallback = config.images.offline_fallback if config is not None else "host"
        ck = (image, registry.fingerprint(), fallback)
        with self._lock:
            hit = self._rootfs_cache.get(ck)
        ttl = ROOTFS_CACHE_SECONDS if hit is not None and hit[1][0].name == "host" \
            else IMAGE_CACHE_SECONDS
        if hit is not None and time.monotonic() - hit[0] < ttl:
            return _fresh_host(hit[1])
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
        from ..planner import same_path_target, sandbox_cwd, sandbox_env
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
        ro_binds = tuple((str(a), str(b)) for a, b in doc.get("ro_binds") or ())
        at = doc.get("workspace_at") or "/workspace"
        if workspace is not None and at != "/workspace":
            # Checked again at each start: its path may have changed (a symlink now).
            at = same_path_target(str(at), rootfs, home_opt, ro_binds)
        user = _user_of(doc)  # an agent's user (None: the sandbox's root)
        spec = SandboxSpec(name=name, profile=profile, rootfs=rootfs, image=doc["image"],
                           workspace=workspace, home=home_opt, persistent=True,
                           state_dir=self._layers_dir(name),
                           masks=control_masks(profile, workspace, home_opt, at),
                           egress=_egress_of(doc), ro_binds=ro_binds, workspace_at=at,
                           user=user,
                           instance=self._row(name)["uuid"])  # its audit entries' key
        env = sandbox_env(name, image_config, profile, home_opt, doc.get("host_env", {}))
        env.update(doc.get("env", {}))
        cwd = sandbox_cwd(None, workspace is not None, image_config, at,
                          user[2] if user is not None else "/root")
        return _Resolved(spec, backend, env, cwd)

    def serves(self, data_dir: str) -> bool:
        """Whether a caller of `data_dir` (its own, as its request says) is this daemon's:
        a caller of another data dir sharing our runtime dir (root with another HOME or
        AGENTKERNEL_HOME) must not have its sandboxes made in, or taken from, ours."""
        from pathlib import Path

        return Path(data_dir).resolve() == self.root.resolve()

    def _state_dir(self, name: str) -> Path:
        validate_sandbox_name(name)
        return self.root / "sandboxes" / name

    def _disk_mb(self, config: Config | None) -> int | None:
        """The disk quota of a new persistent sandbox: its project's, the daemon's, or the
        default; None when one of them says `unlimited`."""
        from ..profiles import DEFAULT_DISK_MB

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
            backend.pooled()
            self.pool.configure(key, backend, rootfs, lo, hi)

    # ------------------------------------------------------------------ background

    def _reaper(self) -> None:
        last_health = last_disk = time.monotonic()
        while not self._closed.wait(self.settings.reaper_interval):
            now = _now()
            for name in self.store.expired(now):
                with contextlib.suppress(Exception):
                    self.remove(name)
                    print(f"agentkernel daemon: sandbox {name} expired and was removed",
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
        for row in self.store.sandboxes("running"):
            limit = row["spec"].get("disk_mb")
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


def _own_context(config: Config | None) -> CallerContext:
    """This daemon's own context: its environment, its config in the user config's place."""
    from ..context import caller_env
    from ..planner import CallerContext

    return CallerContext(env=caller_env(), loaded_user_config=config)


def _precompile_seccomp() -> None:
    """Compile every profile's seccomp program once, before concurrent starts race on it."""
    from ..profiles import PROFILES
    from ..seccomp import compile_bpf

    for profile in PROFILES.values():
        with contextlib.suppress(Exception):
            compile_bpf(profile.seccomp, no_setid=profile.workspace == "rw")


def _egress_of(doc: dict[str, Any]) -> Any:
    """A persistent sandbox's egress policy, from its record (egress_policy)."""
    from ..egress_policy import Policy

    return Policy.from_json(doc["egress"]) if doc.get("egress") else None


def _user_of(doc: dict[str, Any]) -> tuple[int, int, str] | None:
    """The (uid, gid, HOME) an agent's kept sandbox runs its commands as (None: its root;
    so are sandboxes of older daemons). A malformed entry is refused, never run as root."""
    user = doc.get("user")
    if user is None:
        return None
    if (not isinstance(user, list) or len(user) != 3 or
            not all(isinstance(i, int) and not isinstance(i, bool) and 0 < i <= 65535
                    for i in user[:2]) or
            not isinstance(user[2], str) or not user[2].startswith("/")):
        raise AgentKernelError("the sandbox's record has a malformed user")
    return int(user[0]), int(user[1]), str(user[2])
