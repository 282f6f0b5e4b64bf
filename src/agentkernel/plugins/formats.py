"""Agents' MCP config files: where they are, our entry in each format, merges that keep the rest.

JSON files (Gemini `settings.json` `mcpServers`, OpenCode `opencode.json` `mcp`, Claude
Code `.mcp.json` / `~/.claude.json` `mcpServers`) are parsed and written back with every
other key as it was. Codex's `config.toml` is edited as text: only the lines of our own
`[mcp_servers.agentkernel]` table (and its sub-tables) change, so comments and the layout of
everything else survive; the result is parsed again and every foreign key compared.
"""

from __future__ import annotations

import contextlib
import json
import os
import tomllib
from pathlib import Path
from typing import Any

from ..agents.registry import AgentSpec
from ..errors import AgentKernelError

SERVER = "agentkernel"  # our entry's name in every agent's config
PLUGIN_ID = "agentkernel@agentkernel"  # Claude Code: plugin@marketplace
MAX_CONFIG_BYTES = 16 * 1024 * 1024  # a config file larger than this is not one we edit


class ConfigFileError(AgentKernelError):
    """An agent's config file cannot be read, parsed or safely edited."""

    exit_code = 1
    http_status = 409


# ---------------------------------------------------------------- where


def home() -> Path:
    return Path(os.path.expanduser("~"))


def config_path(spec: AgentSpec, scope: str, project: Path) -> Path:
    if scope == "user":
        return home() / spec.config_user
    return in_project(project, spec.config_project)


def in_project(project: Path, relative: str) -> Path:
    """`project/relative`, refused if a symlink lies between the project and it: the
    repository (cloned, or another user's) decides those, and would send our merge, its
    new file or our uninstall's unlink to a path outside the project. (Your own config
    files, user scope, may be symlinks: dotfile managers make them.)"""
    path = project
    for part in Path(relative).parts:
        path = path / part
        if path.is_symlink():
            raise ConfigFileError(f"{path} is a symlink: agentkernel does not follow a "
                                  f"project's symlinks out of it; remove it, or add the "
                                  f"`{SERVER}` MCP server by hand")
    return path


def _json_key(spec: AgentSpec) -> str:
    return "mcp" if spec.mcp_format == "opencode-json" else "mcpServers"


# ---------------------------------------------------------------- our entry


def entry(spec: AgentSpec, argv: list[str]) -> dict[str, Any]:
    """Our server's entry in `spec`'s format; argv[0] is our absolute executable."""
    if spec.mcp_format == "opencode-json":
        return {"type": "local", "command": list(argv), "enabled": True}
    return {"command": argv[0], "args": list(argv[1:])}


def same_entry(spec: AgentSpec, found: Any, wanted: dict[str, Any]) -> bool:
    """Whether an existing entry runs the same command (fields agents add are ignored)."""
    if not isinstance(found, dict):
        return False
    if spec.mcp_format == "opencode-json":
        return bool(found.get("command") == wanted["command"]
                    and found.get("enabled", True) is not False)
    return bool(found.get("command") == wanted["command"]
                and list(found.get("args") or []) == wanted["args"])


# ---------------------------------------------------------------- reading


def read_text(path: Path) -> str | None:
    """The file's text, None if it does not exist; refuses what is not a regular file."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigFileError(f"cannot read {path}: {exc.strerror}") from None
    if not path.is_file():
        raise ConfigFileError(f"{path} is not a regular file")
    if st.st_size > MAX_CONFIG_BYTES:
        raise ConfigFileError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"cannot read {path}: {exc}") from None


def parse(spec: AgentSpec, path: Path, text: str | None) -> dict[str, Any]:
    if text is None or not text.strip():
        return {}
    try:
        data = tomllib.loads(text) if spec.mcp_format == "codex-toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigFileError(f"cannot parse {path} ({exc}); fix it, or add the "
                              f"`{SERVER}` MCP server to it by hand") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path} does not hold an object at the top")
    return data


def servers_table(spec: AgentSpec, data: dict[str, Any]) -> dict[str, Any]:
    key = "mcp_servers" if spec.mcp_format == "codex-toml" else _json_key(spec)
    table = data.get(key)
    return table if isinstance(table, dict) else {}


def current(spec: AgentSpec, path: Path) -> Any:
    """Our entry in the file at `path`, or None."""
    return servers_table(spec, parse(spec, path, read_text(path))).get(SERVER)


def configured_scopes(spec: AgentSpec, project: Path) -> list[str]:
    """The scopes whose config file has our MCP server (unreadable files count as not)."""
    scopes = []
    for scope in ("user", "project"):
        try:
            if current(spec, config_path(spec, scope, project)) is not None:
                scopes.append(scope)
        except ConfigFileError:
            continue
    return scopes


def claude_settings(scope: str, project: Path) -> Path:
    return (home() if scope == "user" else project) / ".claude" / "settings.json"


def plugin_scopes(_spec: AgentSpec, project: Path) -> list[str]:
    """Claude Code: the scopes whose settings enable the agentkernel plugin."""
    scopes = []
    for scope in ("user", "project"):
        try:
            text = read_text(claude_settings(scope, project))
            data = json.loads(text) if text else {}
        except (ConfigFileError, json.JSONDecodeError):
            continue
        enabled = data.get("enabledPlugins") if isinstance(data, dict) else None
        if isinstance(enabled, dict) and enabled.get(PLUGIN_ID):
            scopes.append(scope)
    return scopes


# ---------------------------------------------------------------- editing


def with_entry(spec: AgentSpec, path: Path, text: str | None,
               new: dict[str, Any] | None) -> str:
    """The file's new text: our entry set to `new` (None: removed), all else kept."""
    if spec.mcp_format == "codex-toml":
        return _toml_with_entry(path, text or "", new)
    data = parse(spec, path, text)
    key = _json_key(spec)
    table = data.get(key)
    if table is not None and not isinstance(table, dict):
        raise ConfigFileError(f"{path}: `{key}` is not an object")
    table = dict(table or {})
    if new is None:
        table.pop(SERVER, None)
    else:
        table[SERVER] = new
    if table or key in data:
        data[key] = table
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _toml_block(new: dict[str, Any]) -> list[str]:
    return [f"[mcp_servers.{SERVER}]", *(f"{k} = {_toml_value(v)}" for k, v in new.items())]


def _is_our_header(line: str) -> bool:
    s = line.strip()
    if not s.startswith("["):
        return False
    name = s.strip("[]").split("#")[0].strip().replace(" ", "")
    return name == f"mcp_servers.{SERVER}" or name.startswith(f"mcp_servers.{SERVER}.")


def _is_header(line: str) -> bool:
    return line.lstrip().startswith("[")


def _toml_with_entry(path: Path, text: str, new: dict[str, Any] | None) -> str:
    before = parse_toml(path, text)
    lines = text.splitlines()
    kept: list[str] = []
    ours = False
    seen = False
    for line in lines:
        if _is_header(line):
            ours = _is_our_header(line)
            seen = seen or ours
        if not ours:
            kept.append(line)
    if not seen and SERVER in (before.get("mcp_servers") or {}):
        raise ConfigFileError(f"{path} defines mcp_servers.{SERVER} other than as a "
                              f"[mcp_servers.{SERVER}] table; edit it by hand")
    while kept and not kept[-1].strip():
        kept.pop()
    if new is not None:
        kept += ([""] if kept else []) + _toml_block(new)
    result = "\n".join(kept) + "\n" if kept else ""
    _check_toml_kept(path, before, parse_toml(path, result), new)
    return result


def parse_toml(path: Path, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"cannot parse {path} ({exc}); fix it, or add the "
                              f"`{SERVER}` MCP server to it by hand") from None


def _check_toml_kept(path: Path, before: dict[str, Any], after: dict[str, Any],
                     new: dict[str, Any] | None) -> None:
    """Everything but our entry must be exactly as it was (the text edit is checked)."""

    def without_ours(data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        servers = dict(data.get("mcp_servers") or {})
        servers.pop(SERVER, None)
        data.pop("mcp_servers", None)
        if servers:  # an empty [mcp_servers] table and none at all are the same config
            data["mcp_servers"] = servers
        return data

    ok = without_ours(before) == without_ours(after)
    if new is not None:
        ok = ok and (after.get("mcp_servers") or {}).get(SERVER) == new
    if not ok:
        raise ConfigFileError(f"editing {path} would change more than the {SERVER} entry "
                              "(an unusual layout?); add the entry by hand")


def write_atomic(path: Path, text: str) -> None:
    """Replace the file (its target, if it is a symlink) at once, keeping its mode."""
    target = Path(os.path.realpath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = target.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o600 if target.name == ".claude.json" else 0o644
    tmp = target.with_name(f".{target.name}.ak-{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
