"""The agentkernel.toml schema (pydantic models), its loader, and the `init` template."""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .detect import DEFAULT_IMAGE, validate_image_ref
from .errors import ConfigError, UsageError
from .names import sanitize_sandbox_name, validate_sandbox_name, validate_sandbox_path

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
    backend: Literal["auto", "namespaces", "gvisor", "microvm"] = "auto"

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


class PoolEntry(_Section):
    """One warm-pool key; None means what a plain `run` would pick."""

    image: str | None = None
    profile: Literal["permissive", "moderate", "restrictive"] | None = None
    backend: Literal["auto", "namespaces", "gvisor", "microvm"] | None = None
    min: Annotated[int, Field(ge=0, le=64)] | None = None  # default: [daemon] pool_min
    max: Annotated[int, Field(ge=0, le=256)] | None = None  # default: [daemon] pool_max

    @field_validator("image")
    @classmethod
    def _check_image(cls, v: str | None) -> str | None:
        if v is None or v == "host":  # "host": the host's userland, as `run --image host`
            return v
        return str(_usage_to_value(validate_image_ref, v))


class DaemonSection(_Section):
    """The per-user daemon (read from its own config file, see docs/daemon.md)."""

    pool_min: Annotated[int, Field(ge=0, le=64)] = 2
    pool_max: Annotated[int, Field(ge=0, le=256)] = 8
    pools: list[PoolEntry] = Field(default_factory=lambda: [PoolEntry()])
    # Keys nobody configured (e.g. a project dir) get this many warm sandboxes once used...
    adhoc_min: Annotated[int, Field(ge=0, le=64)] = 1
    # ...until they have been idle this long.
    adhoc_idle_seconds: Annotated[float, Field(gt=0)] = 600.0
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
    return _one_line(f"{source}: invalid value for '{key}': {msg}{_one_line(got, 90)}{more}", 400)


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
    config, warnings = parse_config(data, source)
    if config.sandbox.name is None:
        config.sandbox.name = sanitize_sandbox_name(path.resolve().parent.name)
    return config, warnings


def find_project_config(cwd: Path) -> Path | None:
    """``<cwd>/agentkernel.toml`` if it is a file (no search of parent dirs, like upstream)."""
    candidate = Path(cwd) / CONFIG_FILENAME
    return candidate if candidate.is_file() else None


INIT_TEMPLATE = """\
# agentkernel.toml: settings for sandboxes run from this directory.
# Every section is optional; unknown keys are reported as warnings.

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
vcpus = 1
memory_mb = 512
# Caps over the profile's (permissive: 4g, 4096 pids). "unlimited" lifts one.
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
# seccomp = "moderate"

# [security.commands]
# block = ["curl", "wget"]

# [security.domains]
# allow = ["*.pypi.org"]
# block = ["169.254.169.254"]

# [[files]]
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
