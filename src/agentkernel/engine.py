"""The engine: turn a run request into a sandbox, one command, live output and an exit status."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NamedTuple

from .errors import ConfigError, NotFound, ProtocolError, UsageError
from .profiles import PASS_ENV_KEYS, Profile, get_profile

if TYPE_CHECKING:
    from .agent.client import Execution, ExitStatus
    from .backends import Backend
    from .config import Config
    from .egress_policy import Policy
    from .images import ImageConfig
    from .rootfs import HostRootfs
    from .sandbox import Sandbox, SandboxSpec

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EXIT_TIMEOUT = 124  # as timeout(1)
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class RunRequest(NamedTuple):
    """Everything `agentkernel run` (or an API call) asks for."""

    argv: list[str]
    cwd: Path
    image: str | None = None
    profile: str | None = None
    backend: str | None = None
    no_network: bool = False
    env: Sequence[str] = ()
    workdir: str | None = None
    timeout: float | None = None
    keep: bool = False
    memory_mb: int | None = None  # profiles.UNLIMITED (0): no cap
    pids: int | None = None  # likewise
    cpus: float | None = None
    config_path: Path | None = None
    forward_stdin: bool = False
    allow_hosts: tuple[str, ...] = ()  # egress policy (egress_policy.policy_for)
    deny_hosts: tuple[str, ...] = ()
    add_hosts: tuple[str, ...] = ()
    secrets: tuple[str, ...] = ()  # names in the host's store (secrets_store)


class Plan(NamedTuple):
    """A resolved request: what will run where, decided before anything starts."""

    spec: SandboxSpec
    backend: Backend
    image_reason: str
    env: dict[str, str]
    cwd: str
    warnings: list[str]
    argv: list[str]  # what runs: the image's entrypoint, if any, then the command
    rootfs_note: str  # e.g. "image docker.io/library/alpine:3.20 (sha256:…)"
    skipped: tuple[str, ...] = ()  # stronger backends `auto` passed over, and why (`-v`)


class RunOutcome(NamedTuple):
    status: ExitStatus
    exit_code: int
    message: str | None  # one line for stderr when the sandbox, not the command, decided


def load_configs(req: RunRequest) -> tuple[Config | None, str | None, list[str]]:
    """The explicit --config, else ./agentkernel.toml; pydantic is only imported if one exists."""
    path = req.config_path
    from_flag = path is not None
    if path is None:
        candidate = req.cwd / "agentkernel.toml"
        path = candidate if candidate.is_file() else None
    if path is None:
        return None, None, []
    if from_flag and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    from .config import load_config

    config, warnings = load_config(path)
    return config, ("flag" if from_flag else "project"), warnings


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            # `-e KEY` alone forwards the host's value, as docker does.
            if key not in os.environ:
                raise UsageError(f"-e {key}: not set on the host (use KEY=VALUE)")
            value = os.environ[key]
        if not key or not (key[0].isalpha() or key[0] == "_") or not all(
            c.isalnum() or c == "_" for c in key
        ):
            raise UsageError(f"invalid environment variable name {key!r}")
        if "\0" in value:
            raise UsageError(f"environment variable {key} contains a NUL byte")
        env[key] = value
    return env


def resolve_profile(req: RunRequest, config: Config | None) -> Profile:
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
        cpus=req.cpus,
    )


HOST_IMAGE = "host"  # the pseudo image: the host's userland, read-only, no registry involved
# The rootfs note of a run whose image could not be had (offline_fallback = "host").
UNAVAILABLE_ROOTFS = "host userland, read-only (image unavailable)"


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


def resolve_rootfs(image: str, config: Config | None, quiet: bool) -> tuple[HostRootfs,
                                                                          ImageConfig | None, str]:
    """The root filesystem for `image`: cached, pulled, or (when allowed) the host's.

    Returns the rootfs, the image's config (None for the host rootfs) and a one-line
    description for `-v`. A fallback to the host is one line on stderr (none with `quiet`);
    a failed pull is remembered for a minute (images/offline.py), so offline runs do not
    each try again.
    """
    from .rootfs import host_rootfs, tree_rootfs

    if image == HOST_IMAGE:
        return host_rootfs(), None, "host userland, read-only (--image host)"
    from .images import ImageError, get, pull
    from .images.offline import forget_failure, recent_failure, remember_failure, short_reason

    fallback = config.images.offline_fallback if config is not None else "host"
    img = get(image, config=config)
    reason = recent_failure(image, config) if img is None and fallback == "host" else None
    if img is None and reason is None:
        try:
            img = pull(image, config=config, progress=not quiet)
        except (ImageError, NotFound) as exc:
            if fallback != "host":
                raise ImageError(f"{exc.message} (offline_fallback = \"none\")") from None
            reason = short_reason(exc)
            remember_failure(image, config, reason)
        else:
            forget_failure(image, config)
    if img is None:
        if not quiet:
            print(f"agentkernel: warning: {fallback_warning(image, reason)}", file=sys.stderr)
        return host_rootfs(), None, UNAVAILABLE_ROOTFS
    root = img.rootfs_dir()
    return tree_rootfs(root, img.ref), img.config, f"image {img.ref} ({img.manifest_digest[:19]})"


class Decision(NamedTuple):
    """What a run request resolves to before any rootfs or backend is prepared: the one set
    of rules both the in-process `run` and the daemon's pooled runs follow."""

    config: Config | None
    warnings: list[str]
    image: str
    image_reason: str
    profile: Profile
    backend_name: str  # "auto" or a backend's name


def decide(req: RunRequest) -> Decision:
    """Config file, image (validated, then auto-detected), profile and backend choice."""
    from .detect import resolve_run_image, validate_image_ref

    config, config_source, warnings = load_configs(req)
    if req.image and req.image != HOST_IMAGE:
        validate_image_ref(req.image)
    cfg_image = config.image if config is not None else None
    image, reason = resolve_run_image(
        req.argv, req.cwd, cli_image=req.image,
        config_image_from_flag=cfg_image if config_source == "flag" else None,
        project_config_image=cfg_image if config_source == "project" else None,
    )
    backend_name = req.backend or (config.sandbox.backend if config is not None else None) or "auto"
    return Decision(config, warnings, image, reason, resolve_profile(req, config), backend_name)


def sandbox_cwd(workdir: str | None, has_workspace: bool,
                image_config: ImageConfig | None) -> str:
    """Where the command starts: --workdir, else /workspace, the image's WorkingDir, /root."""
    image_cwd = image_config.working_dir if image_config is not None else ""
    cwd = workdir or ("/workspace" if has_workspace else image_cwd or "/root")
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


def grant_secrets(policy: Policy | None, names: Sequence[str],
                  env: dict[str, str]) -> Policy:
    """Each named secret as a placeholder in its env var, and a grant in the policy for
    the gate to put the value in (egress_mitm); the trust settings for the sandbox's CA."""
    from .egress_policy import Grant
    from .secrets_store import load, placeholder

    if policy is None:
        raise UsageError("--secret needs a profile with egress (moderate), not --no-network")
    grants = []
    for name in dict.fromkeys(names):
        secret = load(name)
        grants.append(Grant(name, secret.hosts, secret.header, placeholder()))
        env[secret.env] = grants[-1].placeholder
    bundle = "/etc/ssl/certs/ca-certificates.crt"  # the system bundle, with the CA added
    for key in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO",
                "NODE_EXTRA_CA_CERTS"):
        env[key] = bundle
    return policy._replace(secrets=tuple(grants))


def plan(req: RunRequest, *, quiet: bool = False) -> Plan:
    """Decide image, profile, backend and environment; nothing is started yet."""
    from .backends import choose
    from .controlplane import control_masks
    from .sandbox import SandboxSpec

    config, warnings, image, reason, profile, backend_name = decide(req)
    if config is not None:
        from .vm.settings import configure

        configure(config.microvm)  # before `auto` decides whether a microVM may be chosen
    choice = choose(backend_name)
    backend = choice.backend
    if choice.warning:
        warnings.append(choice.warning)
    rootfs, image_config, rootfs_note = resolve_rootfs(image, config, quiet)
    name = f"run-{os.urandom(4).hex()}"
    home = Path(os.path.expanduser("~"))
    workspace = req.cwd if profile.workspace != "none" else None
    home_opt = home if home.is_dir() else None
    from .egress_policy import policy_for

    spec = SandboxSpec(
        name=name, profile=profile, rootfs=rootfs, image=image, workspace=workspace,
        home=home_opt, persistent=req.keep,
        masks=control_masks(profile, workspace, home_opt),
        egress=policy_for(profile.network, config, req.allow_hosts, req.deny_hosts,
                          req.add_hosts),
    )
    env = {"PATH": DEFAULT_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
    if image_config is not None:
        env.update(image_config.env_dict())  # the image's PATH and friends win over ours
    env["AGENTKERNEL_SANDBOX"] = name
    if profile.pass_env:
        for key in PASS_ENV_KEYS:
            if key in os.environ:
                env[key] = os.environ[key]
        if profile.mount_home and spec.home is not None:
            env["HOME"] = "/home/user"  # where the host home is mounted
    env.update(parse_env(req.env))
    if req.secrets:
        spec = spec._replace(egress=grant_secrets(spec.egress, req.secrets, env))
    warning = user_warning(image, image_config)
    if warning:
        warnings.append(warning)
    cwd = sandbox_cwd(req.workdir, spec.workspace is not None, image_config)
    argv = command_argv(image_config, req.argv)
    return Plan(spec=spec, backend=backend, image_reason=reason, env=env, cwd=cwd,
                warnings=warnings, argv=argv, rootfs_note=rootfs_note,
                skipped=choice.skipped)


def execute(
    plan_: Plan,
    argv: list[str],
    *,
    timeout: float | None,
    stdout: BinaryIO,
    stderr: BinaryIO,
    stdin: BinaryIO | None = None,
    on_started: Callable[[Sandbox], None] | None = None,
) -> tuple[Sandbox, RunOutcome]:
    """Start the sandbox, run `argv`, stream its output live; the caller destroys the sandbox."""
    sandbox = plan_.backend.start(plan_.spec)
    try:
        if on_started is not None:
            on_started(sandbox)
        outcome = _run_in(sandbox, plan_, argv, timeout=timeout, stdout=stdout, stderr=stderr,
                          stdin=stdin)
    except BaseException:
        sandbox.destroy()
        raise
    return sandbox, outcome


def _run_in(
    sandbox: Sandbox, plan_: Plan, argv: list[str], *, timeout: float | None,
    stdout: BinaryIO, stderr: BinaryIO, stdin: BinaryIO | None,
) -> RunOutcome:
    execution = sandbox.client.exec(
        argv, env=plan_.env, cwd=plan_.cwd, timeout=timeout, stdin=stdin is not None,
        rlimits=sandbox.command_rlimits(),
    )
    if stdin is not None:
        threading.Thread(target=_pump_stdin, args=(stdin, execution), daemon=True).start()
    with _forward_signals(execution.signal):
        try:
            status = _stream(execution, stdout, stderr)
        except ProtocolError:
            # The whole sandbox died under the command (gVisor's sentry is OOM-killed with
            # the app inside it): say why rather than blaming the protocol.
            if sandbox.oom_killed():
                from .agent.client import ExitStatus

                mem = sandbox.spec.profile.memory_mb
                return RunOutcome(ExitStatus(code=None, signal=signal.SIGKILL), 137,
                                  f"sandbox killed: out of memory (limit {mem} MiB)")
            raise
    return describe_exit(sandbox, status, timeout)


def _stream(execution: Execution, stdout: BinaryIO, stderr: BinaryIO) -> ExitStatus:
    """Copy the command's output to ours as it comes; return how it ended."""
    for kind, payload in execution.events():
        if isinstance(payload, bytes):
            target = stdout if kind == "stdout" else stderr
            target.write(payload)
            target.flush()
        else:
            return payload
    raise ProtocolError("the agent ended the command's events without an exit status")


def describe_exit(sandbox: Sandbox, status: ExitStatus, timeout: float | None) -> RunOutcome:
    """Map an exit status to our exit code, naming causes the command could not report."""
    if status.timed_out:
        return RunOutcome(status, EXIT_TIMEOUT,
                          f"command timed out after {timeout:g}s and was killed")
    if status.signal == signal.SIGKILL and sandbox.oom_killed():
        mem = sandbox.spec.profile.memory_mb
        return RunOutcome(status, 137, f"command killed: out of memory (limit {mem} MiB)")
    return RunOutcome(status, status.shell_code, None)


def _pump_stdin(src: BinaryIO, execution: Execution) -> None:
    with contextlib.suppress(Exception):
        while True:
            chunk = src.read1(65536) if hasattr(src, "read1") else src.read(65536)
            if not chunk:
                break
            execution.write_stdin(chunk)
    with contextlib.suppress(Exception):
        execution.close_stdin()


@contextlib.contextmanager
def _forward_signals(send: Callable[[int], None]):  # type: ignore[no-untyped-def]
    """While a command runs, Ctrl-C and friends go to it, not to us."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in FORWARDED_SIGNALS:
        previous[sig] = signal.signal(sig, lambda signo, _frame: _safe(send, signo))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _safe(send: Callable[[int], None], signo: int) -> None:
    with contextlib.suppress(Exception):
        send(signo)


def default_stdio() -> tuple[BinaryIO, BinaryIO]:
    return sys.stdout.buffer, sys.stderr.buffer
