"""The agentkernel.toml schema (pydantic models), its loader, and the `init` template."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from .detect import DEFAULT_IMAGE, validate_image_ref
from .errors import ConfigError, UsageError
from .names import sanitize_sandbox_name, validate_sandbox_name, validate_sandbox_path
from .paths import user_config_path_str
from .profiles import DEFAULT_DISK_MB

CONFIG_FILENAME = "agentkernel.toml"
_MAX_CONFIG_BYTES = 1024 * 1024
_NL = b"\n"

# §4.1 `[sandbox] runtime` shorthand; anything else means the plain base image.
RUNTIME_IMAGES: dict[str, str] = {
    "python": "python:3.12-alpine",
    "node": "node:22-alpine",
    "go": "golang:1.23-alpine",
    "rust": "rust:1.85-alpine",
    "ruby": "ruby:3.3-alpine",
    "java": "eclipse-temurin:21-alpine",
    "c": "gcc:14-bookworm",
    "dotnet": "mcr.microsoft.com/dotnet/sdk:8.0",
}
KNOWN_RUNTIMES = frozenset({"base", *RUNTIME_IMAGES})

Profile = Literal["permissive", "moderate", "restrictive", "custom"]
CompatibilityMode = Literal[
    "native",
    "default",
    "claude",
    "claude-code",
    "claudecode",
    "codex",
    "openai-codex",
    "gemini",
    "gemini-cli",
]

_DOMAIN_RE = re.compile(
    r"(?:\*\.)?[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*",
    re.ASCII,
)
_PORT_RE = re.compile(r"(?:(\d{1,5}):)?(\d{1,5})(?:/(tcp|udp))?", re.ASCII)
_MODE_RE = re.compile(r"[0-7]{3,4}", re.ASCII)

PositiveInt = Annotated[int, Field(ge=1)]
MemoryMb = Annotated[int, Field(ge=16)]  # below this not even busybox starts


def runtime_image(runtime: str) -> str:
    """Image for a ``[sandbox] runtime`` shorthand (unknown runtimes → ``alpine:3.20``)."""
    return RUNTIME_IMAGES.get(runtime, DEFAULT_IMAGE)


def _usage_to_value(func: Any, value: Any) -> Any:
    # pydantic only turns ValueError into a validation error, so re-raise our UsageError as one.
    try:
        return func(value)
    except UsageError as exc:
        raise ValueError(exc.message) from None


class _Section(BaseModel):
    # strict: TOML is typed, so "2" for an int is a mistake worth reporting, not coercing.
    # extra="allow": unknown keys are kept so the loader can name them in warnings.
    model_config = ConfigDict(strict=True, extra="allow")


class SandboxSection(_Section):
    name: str | None = None  # defaults to the project directory name in load_config
    runtime: str | None = None  # None (unset) lets auto-detection pick the image
    base_image: str | None = None
    backend: str = "auto"  # auto or a backend's name (backends.BACKEND_NAMES)

    @field_validator("backend")
    @classmethod
    def _check_backend(cls, v: str) -> str:
        return _backend_name(v) or "auto"

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str | None) -> str | None:
        return None if v is None else _usage_to_value(validate_sandbox_name, v)

    @field_validator("base_image")
    @classmethod
    def _check_image(cls, v: str | None) -> str | None:
        return None if v is None else _usage_to_value(validate_image_ref, v)


class AgentSection(_Section):
    preferred: str = "claude"  # informational, as upstream
    compatibility_mode: CompatibilityMode | None = None


def _limit(parse: Any, v: Any) -> int | None:
    # TOML gives an int (MiB, or a count) or a string ("4g", "unlimited"); both end up as an
    # int where profiles.UNLIMITED (0) is the explicit "unlimited".
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise ValueError(f"want a number or a string like \"4g\" or \"unlimited\", got {v!r}")
    return int(_usage_to_value(parse, str(v)))


class ResourcesSection(_Section):
    vcpus: PositiveInt = 1
    memory_mb: MemoryMb = 512  # upstream's key: the microVM size it asks for (informational)
    # Caps that override the profile's; "unlimited" lifts one (never lifted by default).
    memory: int | None = None  # MiB; TOML "4g" / 4096 / "unlimited"
    pids: int | None = None  # TOML 2048 / "unlimited"
    # Persistent sandboxes: the host disk their writable layers, /tmp, project copy and
    # detached-command logs may fill (a size; "unlimited" for none).
    disk: int | None = None  # MiB
    # Each output stream of a detached command keeps at most this much (the newest).
    detached_log: int | None = None  # MiB; default 64

    @field_validator("memory", "disk", mode="before")
    @classmethod
    def _check_size(cls, v: Any) -> int | None:
        from .profiles import parse_memory_limit

        return _limit(parse_memory_limit, v)

    @field_validator("detached_log", mode="before")
    @classmethod
    def _check_log(cls, v: Any) -> int | None:
        from .profiles import parse_memory

        value = _limit(parse_memory, v)
        if value is not None and value < 1:
            raise ValueError("detached_log must be at least 1m")
        return value

    @field_validator("pids", mode="before")
    @classmethod
    def _check_pids(cls, v: Any) -> int | None:
        from .profiles import parse_pids

        return _limit(parse_pids, v)


class NetworkSection(_Section):
    vsock_cid: Annotated[int, Field(ge=3, le=0xFFFFFFFE)] | None = None  # 0-2 are reserved
    ports: list[str] = Field(default_factory=list)
    # The egress policy (egress_policy): an allow-list makes it default-deny.
    allow: list[str] = Field(default_factory=list)
    deny: list[str] = Field(default_factory=list)
    hosts: list[str] = Field(default_factory=list)  # "NAME:ADDRESS" answers of our resolver

    @field_validator("allow", "deny")
    @classmethod
    def _check_entries(cls, v: list[str]) -> list[str]:
        from .egress_policy import MAX_ENTRIES, parse_entry
        from .errors import UsageError

        if len(v) > MAX_ENTRIES:
            raise ValueError(f"at most {MAX_ENTRIES} entries")
        for entry in v:
            try:
                parse_entry(entry)
            except UsageError as exc:
                raise ValueError(exc.message) from None
        return v

    @field_validator("hosts")
    @classmethod
    def _check_hosts(cls, v: list[str]) -> list[str]:
        from .egress_policy import parse_static_host
        from .errors import UsageError

        for entry in v:
            try:
                parse_static_host(entry)
            except UsageError as exc:
                raise ValueError(exc.message) from None
        return v

    @field_validator("ports")
    @classmethod
    def _check_ports(cls, v: list[str]) -> list[str]:
        for spec in v:
            m = _PORT_RE.fullmatch(spec)
            if not m or not all(1 <= int(p) <= 65535 for p in m.group(1, 2) if p is not None):
                raise ValueError(
                    f"bad port mapping {spec!r} (want 'HOST:CONTAINER', 'PORT' or 'H:C/udp')"
                )
        return v


class SecretSection(_Section):
    """`[secrets.NAME]`: a stored secret (secrets_store) a run uses, and where it goes.

    In your own config (or -c) it gives NAME to every run, and its keys replace the stored
    ones (they may widen `hosts`). In a project's agentkernel.toml it only *asks* for NAME
    and may only narrow (secrets_store.resolve_uses; docs/security.md "Secrets")."""

    hosts: list[str] | None = None  # exact names: the only hosts that get the value
    header: str | None = None  # the header it goes in, or "*" for any
    env: str | None = None  # the sandbox's variable holding the placeholder

    @field_validator("hosts")
    @classmethod
    def _check_secret_hosts(cls, v: list[str] | None) -> list[str] | None:
        from .secrets_store import check_hosts

        return None if v is None else _usage_to_value(check_hosts, v)

    @field_validator("header")
    @classmethod
    def _check_secret_header(cls, v: str | None) -> str | None:
        from .secrets_store import check_header

        return None if v is None else _usage_to_value(check_header, v)

    @field_validator("env")
    @classmethod
    def _check_secret_env(cls, v: str | None) -> str | None:
        from .secrets_store import check_env

        return None if v is None else _usage_to_value(check_env, v)


def _normalise_domains(v: list[str]) -> list[str]:
    out = []
    for domain in v:
        d = domain.strip().lower().rstrip(".")
        if len(d) > 253 or not _DOMAIN_RE.fullmatch(d):
            raise ValueError(
                f"bad domain pattern {domain!r} (want 'example.com' or '*.example.com')"
            )
        out.append(d)
    return out


def domain_matches(pattern: str, domain: str) -> bool:
    """``*.example.com`` matches ``example.com`` and any subdomain; plain names match exactly."""
    pattern, domain = pattern.lower(), domain.lower()
    if pattern.startswith("*."):
        base = pattern[2:]
        return domain == base or domain.endswith("." + base)
    return domain == pattern


class DomainsSection(_Section):
    allow: list[str] = Field(default_factory=list)
    block: list[str] = Field(default_factory=list)
    allowlist_only: bool = False

    @field_validator("allow", "block")
    @classmethod
    def _check_domains(cls, v: list[str]) -> list[str]:
        return _normalise_domains(v)


class CommandsSection(_Section):
    allow: list[str] = Field(default_factory=list)
    block: list[str] = Field(default_factory=list)
    allowlist_only: bool = False

    @field_validator("allow", "block")
    @classmethod
    def _check_commands(cls, v: list[str]) -> list[str]:
        for cmd in v:
            if not cmd or "\x00" in cmd:
                raise ValueError(f"bad command name {cmd!r}")
        return v


class SecuritySection(_Section):
    profile: Profile = "moderate"
    # Overrides of the profile; None means "whatever the profile says".
    network: bool | None = None
    mount_cwd: bool | None = None
    mount_home: bool | None = None
    pass_env: bool | None = None
    read_only: bool | None = None
    memory_mb: MemoryMb | None = None
    pids: PositiveInt | None = None
    cpus: Annotated[float, Field(gt=0)] | None = None
    seccomp: str | None = None
    domains: DomainsSection = Field(default_factory=DomainsSection)
    commands: CommandsSection = Field(default_factory=CommandsSection)


class BuildSection(_Section):
    dockerfile: str | None = None
    context: str | None = None
    target: str | None = None
    args: dict[str, str] = Field(default_factory=dict)
    no_cache: bool = False


class FileEntry(_Section):
    source: str = Field(min_length=1)
    dest: str
    mode: str = "0644"

    @field_validator("dest")
    @classmethod
    def _check_dest(cls, v: str) -> str:
        return str(_usage_to_value(validate_sandbox_path, v))

    @field_validator("mode")
    @classmethod
    def _check_mode(cls, v: str) -> str:
        if not _MODE_RE.fullmatch(v):
            raise ValueError(f"bad file mode {v!r} (want octal like '0644')")
        return v


class ApiSection(_Section):
    """`serve`'s HTTP API (see docs/http-api.md)."""

    api_key: str | None = Field(default=None, repr=False)
    api_key_env: str | None = None
    allow_sudo_exec: bool = False
    # Host names served besides loopback ones (DNS-rebinding guard); "*" turns the check off.
    allowed_hosts: list[str] = Field(default_factory=list)
    # Output kept per /run, exec or batch item (stdout + stderr); more kills the command.
    max_output_bytes: Annotated[int, Field(ge=4096, le=1 << 40)] = 16 * 1024 * 1024
    # Largest file GET /sandboxes/{name}/files/... returns; larger ones get 413.
    max_file_bytes: Annotated[int, Field(ge=4096, le=1 << 40)] = 64 * 1024 * 1024


class SshSection(_Section):
    enabled: bool = False
    port: Annotated[int, Field(ge=1, le=65535)] = 22
    user: str = "sandbox"
    cert_ttl: str = "30m"
    vault_addr: str | None = None
    vault_ssh_mount: str = "ssh"
    vault_ssh_role: str = "agentkernel-client"


class OrchestratorSection(_Section):
    provider: Literal["kubernetes", "nomad"] | None = None
    namespace: str = "agentkernel"
    kubeconfig: str | None = None
    context: str | None = None
    runtime_class: Literal["gvisor", "kata"] | None = None
    service_account: str | None = None
    nomad_addr: str | None = None
    nomad_token: str | None = Field(default=None, repr=False)
    nomad_driver: str = "docker"
    nomad_datacenter: str = "dc1"
    warm_pool_size: Annotated[int, Field(ge=0)] = 10
    max_pool_size: Annotated[int, Field(ge=0)] = 50
    max_sandboxes: Annotated[int, Field(ge=0)] = 200


class RemoteProvider(_Section):
    api_key: str | None = Field(default=None, repr=False)
    api_key_env: str | None = None
    base_url: str | None = None
    organization: str | None = None
    project: str | None = None
    region: str | None = None
    profile: str | None = None


class RemoteProfile(_Section):
    image: str | None = None
    workspace_dir: str = "/workspace"
    bootstrap: str | None = None
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("image")
    @classmethod
    def _check_image(cls, v: str | None) -> str | None:
        return None if v is None else _usage_to_value(validate_image_ref, v)


class RemoteSection(_Section):
    default_profile: str | None = None
    bridge: str = "scripts/remote-bridge.mjs"
    sync_mode: str = "managed"
    daytona: RemoteProvider | None = None
    runloop: RemoteProvider | None = None
    e2b: RemoteProvider | None = None
    agentcomputer: RemoteProvider | None = None
    profiles: dict[str, RemoteProfile] = Field(default_factory=dict)


class EnterpriseSection(_Section):
    org_id: str | None = None


class RegistryAuth(_Section):
    username: str
    password: str = Field(default="", repr=False)


class ImagesSection(_Section):
    registry: str | None = None
    mirrors: list[str] = Field(default_factory=list)
    insecure_registries: list[str] = Field(default_factory=list)
    offline_fallback: Literal["host", "none"] = "host"
    auths: dict[str, RegistryAuth] = Field(default_factory=dict)
    ca_file: str | None = None


class MicrovmSection(_Section):
    allow_emulation: bool = False
    kernel: str | None = None
    vmm: Literal["auto", "qemu", "firecracker"] = "auto"
    boot_timeout: Annotated[float, Field(gt=0, le=600)] = 60.0
    # Boot one template VM per shape, save it, start later VMs from that file (QEMU).
    snapshot: bool = False


def _backend_name(value: str | None) -> str | None:
    """`auto`, a backend's name, or `hyperlight` (the original's name for wasm): the names
    are the backends' own, not spelled again here."""
    from .backends import BACKEND_NAMES

    if value is None or value in ("auto", "hyperlight", *BACKEND_NAMES):
        return value
    raise ValueError(f"unknown backend {value!r}: choose auto, {', '.join(BACKEND_NAMES)}")


class PoolEntry(_Section):
    """One warm-pool key; None means what a plain `run` would pick."""

    image: str | None = None
    profile: Literal["permissive", "moderate", "restrictive"] | None = None
    backend: str | None = None  # as [sandbox] backend
    min: Annotated[int, Field(ge=0, le=64)] | None = None  # default: [daemon] pool_min
    max: Annotated[int, Field(ge=0, le=256)] | None = None  # default: [daemon] pool_max

    @field_validator("backend")
    @classmethod
    def _check_backend(cls, v: str | None) -> str | None:
        return _backend_name(v)

    @field_validator("image")
    @classmethod
    def _check_image(cls, v: str | None) -> str | None:
        if v is None or v == "host":  # "host": the host's userland, as `run --image host`
            return v
        return str(_usage_to_value(validate_image_ref, v))


class DaemonSection(_Section):
    """The per-user daemon (read from its own config file, see docs/daemon.md)."""

    pool_min: Annotated[int, Field(ge=0, le=64)] = 2
    # (A key grows past its rate's size only for bursts: daemon.md, "Between bursts".)
    pool_max: Annotated[int, Field(ge=0, le=256)] = 128
    pools: list[PoolEntry] = Field(default_factory=lambda: [PoolEntry()])
    # Keys nobody configured (e.g. a project dir) get this many warm sandboxes once used...
    adhoc_min: Annotated[int, Field(ge=0, le=64)] = 1
    # ...until they have been idle this long.
    adhoc_idle_seconds: Annotated[float, Field(gt=0)] = 600.0
    # Every key's warm (and starting) sandboxes together: at most this many, and within
    # this much memory (measured on the first sandbox of each key).
    pool_max_total: Annotated[int, Field(ge=0, le=1024)] = 128
    pool_memory_mb: Annotated[int, Field(ge=0)] = 1024
    # Sandboxes the pool starts at once (default: one per core, 2 to 4).
    pool_refills: Annotated[int, Field(ge=1, le=64)] | None = None
    reaper_interval: Annotated[float, Field(gt=0, le=3600)] = 1.0
    # Bounds on what one client or command can take from the daemon (docs/daemon.md):
    # requests served at once on the socket (more are refused with an error, not queued),
    max_connections: Annotated[int, Field(ge=1, le=4096)] = 64
    # output kept of a command whose result is collected (exec/run results, detached logs
    # read back; HTTP, MCP); beyond it the command runs on and its result says `truncated`,
    max_output_bytes: Annotated[int, Field(ge=1024)] = 8 * 1024 * 1024
    # and bytes one files-API read returns (a larger file is refused); a detached
    # command's log on disk is capped by [resources] detached_log.
    max_file_read_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024 * 1024


class Config(_Section):
    """A whole agentkernel.toml. Every section is optional."""

    # True when effective_config() built it: the environment's settings (registry mirror, CA,
    # [microvm]) are in it already, so readers must not add os.environ's on top.
    _env_applied: bool = PrivateAttr(default=False)

    sandbox: SandboxSection = Field(default_factory=SandboxSection)
    agent: AgentSection = Field(default_factory=AgentSection)
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    network: NetworkSection = Field(default_factory=NetworkSection)
    security: SecuritySection = Field(default_factory=SecuritySection)
    build: BuildSection = Field(default_factory=BuildSection)
    files: list[FileEntry] = Field(default_factory=list)
    api: ApiSection = Field(default_factory=ApiSection)
    ssh: SshSection = Field(default_factory=SshSection)
    orchestrator: OrchestratorSection = Field(default_factory=OrchestratorSection)
    remote: RemoteSection = Field(default_factory=RemoteSection)
    enterprise: EnterpriseSection = Field(default_factory=EnterpriseSection)
    images: ImagesSection = Field(default_factory=ImagesSection)
    microvm: MicrovmSection = Field(default_factory=MicrovmSection)
    daemon: DaemonSection = Field(default_factory=DaemonSection)
    # Secrets by their stored name: from your own config and -c only (the project file's
    # are kept apart in `_project_secrets`: they ask, and may narrow, never widen).
    secrets: dict[str, SecretSection] = Field(default_factory=dict)
    _project_secrets: dict[str, SecretSection] = PrivateAttr(default_factory=dict)
    # The project file that chose [sandbox] backend where your settings name none (None:
    # yours did, or no project did): the planner holds it to at least `auto`'s pick.
    _project_backend: str | None = PrivateAttr(default=None)

    @field_validator("secrets")
    @classmethod
    def _check_secret_names(cls, v: dict[str, SecretSection]) -> dict[str, SecretSection]:
        from .secrets_store import MAX_SECRETS_PER_RUN

        if len(v) > MAX_SECRETS_PER_RUN:
            raise ValueError(f"at most {MAX_SECRETS_PER_RUN} secrets")
        for name in v:
            _usage_to_value(validate_sandbox_name, name)  # a stored secret's name rules
        return v

    @property
    def project_backend(self) -> str | None:
        """The project file whose `[sandbox] backend` applies with none of yours to bound
        it (the planner refuses it if weaker than what `auto` picks), else None."""
        return self._project_backend

    @property
    def project_secrets(self) -> dict[str, SecretSection]:
        """What the project file's `[secrets.NAME]` tables ask for (may narrow only)."""
        return self._project_secrets

    @property
    def image(self) -> str | None:
        """``base_image`` beats ``runtime``; None when neither is set (auto-detect)."""
        if self.sandbox.base_image:
            return self.sandbox.base_image
        if self.sandbox.runtime is not None:
            return runtime_image(self.sandbox.runtime)
        return None

    def network_enabled(self) -> bool:
        """Whether the sandbox gets network, from the profile, agent mode and override."""
        if self.security.network is not None:
            return self.security.network
        if self.agent.compatibility_mode is not None:
            return True  # every agent profile (even codex's restrictive base) turns network on
        return self.security.profile != "restrictive"

    def validate(self) -> list[str]:  # type: ignore[override]
        """Upstream's semantic warnings (domains, runtime); nothing here is fatal."""
        warnings: list[str] = []
        runtime = self.sandbox.runtime
        if runtime is not None and runtime not in KNOWN_RUNTIMES and not self.sandbox.base_image:
            warnings.append(
                f"Unknown [sandbox] runtime '{runtime}' "
                f"(known: {', '.join(sorted(KNOWN_RUNTIMES))}); using {DEFAULT_IMAGE}."
            )
        domains = self.security.domains
        if domains.allow or domains.block or domains.allowlist_only:
            if not self.network_enabled():
                warnings.append(
                    "Domain filtering rules in [security.domains] have no effect because "
                    "network access is disabled."
                )
            for allowed in domains.allow:
                # A wildcard allow entry is checked through its base domain.
                target = allowed[2:] if allowed.startswith("*.") else allowed
                if any(domain_matches(blocked, target) for blocked in domains.block):
                    warnings.append(
                        f"Domain '{allowed}' is in the allow list but matched by the block list "
                        "(block takes precedence)."
                    )
            warnings.append(
                "Domain filtering rules are configured but runtime DNS enforcement is not yet "
                "implemented. Rules are recorded for future use."
            )
        return warnings


def _field_keys(model_cls: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model_cls.model_fields.items()]


def _unknown_keys(model: BaseModel, prefix: str) -> Iterator[tuple[str, list[str]]]:
    """(dotted key, sibling known keys) for every key the schema does not define."""
    known = _field_keys(type(model))
    for key in model.model_extra or {}:
        yield prefix + key, known
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from _unknown_keys(value, f"{prefix}{name}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from _unknown_keys(item, f"{prefix}{name}[{i}].")
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, BaseModel):
                    yield from _unknown_keys(item, f"{prefix}{name}.{key}.")


def _loc_to_key(loc: tuple[int | str, ...]) -> str:
    key = ""
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        else:
            key += ("." if key else "") + part
    return key


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_error(exc: ValidationError, source: str) -> str:
    errors = exc.errors(include_url=False)
    first = errors[0]
    key = _loc_to_key(first["loc"])
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    if first["type"] == "missing":
        return f"{source}: missing required key '{key}'{more}"
    msg = first["msg"].removeprefix("Value error, ")
    # Our own value errors quote the value already; never echo what may be a secret.
    secret = any(word in key for word in ("key", "token"))
    got = "" if first["type"] == "value_error" or secret else f" (got {first.get('input')!r})"
    got = f" {_one_line(got, 90)}" if got else ""
    return _one_line(f"{source}: invalid value for '{key}': {msg}{got}{more}", 400)


def parse_config(data: dict[str, Any], source: str = CONFIG_FILENAME) -> tuple[Config, list[str]]:
    """Validate already-parsed TOML data; returns (config, warnings) like load_config."""
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe_error(exc, source)) from None
    warnings = []
    for key, known in _unknown_keys(config, ""):
        leaf = key.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(leaf, known, n=1)
        hint = f"; did you mean '{key[: -len(leaf)]}{close[0]}'?" if close else ""
        warnings.append(f"unknown key '{key}' in {source} (ignored){hint}")
    warnings.extend(config.validate())
    return config, warnings


def load_config(path: Path) -> tuple[Config, list[str]]:
    """Read and validate an agentkernel.toml.

    Returns the config and its warnings (unknown keys, then the domain/runtime checks).
    Raises ConfigError naming the file (and key, or TOML line) for anything invalid.
    ``[sandbox] name`` defaults to a sanitised form of the config's directory name.
    """
    path = Path(path)
    config, warnings = parse_config(_read_toml(path), str(path))
    if config.sandbox.name is None:
        config.sandbox.name = sanitize_sandbox_name(path.resolve().parent.name)
    return config, warnings


def _read_toml(path: Path) -> dict[str, Any]:
    """A config file's TOML, bounded in size; ConfigError names the file (and line)."""
    source = str(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(_MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config: {exc.strerror or exc}") from None
    if len(raw) > _MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: config file is larger than {_MAX_CONFIG_BYTES} bytes")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not valid UTF-8 (byte offset {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        # The message ends with "(at line N, column M)", or "(at end of document)".
        where = ""
        if "line" not in str(exc):
            where = f" (line {raw.count(_NL) + 1})"
        raise ConfigError(f"{source}: invalid TOML: {_one_line(str(exc))}{where}") from None
    return data


def find_project_config(cwd: Path) -> Path | None:
    """``<cwd>/agentkernel.toml`` if it is a file (no search of parent dirs, like upstream)."""
    candidate = Path(cwd) / CONFIG_FILENAME
    return candidate if candidate.is_file() else None


# -- the user's config and the layers -------------------------------------------------------
#
# Precedence, lowest first: built-in defaults, the user's file
# ($XDG_CONFIG_HOME/agentkernel/config.toml), the project's ./agentkernel.toml (or the file
# given with --config, which replaces it), the environment, flags. A project file is written
# by whoever wrote the project, so it is read with less trust than the rest (docs/config.md):

# Keys only the user's own settings give (user file, --config, environment, flags): which
# registries and certificates the shared image store trusts (a mirror answers for every
# project's `python:3.12`), the guest kernel, and how the user's daemon runs.
USER_ONLY_KEYS = ("images.registry", "images.mirrors", "images.insecure_registries",
                  "images.ca_file", "images.auths", "microvm.kernel", "daemon", "api",
                  # What the sandbox's resolver answers: a project could send an allowed
                  # name (and the secrets bound to it) to an address of its choosing.
                  "network.hosts")
# Keys that describe one project; a user file giving them is ignored (with a warning).
PROJECT_ONLY_KEYS = ("sandbox.name", "sandbox.runtime", "sandbox.base_image")
# Keys nothing reads yet: one "not implemented yet" warning per file instead of silence.
# ([security.domains] has its own warning in Config.validate.)
NOT_IMPLEMENTED_KEYS = ("resources.vcpus", "resources.memory_mb", "network.vsock_cid",
                        "network.ports", "security.seccomp", "security.commands", "build",
                        "files", "ssh", "orchestrator", "remote", "enterprise")
# Upstream documents these as informational: accepted quietly, shown as such.
INFORMATIONAL_KEYS = ("sandbox.name", "agent.preferred")
# Secrets: `agentkernel config` never prints their values.
_SECRET_LEAVES = frozenset({"api_key", "password", "nomad_token"})

# Stronger first is larger. `custom` is moderate plus overrides (profiles.get_profile).
_PROFILE_RANK = {"permissive": 0, "moderate": 1, "custom": 1, "restrictive": 2}

OriginKind = Literal["default", "user", "project", "config", "env", "flag"]


@dataclass(frozen=True)
class Origin:
    """Where a setting's value came from: a layer and its file, variable or flag."""

    kind: OriginKind
    source: str = ""  # the file's path, the variable's name or the flag; "" for default

    def __str__(self) -> str:
        return f"{self.kind}:{self.source}" if self.source else self.kind


DEFAULT_ORIGIN = Origin("default")


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _env_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


# Environment variables that are settings: (variable, key, parse). Empty means unset, except
# for the booleans, where any value is an answer (as vm/settings.py reads them).
ENV_SETTINGS: tuple[tuple[str, str, Callable[[str], Any]], ...] = (
    ("AGENTKERNEL_REGISTRY_MIRROR", "images.mirrors", _env_list),  # tried before the file's
    ("AGENTKERNEL_REGISTRY_CA", "images.ca_file", str),
    ("AGENTKERNEL_MICROVM_ALLOW_EMULATION", "microvm.allow_emulation", _truthy),
    ("AGENTKERNEL_MICROVM_KERNEL", "microvm.kernel", str),
    ("AGENTKERNEL_MICROVM_VMM", "microvm.vmm", str),
    ("AGENTKERNEL_MICROVM_SNAPSHOT", "microvm.snapshot", _truthy),
)
_ENV_BOOLEANS = frozenset({"microvm.allow_emulation", "microvm.snapshot"})


@dataclass(frozen=True)
class Setting:
    """One line of `agentkernel config`: a key, its effective value and where it came from."""

    key: str
    value: Any  # JSON-able; secrets replaced by "<hidden>"
    origin: Origin
    note: str = ""  # "not implemented yet", "informational"


@dataclass
class EffectiveConfig:
    """The settings a run gets in one context (directory, environment, user file, flags)."""

    config: Config  # the environment's settings are in it already (env_applied)
    origins: dict[str, Origin]  # dotted key -> its layer; keys absent here are defaults
    warnings: list[str]
    files: list[tuple[OriginKind, Path]]  # config files read, lowest precedence first
    user_path: Path  # the user's file, read or not (it may not exist)

    @property
    def project_source(self) -> Literal["flag", "project"] | None:
        """"flag" for --config, "project" for ./agentkernel.toml, None for neither."""
        for kind, _path in self.files:
            if kind == "config":
                return "flag"
            if kind == "project":
                return "project"
        return None

    def origin(self, key: str) -> Origin:
        """The origin of a leaf key (its own, or the nearest enclosing one that was set)."""
        while key:
            if key in self.origins:
                return self.origins[key]
            key = key.rpartition(".")[0]
        return DEFAULT_ORIGIN

    def settings(self) -> list[Setting]:
        """Every key something reads, plus every key set anywhere, in schema order."""
        out = []
        data = self.config.model_dump(mode="json", exclude={"__pydantic_extra__"})
        for key in _schema_leaves(Config):
            origin = self.origin(key)
            note = ("not implemented yet" if _under(key, NOT_IMPLEMENTED_KEYS) else
                    "informational" if _under(key, INFORMATIONAL_KEYS) else "")
            if note and origin == DEFAULT_ORIGIN:
                continue  # an unread default says nothing
            value = _get(data, key)
            hide = key.rpartition(".")[2] in _SECRET_LEAVES and value
            out.append(Setting(key, "<hidden>" if hide else _mask(value), origin, note))
        return out


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _schema_leaves(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted keys of the values in a model: nested sections are walked, the rest are leaves
    (lists of tables and mappings such as [images.auths] included)."""
    out = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(_schema_leaves(ann, f"{prefix}{name}."))
        else:
            out.append(prefix + name)
    return out


_LEAVES: frozenset[str] = frozenset()


def _is_leaf(key: str) -> bool:
    global _LEAVES
    if not _LEAVES:
        _LEAVES = frozenset(_schema_leaves(Config))
    return key in _LEAVES


def _get(data: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _has(data: dict[str, Any], key: str) -> bool:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _pop(data: dict[str, Any], key: str) -> Any:
    head, _, leaf = key.rpartition(".")
    node = _get(data, head) if head else data
    return node.pop(leaf, None) if isinstance(node, dict) else None


def _put(data: dict[str, Any], key: str, value: Any) -> None:
    *heads, leaf = key.split(".")
    node = data
    for part in heads:
        node = node.setdefault(part, {})
    node[leaf] = value


def _mask(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("<hidden>" if k in _SECRET_LEAVES and v else _mask(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v) for v in value]
    return value


def _leaf_keys(data: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """The schema's leaf keys present in a file's data (unknown keys are not settings)."""
    for name, value in data.items():
        key = prefix + name
        if _is_leaf(key):
            yield key
        elif isinstance(value, dict):
            yield from _leaf_keys(value, key + ".")


def _merge(base: dict[str, Any], upper: dict[str, Any], prefix: str = "") -> None:
    """Deep-merge a layer into `base`: tables key by key, a leaf (lists too) replaced."""
    for name, value in upper.items():
        key = prefix + name
        if not _is_leaf(key) and isinstance(value, dict) and isinstance(base.get(name), dict):
            _merge(base[name], value, key + ".")
        else:
            base[name] = value


def _shown(key: str) -> str:
    """``security.profile`` -> ``[security] profile`` (how the files spell it)."""
    head, _, leaf = key.rpartition(".")
    return f"[{head}] {leaf}" if head else f"[{leaf}]"


def _present(data: dict[str, Any], prefixes: tuple[str, ...]) -> list[str]:
    """Keys (or whole tables) among `prefixes` that a file sets."""
    found: list[str] = []
    for key in prefixes:
        value = _get(data, key)
        if isinstance(value, dict) and not _is_leaf(key):
            found.extend(f"{key}.{k}" for k in value)
        elif _has(data, key):
            found.append(key)
    return found


def _file_is_ours(path: Path) -> str | None:
    """Why the user's file cannot be trusted (someone else's, writable by others), or None."""
    import stat

    st = path.stat()
    if st.st_uid not in (os.geteuid(), 0):
        return f"owned by uid {st.st_uid}, not by you"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "writable by other users"
    return None


def _resolve_paths(data: dict[str, Any], base: Path, home: str) -> None:
    """Paths in the user's file are relative to its directory; ~ is the (caller's) home."""
    for key in ("images.ca_file", "microvm.kernel"):
        value = _get(data, key)
        if isinstance(value, str) and value:
            if value == "~" or value.startswith("~/"):
                value = home + value[1:]
            path = Path(value)
            _put(data, key, str(path if path.is_absolute() else base / path))


def _read_layer(path: Path, kind: OriginKind, warnings: list[str],
                home: str = "") -> dict[str, Any]:
    """A config file's data, validated on its own (errors and unknown keys name the file)."""
    data = _read_toml(path)
    source = str(path)
    _config, file_warnings = parse_config(data, source)
    warnings.extend(file_warnings)
    unread = _present(data, NOT_IMPLEMENTED_KEYS)
    if unread:
        warnings.append(f"{source}: not implemented yet, ignored: {', '.join(unread)}")
    if kind == "user":
        for key in _present(data, PROJECT_ONLY_KEYS):
            _pop(data, key)
            warnings.append(f"{source}: {_shown(key)} belongs in a project's agentkernel.toml "
                            "(ignored in the user config)")
        _resolve_paths(data, path.parent, home or os.path.expanduser("~"))
    return data


def _baseline(data: dict[str, Any]) -> tuple[str, Any]:
    """The profile name and resolved Profile the user's own settings give."""
    from .profiles import get_profile

    sec = data.get("security") if isinstance(data.get("security"), dict) else {}
    assert isinstance(sec, dict)
    name = str(sec.get("profile") or "moderate")
    mount_cwd = sec.get("mount_cwd") is True
    profile = get_profile(name).with_overrides(
        network=sec.get("network"), mount_home=sec.get("mount_home"),
        pass_env=sec.get("pass_env"), read_only=sec.get("read_only"),
        workspace="rw" if mount_cwd else None,  # as engine.resolve_profile reads it
    )
    return name, profile


def _loosens(key: str, value: Any, base: dict[str, Any], user_set: set[str]) -> str | None:
    """Why a project file's key would loosen the user's settings (then it is ignored)."""
    name, p = _baseline(base)
    if key == "security.profile" and _PROFILE_RANK.get(str(value), 0) < _PROFILE_RANK[name]:
        return f'"{value}" is weaker than your profile "{name}"'
    checks = {
        "security.network": (value is True and p.network == "none", "network is off"),
        "security.mount_home": (value is True and not p.mount_home,
                                "your home directory is not shared"),
        "security.pass_env": (value is True and not p.pass_env,
                              "your environment is not passed on"),
        "security.read_only": (value is False and not p.root_writable,
                               "the root filesystem is read-only"),
        "security.mount_cwd": (value is True and p.workspace != "rw",
                               f"the project directory is {p.workspace!r}, not read-write "
                               "(a writable .git can run code on the host)"),
        "resources.memory": (_lifts(key, value), "it lifts a limit"),
        "resources.pids": (_lifts(key, value), "it lifts a limit"),
        "resources.disk": (_lifts(key, value), "it lifts a limit"),
    }
    if key in _CAPS and not checks.get(key, (False, ""))[0]:
        cap = _raises_cap(key, value, base, p)
        if cap is not None:
            return f"it raises a cap above yours ({cap})"
    hit, why = checks.get(key, (False, ""))
    if hit:
        return f"{why} by your settings" if key.startswith("security.") else why
    if key == "sandbox.backend" and "sandbox.backend" in user_set:
        mine = str(_get(base, "sandbox.backend"))
        if _backend_strength(str(value)) < _backend_strength(mine):
            return f'"{value}" is weaker than your backend "{mine}"'
    if key == "network.allow":
        return _loosens_allow(value, user_set)
    if key == "images.offline_fallback" and value == "host" and \
            _get(base, "images.offline_fallback") == "none":
        return 'your offline_fallback is "none"'
    return None


# A project's numeric caps may tighten the user's (their own key, else the other spelling
# of the same cap, else their profile's), never raise them: a cloned repository's
# `pids = 1000000000` lifts a fork-bomb cap as surely as "unlimited" would.
_CAPS: dict[str, tuple[str, ...]] = {
    "resources.memory": ("resources.memory", "security.memory_mb"),
    "security.memory_mb": ("security.memory_mb", "resources.memory"),
    "resources.pids": ("resources.pids", "security.pids"),
    "security.pids": ("security.pids", "resources.pids"),
    "security.cpus": ("security.cpus",),
    "resources.disk": ("resources.disk",),
}


def _cap_value(key: str, value: Any) -> float | None:
    """A cap's value as a number (MiB, a count, CPUs); 0 for unlimited; None if unreadable."""
    from .profiles import parse_memory_limit, parse_pids

    try:
        if key == "security.cpus":
            return float(value)
        if key == "security.memory_mb" and isinstance(value, int | float):
            return float(value)
        return float(_limit(parse_pids if key.endswith("pids") else parse_memory_limit,
                            value) or 0)
    except (TypeError, ValueError):
        return None


def _raises_cap(key: str, value: Any, base: dict[str, Any], p: Any) -> str | None:
    """The user's cap (shown) that a project's `value` for `key` would raise, or None."""
    asked = _cap_value(key, value)
    if asked is None or asked == 0:
        return None  # unreadable (validation said so) or "unlimited" (_lifts)
    mine: float | None = None
    for spelling in _CAPS[key]:
        theirs = _get(base, spelling)
        if theirs is not None:
            mine = _cap_value(spelling, theirs)
            break
    if mine is None:
        # The disk quota has no profile field: its default is the cap (without it, a
        # project's `disk = "40g"` raised the 10 GiB every kept sandbox gets).
        mine = {"memory": p.memory_mb, "pids": p.pids, "cpus": p.cpus,
                "disk": DEFAULT_DISK_MB}.get(key.rsplit(".", 1)[1].removesuffix("_mb"))
    if not mine or asked <= mine:
        return None  # no cap of theirs to raise, or within it
    unit = " MiB" if "memory" in key or "disk" in key else (" CPUs" if "cpus" in key else "")
    return f"{mine:g}{unit}"


def _lifts(key: str, value: Any) -> bool:
    """Whether a limit's value means "unlimited" as its parser reads it: spellings such as
    "Unlimited", " max" or "MAX" lift the cap as surely as "unlimited" does."""
    from .profiles import UNLIMITED, parse_memory_limit, parse_pids

    try:
        return _limit(parse_pids if key == "resources.pids" else parse_memory_limit,
                      value) == UNLIMITED
    except ValueError:  # the file failed validation already; nothing to drop here
        return False


def _loosens_allow(value: Any, user_set: set[str]) -> str | None:
    """A project's egress allow-list narrows a policy to the names it lists, unless it
    replaces the user's own list, or names addresses: an address or CIDR entry is the one
    way past the always-denied set (loopback, private networks, cloud metadata)."""
    from .egress_policy import parse_entry

    if "network.allow" in user_set:
        return "your settings have an allow-list of their own"
    nets = [str(e) for e in value or [] if parse_entry(str(e)).kind == "net"]
    if nets:
        return f"address entries ({', '.join(nets[:3])}) reach what is always denied"
    return None


def _backend_strength(name: str) -> int:
    """The backend's own `strength`; `auto` (whatever works here) ranks below any named one."""
    if name == "auto":
        return 0
    from .backends import get_backend

    return int(get_backend(name).strength)


def _guard_project(data: dict[str, Any], base: dict[str, Any], user_set: set[str],
                   source: str, warnings: list[str]) -> None:
    """Drop what a project file may not set or loosen, one warning per key dropped."""
    hint = f"`-c {source}` trusts the file"
    for key in _present(data, USER_ONLY_KEYS):
        _pop(data, key)
        warnings.append(f"{source}: {_shown(key)} ignored: only your own config sets it "
                        f"(user config, environment, -c); {hint}")
    for key in list(_leaf_keys(data)):
        why = _loosens(key, _get(data, key), base, user_set)
        if why:
            _pop(data, key)
            warnings.append(f"{source}: {_shown(key)} ignored: a project file may not loosen "
                            f"your settings ({why}); {hint}")


def effective_config(
    cwd: Path,
    env: Mapping[str, str],
    user_path: Path | None = None,
    *,
    config_path: Path | None = None,
    flags: Mapping[str, tuple[Any, str]] | None = None,
) -> EffectiveConfig:
    """The settings a run in `cwd` gets, with where each came from.

    `env` is the caller's environment (its XDG_CONFIG_HOME/HOME find the user's file when
    `user_path` is None, and its AGENTKERNEL_* settings apply). `config_path` (--config)
    replaces ./agentkernel.toml and is trusted like the user's file. `flags` maps dotted keys
    to (value, flag name). Raises ConfigError naming the file, variable or flag at fault.

    The answer is remembered while the files are unchanged (the daemon asks on every run):
    treat its `config` as read-only.
    """
    user_file = Path(user_path) if user_path is not None else Path(user_config_path_str(env))
    key = _cache_key(cwd, env, user_file, config_path, flags)
    cached = _CACHE.get(key)
    if cached is not None:
        return dataclasses.replace(cached, warnings=list(cached.warnings))
    eff = _layered(cwd, env, user_file, config_path, flags)
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = eff
    return dataclasses.replace(eff, warnings=list(eff.warnings))


_CACHE: dict[str, EffectiveConfig] = {}
_CACHE_MAX = 32


def _cache_key(cwd: Path, env: Mapping[str, str], user_file: Path, config_path: Path | None,
               flags: Mapping[str, tuple[Any, str]] | None) -> str:
    """Everything the answer depends on: the files' identities and the variables read."""
    def ident(path: Path) -> tuple[int, ...] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode,
                st.st_uid)

    project = Path(config_path) if config_path is not None else Path(cwd) / CONFIG_FILENAME
    variables = [env.get(var) for var, _key, _parse in ENV_SETTINGS] + [env.get("HOME")]
    return repr((str(cwd), str(user_file), ident(user_file), str(config_path), str(project),
                 ident(project), variables, sorted((flags or {}).items())))


def _layered(cwd: Path, env: Mapping[str, str], user_file: Path, config_path: Path | None,
             flags: Mapping[str, tuple[Any, str]] | None) -> EffectiveConfig:
    warnings: list[str] = []
    files: list[tuple[OriginKind, Path]] = []
    merged: dict[str, Any] = {}
    asked: dict[str, Any] = {}
    origins: dict[str, Origin] = {}

    def layer(data: dict[str, Any], origin: Origin) -> None:
        for key in _leaf_keys(data):
            origins[key] = origin
        _merge(merged, data)

    if user_file.is_file():
        why = _file_is_ours(user_file)
        if why:
            warnings.append(f"{user_file}: ignored: {why} (chmod go-w, or chown it)")
        else:
            layer(_read_layer(user_file, "user", warnings, env.get("HOME", "")),
                  Origin("user", str(user_file)))
            files.append(("user", user_file))
    users_backend = _get(merged, "sandbox.backend")  # (a named one bounds a project's)
    if config_path is not None:
        if not Path(config_path).is_file():
            raise ConfigError(f"config file {config_path} does not exist")
        layer(_read_layer(Path(config_path), "config", warnings),
              Origin("config", str(config_path)))
        files.append(("config", Path(config_path)))
    else:
        project = find_project_config(cwd)
        if project is not None:
            data = _read_layer(project, "project", warnings)
            # A project's [secrets] ask; they never merge over your own (secrets_store).
            asked = data.pop("secrets", None) or {}
            user_set = {k for k, o in origins.items() if o.kind == "user"}
            _guard_project(data, copy.deepcopy(merged), user_set, str(project), warnings)
            layer(data, Origin("project", str(project)))
            files.append(("project", project))
    for var, key, parse in ENV_SETTINGS:
        raw = env.get(var)
        if raw is None or (not raw and key not in _ENV_BOOLEANS):
            continue
        value = parse(raw)
        if key == "images.mirrors":
            before = origins.get(key)
            value = value + list(_get(merged, key) or [])
            source = var if before is None else f"{var}, then {before}"
            layer(_nest(key, value), Origin("env", source))
        else:
            layer(_nest(key, value), Origin("env", var))
    for key, (value, flag) in (flags or {}).items():
        if value is not None:
            layer(_nest(key, value), Origin("flag", flag))
    config = _validate_merged(merged, origins)
    backend_origin = origins.get("sandbox.backend")
    if backend_origin is not None and backend_origin.kind == "project" and \
            config.sandbox.backend != "auto" and users_backend in (None, "auto"):
        config._project_backend = backend_origin.source
    if config_path is None and asked:  # validated with the project file already
        config._project_secrets = {n: SecretSection.model_validate(v) for n, v in asked.items()}
    if config.sandbox.name is None and files and files[-1][0] != "user":
        config.sandbox.name = sanitize_sandbox_name(files[-1][1].resolve().parent.name)
    config._env_applied = True
    return EffectiveConfig(config, origins, list(dict.fromkeys(warnings)), files, user_file)


def _nest(key: str, value: Any) -> dict[str, Any]:
    data: dict[str, Any] = {}
    _put(data, key, value)
    return data


def _validate_merged(merged: dict[str, Any], origins: dict[str, Origin]) -> Config:
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        # Each file passed on its own: the culprit is a variable or a flag (or their mix).
        key = _loc_to_key(exc.errors(include_url=False)[0]["loc"])
        origin = next((origins[k] for k in sorted(origins, key=len, reverse=True)
                       if key == k or key.startswith(k + ".")), DEFAULT_ORIGIN)
        raise ConfigError(_describe_error(exc, str(origin))) from None


def user_config_path(env: Mapping[str, str] | None = None) -> Path:
    """The user's config file: $XDG_CONFIG_HOME/agentkernel/config.toml (may not exist)."""
    return Path(user_config_path_str(env))


INIT_TEMPLATE = """\
# agentkernel.toml: settings for sandboxes run from this directory.
# Every section is optional; unknown keys are reported as warnings. Your own defaults go
# in ~/.config/agentkernel/config.toml; `agentkernel config` shows what applies here.

[sandbox]
name = "{name}"
# Image: base_image beats runtime. Leave both unset to auto-detect it from the
# command and the project files (package.json, pyproject.toml, go.mod, ...).
# runtime = "python"          # base | python | node | go | rust | ruby | java | c | dotnet
# base_image = "python:3.12-alpine"
backend = "auto"              # auto | namespaces | gvisor | microvm

[agent]
preferred = "{agent}"
# compatibility_mode = "claude"  # native | claude | codex | gemini

[resources]
# Upstream's vcpus and memory_mb keys are not implemented yet.
# Caps over the profile's (permissive: 4g, 4096 pids). "unlimited" lifts one (only
# from your own config or a flag: a project file may tighten your settings, not loosen them).
# memory = "2g"
# pids = 1024
# disk = "10g"                # persistent sandboxes' host disk quota

[security]
profile = "moderate"          # permissive | moderate | restrictive | custom
# Per-key overrides of the profile:
# network = true
# mount_cwd = false           # mount this directory at /workspace
# mount_home = false
# pass_env = false
# read_only = false
# memory_mb = 512
# pids = 256
# cpus = 1.0
# seccomp = "moderate"        # not implemented yet

# [security.commands]           # not implemented yet
# block = ["curl", "wget"]

# [security.domains]
# allow = ["*.pypi.org"]
# block = ["169.254.169.254"]

# [[files]]                     # not implemented yet
# source = "setup.sh"         # relative to this file
# dest = "/workspace/setup.sh"
# mode = "0755"
"""

_AGENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)


def render_init(name: str, agent: str) -> str:
    """The agentkernel.toml that ``agentkernel init`` writes (validates both values)."""
    validate_sandbox_name(name)
    if not _AGENT_RE.fullmatch(agent):
        raise UsageError(f"invalid agent name {agent!r}")
    # Both values are now plain ASCII words, so they cannot break out of the TOML string.
    return INIT_TEMPLATE.format(name=name, agent=agent)


def configure_microvm_here() -> None:
    """Give vm.settings.current() the [microvm] settings of the user config and
    ./agentkernel.toml as effective_config layers them, for commands that plan no run
    (doctor, setup --microvm). Best effort and quiet: a run reports config errors itself."""
    from .paths import user_config_path_str
    from .vm.settings import configure

    if not (Path.cwd() / "agentkernel.toml").is_file() \
            and not os.path.isfile(user_config_path_str()):
        return
    try:
        eff = effective_config(Path.cwd(), os.environ)
    except Exception:
        return
    configure(eff.config.microvm)
