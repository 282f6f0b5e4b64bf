"""The one place a run is decided: a request and its caller's context become a typed Plan.

Every front door plans here, and nowhere else: the in-process `agentkernel run`
(cli -> engine), the daemon's unix socket (`run`, `create`; the CLI sends its context with
the request, see context.py) and the HTTP API of the SDKs (which plans from the serving
daemon's own context: an SDK caller has no directory, user config or environment of ours
to send). A plan is computed from the *caller's* context only — its directory and
project config, its user config, the environment variables that change behaviour — never
from the process that happens to compute it.

`outcome()` is the one mapping from how a command ended (exit code, signal, timeout, OOM,
a sandbox that died under it) to our exit code and message, for every path.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from .context import PASS_ENV_KEYS, caller_env, user_config_path
from .errors import BackendUnavailable, ConfigError, Conflict, UsageError

if TYPE_CHECKING:
    from .agent.client import ExitStatus
    from .backends import Backend, CallerOptions, Choice
    from .config import Config
    from .egress_policy import Policy
    from .images import ImageConfig
    from .images.registry import RegistryOptions
    from .profiles import Profile, WorkspaceMode
    from .rootfs import HostRootfs
    from .sandbox import SandboxSpec
    from .secrets_store import Use
    from .vm.settings import MicrovmSettings

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_IMAGE = "host"  # the pseudo image: the host's userland, read-only, no registry involved
# The rootfs note of a run whose image could not be had (offline_fallback = "host").
UNAVAILABLE_ROOTFS = "host userland, read-only (image unavailable)"
EXIT_TIMEOUT = 124  # as timeout(1)
EXIT_OOM = 128 + signal.SIGKILL  # 137: what a shell reports for the kernel's OOM kill


# ---------------------------------------------------------------------- request, context


class RunRequest(NamedTuple):
    """What a run (or a persistent sandbox) is asked to be, from any front door."""

    argv: list[str]
    # The caller's project dir: its agentkernel.toml, image detection, /workspace.
    # None: no project dir (an SDK's run, a sandbox created without --dir).
    cwd: Path | None
    image: str | None = None
    profile: str | None = None
    backend: str | None = None
    no_network: bool = False
    env: Mapping[str, str] = {}  # KEY=VALUE for the command (validated here)
    workdir: str | None = None
    timeout: float | None = None
    keep: bool = False
    memory_mb: int | None = None  # profiles.UNLIMITED (0): no cap
    pids: int | None = None  # likewise
    cpus: float | None = None
    config_path: Path | None = None  # an explicit --config
    forward_stdin: bool = False
    allow_hosts: tuple[str, ...] = ()  # egress policy (egress_policy.policy_for)
    deny_hosts: tuple[str, ...] = ()
    add_hosts: tuple[str, ...] = ()
    secrets: tuple[str, ...] = ()  # names in the host's store (secrets_store)
    # Host dirs shown read-only (host path, in-sandbox path): `run --agent`'s install.
    ro_binds: tuple[tuple[str, str], ...] = ()
    # An AI coding agent of the registry (`create --agent`, HTTP's `agent`): its install,
    # variables, hosts and stored key join the request (`with_agent`).
    agent: str | None = None
    # The project's mount (profiles.WorkspaceMode: rw, cow, ro) over the profile's; an
    # agent's is rw (its edits are the point; `run --agent --review` edits a copy).
    workspace: str | None = None
    # Show the project at this host path (its own, or the original of --review's copy)
    # instead of /workspace: `run --agent`, `create --agent` (same_path_target checks it).
    workspace_at: str | None = None
    # `run --agent`: the variable of the caller's environment that holds the agent's key
    # (with_agent makes it a held key; its value reaches the gate at the start only).
    agent_key: str | None = None
    # Keys the caller holds, not in the store (with_agent's): placeholders like secrets'.
    held_keys: tuple[Use, ...] = ()
    # Commands run as (uid, gid, HOME) inside, not uid 0 (with_agent's, one-shot runs).
    user: tuple[int, int, str] | None = None
    # `run --agent --settings`: copies of the caller's agent instructions and skills
    # (agents/settings.py) go into the agent's HOME before it starts (with_agent reads
    # them into `home_files`: (path inside, bytes, mode)).
    agent_settings: bool = False
    home_files: tuple[tuple[str, bytes, int], ...] = ()
    home_skipped: tuple[str, ...] = ()  # what of them was left out, one warning each
    # An MCP client's (an agent's) request: its image's pull reaches no loopback, private
    # or link-local address the caller's settings do not name (RegistryOptions.public_only).
    registry_public_only: bool = False


@dataclass(frozen=True)
class CallerContext:
    """Who a plan is for: the environment variables of theirs that change a plan
    (context.CONTEXT_ENV_KEYS), and their user config file. Built by the caller's own
    process (`here()`), or sent by the CLI to the daemon (`from_wire`)."""

    env: Mapping[str, str] = field(default_factory=dict)
    user_config: str | None = None  # a path; loaded under the project's config
    # Already loaded in place of `user_config` (the daemon's own config, for HTTP).
    loaded_user_config: Config | None = None

    @classmethod
    def here(cls) -> CallerContext:
        """This process's context (the in-process run; the daemon's own, for HTTP)."""
        return cls(env=caller_env(), user_config=user_config_path())

    @classmethod
    def from_wire(cls, env: Mapping[str, object], user_config: object) -> CallerContext:
        """A context a client sent: strings only, known keys only, an absolute path."""
        from .context import CONTEXT_ENV_KEYS

        clean: dict[str, str] = {}
        for key, value in env.items():
            if key not in CONTEXT_ENV_KEYS:
                raise UsageError(f"caller_env: {key[:40]!r} is not a variable a plan reads")
            if not isinstance(value, str) or "\0" in value:
                raise UsageError(f"caller_env: {key} must be a string without NUL")
            clean[key] = value
        path = None
        if user_config is not None:
            if not isinstance(user_config, str) or not os.path.isabs(user_config):
                raise UsageError("user_config must be an absolute path")
            path = user_config
        return cls(env=clean, user_config=path)

    @property
    def home(self) -> Path | None:
        home = self.env.get("HOME")
        return Path(home) if home and os.path.isabs(home) else None


# ---------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    """A decided run: what will run where, decided before anything starts."""

    config: Config | None
    image: str  # what was asked for or detected (reported)
    image_reason: str
    rootfs: HostRootfs
    rootfs_key: str  # what backs the root: the image, or "host" (two plans share sandboxes)
    rootfs_note: str  # e.g. "image docker.io/library/alpine:3.20 (sha256:…)"
    image_config: ImageConfig | None
    profile: Profile
    backend: Backend
    skipped: tuple[str, ...]  # stronger backends `auto` passed over, and why (`-v`)
    workspace: Path | None
    home: Path | None  # only when the profile mounts it
    argv: list[str]  # what runs: the image's entrypoint, if any, then the command
    cwd: str  # where it starts inside
    user_env: dict[str, str]  # the request's -e
    pass_env: dict[str, str]  # the caller's variables the profile passes through
    warnings: tuple[str, ...]
    microvm: MicrovmSettings | None = None
    registry: RegistryOptions | None = None  # where its image came from (the caller's)
    # What the sandbox may reach (egress_policy); None: no egress. Secrets' placeholders
    # are in `secret_env` (the values never are in a plan).
    egress: Policy | None = None
    secret_env: Mapping[str, str] = field(default_factory=dict)
    ro_binds: tuple[tuple[str, str], ...] = ()  # RunRequest.ro_binds
    workspace_at: str = "/workspace"  # where the project is shown (same_path_target)
    user: tuple[int, int, str] | None = None  # RunRequest.user
    home_files: tuple[tuple[str, bytes, int], ...] = ()  # RunRequest.home_files

    def env(self, sandbox_name: str) -> dict[str, str]:
        """The command's environment in a sandbox called `sandbox_name`."""
        env = sandbox_env(sandbox_name, self.image_config, self.profile, self.home,
                          self.pass_env)
        env.update(self.user_env)
        env.update(self.secret_env)
        return env

    def spec(self, name: str, *, persistent: bool = False,
             state_dir: Path | None = None) -> SandboxSpec:
        from .controlplane import control_masks
        from .sandbox import SandboxSpec

        return SandboxSpec(name=name, profile=self.profile, rootfs=self.rootfs,
                           image=self.image, workspace=self.workspace, home=self.home,
                           persistent=persistent, state_dir=state_dir,
                           masks=control_masks(self.profile, self.workspace, self.home,
                                               self.workspace_at),
                           egress=self.egress, ro_binds=self.ro_binds,
                           workspace_at=self.workspace_at, user=self.user)

    def summary(self) -> dict[str, object]:
        """What the plan decided, as plain data (`-v`, `--json`, the parity tests)."""
        p = self.profile
        return {"image": self.image, "image_reason": self.image_reason,
                "rootfs": self.rootfs_note, "backend": self.backend.name,
                "profile": p.name, "network": p.network, "workspace": p.workspace,
                "memory_mb": p.memory_mb, "pids": p.pids, "cpus": p.cpus,
                "argv": list(self.argv), "cwd": self.cwd, "env": dict(self.user_env),
                "warnings": list(self.warnings), "skipped": list(self.skipped),
                "user": list(self.user) if self.user is not None else None}


def sandbox_env(name: str, image_config: ImageConfig | None, profile: Profile,
                home: Path | None, caller: Mapping[str, str]) -> dict[str, str]:
    """The base environment of a sandbox's commands (before the request's own -e):
    ours, then the image's, the sandbox's name, and the caller's PASS_ENV_KEYS when the
    profile passes them."""
    env = {"PATH": DEFAULT_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
    if image_config is not None:
        env.update(image_config.env_dict())  # the image's PATH and friends win over ours
    env["AGENTKERNEL_SANDBOX"] = name
    if profile.pass_env:
        for key in PASS_ENV_KEYS:
            if key in caller:
                env[key] = caller[key]
        if profile.mount_home and home is not None:
            env["HOME"] = "/home/user"  # where the host home is mounted
    return env


class Resolvers(NamedTuple):
    """How a planner reaches the host: backends and root filesystems. The daemon passes
    cached ones (keyed by the caller's settings); unit tests pass fakes."""

    choose: Callable[[str, CallerOptions], Choice]
    rootfs: Callable[[str, Config | None, RegistryOptions, bool],
                     tuple[HostRootfs, ImageConfig | None, str, str | None]]


def default_resolvers() -> Resolvers:
    from .backends import choose

    return Resolvers(choose=choose, rootfs=resolve_rootfs)


def plan(req: RunRequest, ctx: CallerContext, *, quiet: bool = False,
         resolvers: Resolvers | None = None, persistent: bool = False) -> Plan:
    """Decide config, image, profile, backend, root filesystem, environment and command.
    Nothing is started; the only effects are a pull of a missing image and the caches.
    `persistent`: a sandbox that lives on (`create`), whose commands come later."""
    from .backends import CallerOptions
    from .detect import resolve_run_image, validate_image_ref
    from .vm.settings import resolve as microvm_settings

    res = resolvers or default_resolvers()
    if req.agent is not None:
        req = with_agent(req, persistent=persistent, home=ctx.home)
    config, source, warnings = load_configs(req, ctx)
    warnings = [*warnings, *req.home_skipped]
    if req.image and req.image != HOST_IMAGE:
        validate_image_ref(req.image)
    cfg_image = config.image if config is not None else None
    cwd = req.cwd if req.cwd is not None else _NOWHERE
    backend_name = req.backend or (config.sandbox.backend if config is not None else None) \
        or "auto"
    microvm = microvm_settings(config.microvm if config is not None else None, ctx.env)
    auto = _project_backend_floor(req, config, backend_name, res,
                                  CallerOptions(microvm=microvm), warnings)
    if auto is not None:
        backend_name = "auto"
    wasm = _wasm_decision(req, backend_name, warnings)
    if wasm is not None:  # no image to resolve (nor a project dir to scan for one)
        backend_name, image, reason = wasm
    else:
        image, reason = resolve_run_image(
            req.argv, cwd, cli_image=req.image,
            config_image_from_flag=cfg_image if source == "flag" else None,
            project_config_image=cfg_image if source in ("project", "user") else None,
        )
    profile = resolve_profile(req, config)
    choice = auto if auto is not None and backend_name == "auto" else \
        res.choose(backend_name, CallerOptions(microvm=microvm))
    if persistent and not choice.backend.persistent:
        raise Conflict(f"the {choice.backend.name} backend keeps no sandbox between runs: "
                       "run a module with `agentkernel run MODULE.wasm` instead")
    registry: RegistryOptions | None = None
    # A container engine's own copy of the image first, when the backend has one.
    engine = None if choice.backend.image_free else choice.backend.engine_image(image)
    if choice.backend.image_free:  # wasm: no image, so no registry, no userland to describe
        rootfs, image_config, note, fallback = _image_free_rootfs()
    elif engine is not None:
        rootfs, image_config, note = engine
        fallback = None
        # A one-off run on the engine's image pulls nothing: the registry client (~5 ms of
        # imports on a cold run) stays unloaded; a persistent sandbox records its settings.
        if persistent:
            registry = _registry_options(config, ctx, req)
    else:
        registry = _registry_options(config, ctx, req)
        rootfs, image_config, note, fallback = res.rootfs(image, config, registry, quiet)
    workspace = req.cwd if req.cwd is not None and profile.workspace != "none" else None
    home = ctx.home
    home = home if profile.mount_home and home is not None and home.is_dir() else None
    from .controlplane import control_masks

    workspace_at = "/workspace"
    if workspace is not None and req.workspace_at is not None:
        workspace_at = same_path_target(req.workspace_at, rootfs, home, req.ro_binds,
                                        warnings)
    control_masks(profile, workspace, home, workspace_at)  # refused here, before any start
    ro_binds = req.ro_binds
    if req.agent is not None and workspace is not None and profile.workspace == "rw":
        # (A copy-on-write project's changes, .git's too, reach it only through --review.)
        from .agents.gitpin import git_pins

        ro_binds = (*ro_binds, *git_pins(workspace, workspace_at))
    extra = [choice.warning, fallback, user_warning(image, image_config)]
    egress, secret_env = egress_of(req, profile, config, warnings)
    return Plan(
        config=config, image=image, image_reason=reason, rootfs=rootfs,
        rootfs_key="host" if note.startswith("host") else image, rootfs_note=note,
        image_config=image_config, profile=profile, backend=choice.backend,
        skipped=tuple(choice.skipped), workspace=workspace, home=home,
        argv=[] if persistent and not req.argv else command_argv(image_config, list(req.argv)),
        cwd=sandbox_cwd(req.workdir, workspace is not None, image_config, workspace_at,
                        req.user[2] if req.user is not None else "/root"),
        user_env=check_env(req.env),
        pass_env={k: ctx.env[k] for k in PASS_ENV_KEYS if k in ctx.env},
        warnings=(*warnings, *(w for w in extra if w)), microvm=microvm, registry=registry,
        egress=egress, secret_env=secret_env, ro_binds=ro_binds,
        workspace_at=workspace_at, user=req.user, home_files=req.home_files,
    )


def _project_backend_floor(req: RunRequest, config: Config | None, name: str,
                           res: Resolvers, options: CallerOptions,
                           warnings: list[str]) -> Choice | None:
    """`auto`'s choice in place of a backend a project file named where you named none
    (flag, your config), when the project's is weaker: a cloned repository may choose
    among backends at least as strong as `auto` would pick here, never lower isolation
    by itself (as with its numeric caps: config._raises_cap). None: `name` stands."""
    source = config.project_backend if config is not None and req.backend is None else None
    if source is None or name == "auto":
        return None
    from .backends import backend_class

    try:
        auto = res.choose("auto", options)
    except BackendUnavailable:
        return None  # nothing works by itself here: the project's choice is all there is
    if backend_class(name).strength >= auto.backend.strength:
        return None
    warnings.append(f'{source}: [sandbox] backend "{name}" ignored: it is weaker than '
                    f'{auto.backend.name}, which auto picks here (a project file may not '
                    f'lower isolation); `-B {name}`, a backend in your config or '
                    f'`-c {source}` chooses it')
    return auto


def project_backend_refusal(config: Config | None, env: Mapping[str, str],
                            warnings: list[str]) -> str | None:
    """What `plan` runs on in place of the project file's `[sandbox] backend` where it
    refuses that one (_project_backend_floor, no -B given): auto's pick, its warning added
    to `warnings`; None where the project's stands. For `agentkernel config`."""
    from .backends import CallerOptions
    from .vm.settings import resolve as microvm_settings

    if config is None or config.project_backend is None:
        return None
    options = CallerOptions(microvm=microvm_settings(config.microvm, env))
    auto = _project_backend_floor(RunRequest(argv=[], cwd=None), config,
                                  config.sandbox.backend, default_resolvers(), options,
                                  warnings)
    return auto.backend.name if auto is not None else None


def _registry_options(config: Config | None, ctx: CallerContext,
                      req: RunRequest) -> RegistryOptions:
    from .images.registry import RegistryOptions

    opts = RegistryOptions.from_config(config, env=ctx.env)
    opts.public_only = req.registry_public_only
    return opts


def _image_free_rootfs() -> tuple[HostRootfs, None, str, None]:
    """An image-free backend's root (wasm: its worker's root is its own, wasm.worker_rootfs):
    an empty placeholder, its note, no image config, no fallback."""
    from .detect import WASM_ROOTFS
    from .rootfs import HostRootfs

    return HostRootfs((), (), name="none"), None, WASM_ROOTFS, None


def same_path_target(path: str, rootfs: HostRootfs, home: Path | None,
                     ro_binds: tuple[tuple[str, str], ...],
                     warnings: list[str] | None = None) -> str:
    """Where an agent's project is shown: at `path`, its own host path, when
    controlplane.workspace_target allows it next to the sandbox's other mounts; else at
    /workspace, with a one-line warning (with `warnings` None: the UsageError)."""
    from .controlplane import HOME, workspace_target

    occupied = (*(e.path for e in rootfs.entries), *(t for _, t in ro_binds),
                *((HOME,) if home is not None else ()))
    try:
        return workspace_target(Path(path), occupied)
    except UsageError as exc:
        if warnings is None:
            raise
        warnings.append(f"the project is shown at /workspace, not at its own path: {exc}")
        return "/workspace"


def with_agent(req: RunRequest, *, persistent: bool = False,
               home: Path | None = None) -> RunRequest:
    """An agent sandbox: the agent's install (read-only), variables, API hosts and its
    key (agents/request.py: the caller's `agent_key` variable, else the stored secret that
    covers it), under the request's own -e, lists and limits; namespaces or gVisor
    (agents/request.agent_backend: their gate keeps the key outside) and the host's
    userland (the agents are built for it) unless the request names an image. The command
    is the agent's binary with the request's argv as its arguments (a kept sandbox
    without argv: none yet). With `agent_settings`, the caller's (`home`) agent
    instructions and skills, read now, for the agent's HOME."""
    from .agents.request import (
        AGENT_MEMORY_MB,
        agent_backend,
        agent_home,
        agent_run,
        agent_user,
    )

    assert req.agent is not None
    backend = agent_backend(req.backend)
    if req.no_network:
        raise UsageError("an agent sandbox needs the network to reach the agent's API")
    agent = agent_run(req.agent, DEFAULT_PATH, key_env=req.agent_key)
    # The agent is not uid 0 inside (agents/request.agent_user: namespaces, one-shot or
    # kept, whose HOME /home/agent persists with its /home; gVisor started by root).
    user = agent_user(backend, persistent=persistent)
    home_env = {"HOME": user[2] if user is not None else agent_home(backend)}
    files, skipped = _settings_files(req, home, home_env["HOME"])
    return req._replace(
        home_files=files, home_skipped=skipped,
        backend=backend, image=req.image or HOST_IMAGE, user=user,
        memory_mb=AGENT_MEMORY_MB if req.memory_mb is None else req.memory_mb,
        env={**agent.env, **home_env, **req.env}, allow_hosts=(*agent.hosts, *req.allow_hosts),
        secrets=(*req.secrets, *((agent.secret,) if agent.secret else ())),
        held_keys=(*req.held_keys, *((agent.held,) if agent.held else ())),
        ro_binds=(*req.ro_binds, *agent.ro_binds),
        workspace=req.workspace or "rw",
        workspace_at=req.workspace_at or (str(req.cwd) if req.cwd is not None else None),
        argv=[agent.binary, *req.argv] if req.argv or not persistent else [])


def _settings_files(req: RunRequest, home: Path | None, inside: str
                    ) -> tuple[tuple[tuple[str, bytes, int], ...], tuple[str, ...]]:
    """`agent_settings`: the files of the agent's row's `settings` under the caller's HOME
    (agents/settings.collect: no link followed, no settings or sign-in file, bounded), at
    their place under the agent's HOME `inside`; and a warning per file skipped."""
    if not req.agent_settings:
        return (), ()
    if home is None:
        raise UsageError("--settings: the caller's HOME is not known")
    from .agents.registry import get
    from .agents.settings import collect

    assert req.agent is not None
    found, skipped = collect(get(req.agent), home)
    return (tuple((f"{inside}/{f.path}", f.data, f.mode) for f in found),
            tuple(f"settings: skipped {line}" for line in skipped))


def egress_of(req: RunRequest, profile: Profile, config: Config | None,
              warnings: list[str] | None = None) -> tuple[Policy | None, dict[str, str]]:
    """The run's egress policy (config `[network]`, then the request's lists) and, for each
    secret it uses (--secret, `[secrets.NAME]`: secrets_store.resolve_uses), a placeholder
    in its variable (secrets_store.grant_secrets)."""
    from .egress_policy import policy_for

    policy = policy_for(profile.network, config, req.allow_hosts, req.deny_hosts,
                        req.add_hosts)
    env: dict[str, str] = {}
    # (a run without egress has no use for the config's secrets; --secret there is refused)
    if req.secrets or req.held_keys or (policy is not None and config is not None and
                                        (config.secrets or config.project_secrets)):
        from .secrets_store import grant_secrets, resolve_uses

        uses, notes = resolve_uses(req.secrets, config)
        uses += [u for u in req.held_keys if u.name not in {x.name for x in uses}]
        if warnings is not None:
            warnings.extend(notes)
        if uses:
            policy = grant_secrets(policy, uses, env)
    return policy, env


_NOWHERE = Path("/nonexistent/agentkernel-no-project-dir")  # nothing to detect from


def _wasm_decision(req: RunRequest, backend_name: str,
                   warnings: list[str]) -> tuple[str, str, str] | None:
    """A WebAssembly module as the command picks the wasm backend unless --backend names
    another (it wins over the config's backend); a wasm run needs no image. None: not a
    wasm run."""
    from .detect import WASM_BACKENDS, WASM_REASON, is_wasm_module

    if req.backend is None and is_wasm_module(req.argv):
        backend_name = "wasm"
    if backend_name.strip().lower() not in WASM_BACKENDS:
        return None
    if req.image and req.image != HOST_IMAGE:
        warnings.append(f"--image {req.image} ignored: a WebAssembly module needs no image")
    return backend_name, HOST_IMAGE, WASM_REASON


# ---------------------------------------------------------------------- the pieces


def load_configs(req: RunRequest, ctx: CallerContext) -> tuple[Config | None, str | None,
                                                               list[str]]:
    """The config a plan follows, in layers (config.effective_config): the caller's user
    config, under the request's --config or else the project's agentkernel.toml (which may
    tighten the user's settings, not loosen them), under the caller's environment.
    pydantic is only imported when a file exists. Returns the config, where its nearest
    file came from ("flag", "project", "user" or None) and its warnings."""
    path = req.config_path
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    has_project = path is not None or (
        req.cwd is not None and (req.cwd / "agentkernel.toml").is_file())
    if ctx.loaded_user_config is not None and not has_project:
        return ctx.loaded_user_config, "user", []  # the daemon's own, already checked
    user = Path(ctx.user_config) if ctx.user_config is not None else None
    has_user = user is not None and user.is_file()
    if not has_project and not has_user:
        return None, None, []
    from .config import effective_config

    eff = effective_config(req.cwd if req.cwd is not None else _NOWHERE, ctx.env,
                           user if has_user else _NO_USER_CONFIG, config_path=path)
    return eff.config, eff.project_source or "user", eff.warnings


_NO_USER_CONFIG = Path("/nonexistent/agentkernel-no-user-config")


def check_env(env: Mapping[str, str]) -> dict[str, str]:
    """The request's variables, names and values checked (no caller's value is read here:
    a front door resolves `-e KEY` from its own caller's environment first)."""
    out: dict[str, str] = {}
    for key, value in env.items():
        if not key or not (key[0].isalpha() or key[0] == "_") or not all(
                c.isalnum() or c == "_" for c in key):
            raise UsageError(f"invalid environment variable name {key[:40]!r}")
        if "\0" in value:
            raise UsageError(f"environment variable {key} contains a NUL byte")
        out[key] = value
    return out


def parse_env(pairs: list[str] | tuple[str, ...], environ: Mapping[str, str] | None = None
              ) -> dict[str, str]:
    """`-e KEY=VALUE`, or `-e KEY` for the caller's own value (as docker does)."""
    source = os.environ if environ is None else environ
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            if key not in source:
                raise UsageError(f"-e {key}: not set on the host (use KEY=VALUE)")
            value = source[key]
        env[key] = value
    return check_env(env)


def resolve_profile(req: RunRequest, config: Config | None) -> Profile:
    """The named profile (request, config, `moderate`), the config's overrides, then the
    request's."""
    from .profiles import get_profile

    sec = config.security if config is not None else None
    name = req.profile or (sec.profile if sec is not None else None) or "moderate"
    profile = get_profile(name)
    if sec is not None:
        profile = profile.with_overrides(
            network=sec.network, mount_home=sec.mount_home, pass_env=sec.pass_env,
            read_only=sec.read_only, memory_mb=sec.memory_mb, pids=sec.pids, cpus=sec.cpus,
            workspace=(None if sec.mount_cwd is None else ("rw" if sec.mount_cwd else None)),
        )
    if config is not None:  # [resources] caps, where `unlimited` may lift the profile's
        res = config.resources
        profile = profile.with_overrides(memory_mb=res.memory, pids=res.pids)
    return profile.with_overrides(
        network=False if req.no_network else None, memory_mb=req.memory_mb, pids=req.pids,
        cpus=req.cpus, workspace=_workspace_mode(req.workspace),
    )


def _workspace_mode(mode: str | None) -> WorkspaceMode | None:
    if mode is None:
        return None
    if mode not in ("rw", "cow", "ro", "none"):
        raise UsageError(f"unknown workspace mode {mode[:20]!r} (rw, cow, ro, none)")
    return mode  # type: ignore[return-value]


def fallback_warning(image: str, reason: str | None = None) -> str:
    """The one line a run on the host's userland instead of `image` prints (not with -q)."""
    why = f" ({reason})" if reason else ""
    return f'image {image} unavailable{why}: using the host\'s userland (offline_fallback = "host")'


def command_argv(image_config: ImageConfig | None, argv: list[str]) -> list[str]:
    """What runs, as `docker run IMAGE [CMD]` would: the image's entrypoint, if any, then the
    command given, or the image's own Cmd when none is."""
    if image_config is None:
        cmd = list(argv)
    else:
        cmd = [*(image_config.entrypoint or []), *(argv or image_config.cmd or [])]
    if not cmd:
        raise UsageError("no command given (and the image has none): "
                         "agentkernel run [OPTIONS] -- COMMAND [ARGS...]")
    return cmd


def sandbox_cwd(workdir: str | None, has_workspace: bool,
                image_config: ImageConfig | None, workspace_at: str = "/workspace",
                home: str = "/root") -> str:
    """Where the command starts: --workdir, else the project (/workspace, or an agent's
    project at its own path), the image's WorkingDir, the user's home (/root, or an
    agent user's, which cannot enter /root)."""
    image_cwd = image_config.working_dir if image_config is not None else ""
    cwd = workdir or (workspace_at if has_workspace else image_cwd or home)
    if not cwd.startswith("/"):
        raise UsageError(f"--workdir must be an absolute path inside the sandbox, got {cwd!r}")
    return cwd


def user_warning(image: str, image_config: ImageConfig | None) -> str | None:
    """Only uid 0 is mapped into a sandbox's user namespace: say so, don't pretend."""
    user = image_config.user if image_config is not None else ""
    if user and user.split(":")[0] not in ("0", "root"):
        return (f"image {image} asks for user {user!r}; commands run as root of the sandbox "
                "(uid 0 of its own user namespace, without capabilities)")
    return None


def resolve_rootfs(image: str, config: Config | None, registry: RegistryOptions, quiet: bool
                   ) -> tuple[HostRootfs, ImageConfig | None, str, str | None]:
    """The root filesystem for `image`: cached, pulled with the caller's registry settings,
    or (when allowed) the host's.

    Returns the rootfs, the image's config (None for the host rootfs), a one-line
    description for `-v`, and the fallback warning when the image could not be had (the
    caller prints it, unless quiet). A failed pull is remembered for a minute under the
    caller's registry settings (images/offline.py), so offline runs do not each try again
    and another caller's mirror is not blamed for it.
    """
    from .errors import NotFound
    from .rootfs import host_rootfs, tree_rootfs

    if image == HOST_IMAGE:
        return host_rootfs(), None, "host userland, read-only (--image host)", None
    from .images import ImageError, get, pull
    from .images.offline import forget_failure, recent_failure, remember_failure, short_reason

    fallback = config.images.offline_fallback if config is not None else "host"
    img = get(image, config=registry)
    reason = recent_failure(image, registry) if img is None and fallback == "host" else None
    if img is None and reason is None:
        try:
            img = pull(image, config=registry, progress=not quiet)
        except (ImageError, NotFound) as exc:
            if fallback != "host":
                raise ImageError(f"{exc.message} (offline_fallback = \"none\")") from None
            reason = short_reason(exc)
            remember_failure(image, registry, reason)
        else:
            forget_failure(image, registry)
    if img is None:
        return host_rootfs(), None, UNAVAILABLE_ROOTFS, fallback_warning(image, reason)
    root = img.rootfs_dir()
    note = f"image {img.ref} ({img.manifest_digest[:19]})"
    return tree_rootfs(root, img.ref), img.config, note, None


# ---------------------------------------------------------------------- outcomes


class Outcome(NamedTuple):
    """How a command ended, as every front door reports it."""

    exit_code: int  # shell-style: code, 128+N for signal N, 124 timeout, 137 OOM
    signal: int | None = None
    timed_out: bool = False
    oom_killed: bool = False
    message: str | None = None  # one line when the sandbox, not the command, decided


def outcome(status: ExitStatus | None, *, timeout: float | None = None,
            oom: Callable[[], bool] | None = None, memory_mb: int | None = None) -> Outcome:
    """The one mapping of an ending to our exit code and message.

    `status` None: the sandbox died under the command (its channel broke); then only an
    OOM kill is a result (137), anything else is the caller's error to raise. `oom` asks
    the sandbox's cgroup whether the kernel's OOM killer acted.
    """
    if status is None:
        if oom is not None and oom():
            return Outcome(EXIT_OOM, signal.SIGKILL, oom_killed=True,
                           message=f"sandbox killed: out of memory (limit {memory_mb} MiB)")
        raise ValueError("the sandbox died without an OOM kill: not an outcome")
    if status.timed_out:
        return Outcome(EXIT_TIMEOUT, status.signal, timed_out=True,
                       message=f"command timed out after {timeout or 0:g}s and was killed")
    if status.signal == signal.SIGKILL and oom is not None and oom():
        return Outcome(EXIT_OOM, status.signal, oom_killed=True,
                       message=f"command killed: out of memory (limit {memory_mb} MiB)")
    return Outcome(status.shell_code, status.signal)


def failed_start(exit_code: int, message: str) -> Outcome:
    """A command that could not start (not found: 127, not executable: 126) is a result."""
    return Outcome(exit_code if exit_code in (126, 127) else 126, message=message)
