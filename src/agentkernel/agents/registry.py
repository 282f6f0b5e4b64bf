"""The agent registry: registry.toml read into frozen records, checked once, in one place."""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, UsageError

REGISTRY_FILE = Path(__file__).with_name("registry.toml")
MCP_FORMATS = ("claude-plugin", "codex-toml", "gemini-json", "opencode-json")
SCOPES = ("user", "project")


@dataclass(frozen=True)
class KeyVar:
    """A credential variable and the HTTP header its value travels in."""

    env: str
    header: str
    host: str | None = None  # the API host it is for; None: the agent's `hosts`
    # The variable the agent reads it from, when not `env` (Codex's exec reads its key
    # from CODEX_API_KEY, not OPENAI_API_KEY): where `run --agent` puts the placeholder.
    inside: str | None = None

    @property
    def sandbox_env(self) -> str:
        return self.inside or self.env

    @property
    def header_name(self) -> str:
        """The header's name alone ("authorization" of "authorization: Bearer")."""
        return self.header.partition(":")[0].strip().lower()


@dataclass(frozen=True)
class AgentSpec:
    """One row of the registry (see registry.toml for what each field means)."""

    id: str
    name: str
    binary: str
    npm: str
    version: str
    version_args: tuple[str, ...]
    keys: tuple[KeyVar, ...]
    base_url: str
    hosts: tuple[str, ...]
    oauth_files: tuple[str, ...]
    mcp_format: str
    config_user: str
    config_project: str
    cli_add: tuple[str, ...]
    cli_remove: tuple[str, ...]
    cli_scopes: tuple[str, ...]
    cli_env: tuple[tuple[str, str], ...] = ()
    # Scripts of the package's own that its npm postinstall would run (we install with
    # --ignore-scripts, so nothing in its dependency tree runs): run with node, in order.
    setup: tuple[str, ...] = ()
    # Variables `run --agent` sets for the agent in its sandbox (no auto-update, no
    # telemetry: the install is read-only there and only its API hosts are reachable).
    run_env: tuple[tuple[str, str], ...] = ()
    # Host files and dirs ($HOME-relative) `create --agent --settings` copies in.
    settings: tuple[str, ...] = ()

    @property
    def npm_spec(self) -> str:
        return f"{self.npm}@{self.version}"


def _strings(row: dict[str, object], key: str, where: str) -> tuple[str, ...]:
    value = row.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {key} must be a list of strings")
    return tuple(str(v) for v in value)


def _string(row: dict[str, object], key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key} must be a non-empty string")
    return value


def _relative(path: str, where: str) -> str:
    """Config paths are relative to $HOME or the project: never absolute, never `..`."""
    if path.startswith("/") or ".." in Path(path).parts:
        raise ConfigError(f"{where}: {path!r} must be a relative path without '..'")
    return path


def parse_row(agent_id: str, row: dict[str, object]) -> AgentSpec:
    where = f"agent registry [{agent_id}]"
    if not agent_id.isascii() or not agent_id.isalnum() or not agent_id.islower():
        raise ConfigError(f"{where}: the id must be lower-case letters and digits")
    keys = row.get("keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, dict) for k in keys):
        raise ConfigError(f"{where}: keys must be a list of {{env, header}} tables")
    fmt = _string(row, "mcp_format", where)
    if fmt not in MCP_FORMATS:
        raise ConfigError(f"{where}: unknown mcp_format {fmt!r} (known: {', '.join(MCP_FORMATS)})")
    scopes = _strings(row, "cli_scopes", where)
    if any(s not in SCOPES for s in scopes):
        raise ConfigError(f"{where}: cli_scopes may only hold {', '.join(SCOPES)}")
    return AgentSpec(
        id=agent_id, name=_string(row, "name", where), binary=_string(row, "binary", where),
        npm=_string(row, "npm", where), version=_string(row, "version", where),
        version_args=_strings(row, "version_args", where),
        keys=tuple(KeyVar(_string(k, "env", where), _string(k, "header", where),
                          _string(k, "host", where) if "host" in k else None,
                          _string(k, "inside", where) if "inside" in k else None)
                   for k in keys),
        base_url=_string(row, "base_url", where), hosts=_strings(row, "hosts", where),
        oauth_files=tuple(_relative(p, where) for p in _strings(row, "oauth_files", where)),
        mcp_format=fmt,
        config_user=_relative(_string(row, "config_user", where), where),
        config_project=_relative(_string(row, "config_project", where), where),
        cli_add=_strings(row, "cli_add", where), cli_remove=_strings(row, "cli_remove", where),
        cli_scopes=scopes, cli_env=_env_table(row, where, "cli_env"),
        run_env=_env_table(row, where, "run_env"),
        setup=tuple(_relative(v, where) for v in _strings(row, "setup", where)),
        settings=tuple(_relative(v, where) for v in _strings(row, "settings", where)),
    )


def _env_table(row: dict[str, object], where: str, key: str) -> tuple[tuple[str, str], ...]:
    value = row.get(key, {})
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(f"{where}: {key} must be a table of strings")
    return tuple((str(k), str(v)) for k, v in value.items())


@functools.cache
def agents() -> tuple[AgentSpec, ...]:
    """Every agent of the registry, in its order."""
    with REGISTRY_FILE.open("rb") as f:
        data = tomllib.load(f)
    rows = []
    for agent_id, row in data.items():
        if not isinstance(row, dict):
            raise ConfigError(f"agent registry: [{agent_id}] must be a table")
        rows.append(parse_row(agent_id, row))
    return tuple(rows)


def ids() -> tuple[str, ...]:
    return tuple(a.id for a in agents())


def get(agent_id: str) -> AgentSpec:
    """The agent called `agent_id`; a UsageError names the known ones."""
    for agent in agents():
        if agent.id == agent_id:
            return agent
    shown = agent_id[:40]
    raise UsageError(f"unknown agent {shown!r}: choose {', '.join(ids())}")
