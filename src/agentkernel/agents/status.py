"""What the host has of each agent: its binary and version, how it is signed in, our MCP entry."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..paths import data_dir
from .registry import AgentSpec, KeyVar, agents

if TYPE_CHECKING:
    from ..secrets_store import Secret

VERSION_TIMEOUT = 30.0  # a node CLI's first start on a cold, busy host can take seconds
_VERSION = re.compile(r"\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.-]+)?")


@dataclass(frozen=True)
class AgentStatus:
    id: str
    name: str
    path: str | None  # the binary found, None when not installed
    origin: str | None  # "PATH" or "agentkernel" (installed by `agents install`)
    version: str | None
    auth: str  # env:VAR | secret:NAME | oauth:~/file | missing
    mcp: str  # where our MCP server is configured for it: user, project, both, no
    plugin: str  # claude: the agentkernel plugin's scope or "no"; others "-"

    def as_json(self) -> dict[str, object]:
        return {"id": self.id, "name": self.name, "installed": self.path is not None,
                "path": self.path, "origin": self.origin, "version": self.version,
                "auth": self.auth, "mcp": self.mcp, "plugin": self.plugin}


def agents_dir() -> Path:
    """Where `agents install` puts npm packages: one prefix per agent in the data dir."""
    return data_dir() / "agents"


def installed_binary(spec: AgentSpec) -> Path:
    return agents_dir() / spec.id / "node_modules" / ".bin" / spec.binary


def find_binary(spec: AgentSpec) -> tuple[str, str] | None:
    """The agent's executable and where it came from: the user's PATH first, then ours."""
    found = shutil.which(spec.binary)
    if found:
        return os.path.abspath(found), "PATH"
    ours = installed_binary(spec)
    if os.access(ours, os.X_OK):
        return str(ours), "agentkernel"
    return None


def probe_version(spec: AgentSpec, binary: str) -> str | None:
    """The first x.y.z the binary prints for its version arguments, or None."""
    env = {**os.environ, "NO_COLOR": "1", "DISABLE_AUTOUPDATER": "1",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
    try:
        proc = subprocess.run([binary, *spec.version_args], capture_output=True,
                              stdin=subprocess.DEVNULL, timeout=VERSION_TIMEOUT, env=env,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = proc.stdout.decode(errors="replace")[:4096]
    match = _VERSION.search(text)
    return match.group(0) if proc.returncode == 0 and match else None


def auth_of(spec: AgentSpec, env: dict[str, str] | None = None,
            home: Path | None = None) -> str:
    """How the agent would authenticate: a key in the environment, a stored secret that
    covers it (what `run --agent` uses), an OAuth login, or none.

    Only names and paths are reported; no value is shown.
    """
    values = os.environ if env is None else env
    for key in spec.keys:
        if values.get(key.env):
            return f"env:{key.env}"
    stored = covering_secret(spec)
    if stored is not None:
        return f"secret:{stored}"
    home = home if home is not None else Path(os.path.expanduser("~"))
    for rel in spec.oauth_files:
        if (home / rel).is_file():
            return f"oauth:~/{rel}"
    return "missing"


def status(spec: AgentSpec, project: Path | None = None) -> AgentStatus:
    from ..plugins.formats import configured_scopes, plugin_scopes

    found = find_binary(spec)
    version = probe_version(spec, found[0]) if found else None
    project = project or Path.cwd()
    mcp = _scopes_word(configured_scopes(spec, project))
    plugin = _scopes_word(plugin_scopes(spec, project)) if spec.mcp_format == "claude-plugin" \
        else "-"
    return AgentStatus(spec.id, spec.name, found[0] if found else None,
                       found[1] if found else None, version, auth_of(spec), mcp, plugin)


def _scopes_word(scopes: list[str]) -> str:
    return ",".join(scopes) if scopes else "no"


def all_status(project: Path | None = None) -> list[AgentStatus]:
    """Every registered agent's status; the version probes run side by side."""
    specs = agents()
    with ThreadPoolExecutor(max_workers=len(specs)) as pool:
        return list(pool.map(lambda s: status(s, project), specs))


def key_hosts(spec: AgentSpec, key: KeyVar) -> tuple[str, ...]:
    """The API hosts that may see `key`'s value."""
    return (key.host,) if key.host else spec.hosts


def covering_secret(spec: AgentSpec) -> str | None:
    """A stored secret the agent can use: its variable is one of the agent's key
    variables, its header that key's header, its hosts all of that key's hosts."""
    from ..secrets_store import load, names

    for name in names():
        try:
            secret = load(name)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # an unreadable file: `secret list` says so, not us
        if _covers(secret, spec):
            return name
    return None


def _covers(secret: Secret, spec: AgentSpec) -> bool:
    return any(secret.env == key.env and secret.header in (key.header_name, "*")
               and set(key_hosts(spec, key)) <= set(secret.hosts) for key in spec.keys)


def installed_version(spec: AgentSpec) -> str | None:
    """The version of agentkernel's install of the agent (its package.json, bounded read),
    without starting it; None when it is not installed."""
    import json

    if not os.access(installed_binary(spec), os.X_OK):
        return None
    manifest = agents_dir() / spec.id / "node_modules" / spec.npm / "package.json"
    try:
        with manifest.open("rb") as f:
            version = json.loads(f.read(1 << 20)).get("version")
    except (OSError, ValueError, AttributeError):
        return None
    return version if isinstance(version, str) and _VERSION.fullmatch(version) else None


def sandbox_agents() -> list[dict[str, object]]:
    """What an agent sandbox (`create --agent`, HTTP's `agent`) would get of each agent:
    agentkernel's install, the stored secret that covers its key, the hosts it may reach.
    Nothing is started and no environment variable is read (HTTP's GET /agents)."""
    out: list[dict[str, object]] = []
    for spec in agents():
        version = installed_version(spec)
        secret = covering_secret(spec)
        hosts = list(spec.hosts)
        for key in spec.keys:
            hosts += [h for h in key_hosts(spec, key) if h not in hosts]
        out.append({"id": spec.id, "name": spec.name, "npm": spec.npm,
                    "installed": version is not None, "version": version,
                    "key": f"secret:{secret}" if secret else "missing", "hosts": hosts})
    return out
