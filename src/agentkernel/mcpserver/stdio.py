"""`agentkernel mcp-server`: the MCP tools on stdin/stdout, reaching the daemon per call."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _run_fields() -> dict[str, Any]:
    """What the CLI's `run` also sends: the host env a permissive profile passes on, and
    our data dir (a daemon of another one refuses)."""
    from ..daemon.client import host_env
    from ..paths import data_dir_str

    return {"host_env": host_env(), "data_dir": data_dir_str()}


def main(project: str | None = None) -> int:
    from .ops import DaemonOps
    from .tools import build_server

    root = Path(project).resolve() if project else Path.cwd()
    server = build_server(DaemonOps, root, _run_fields)
    server.run("stdio")
    return 0
