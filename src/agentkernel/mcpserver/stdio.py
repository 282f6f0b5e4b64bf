"""`agentkernel mcp-server`: the MCP tools on stdin/stdout, reaching the daemon per call."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _run_fields() -> dict[str, Any]:
    """What the CLI's `run` also sends: the caller's context the daemon plans from (our
    environment's plan-changing variables and user config, context.py), and our data dir
    (a daemon of another one refuses)."""
    from ..context import caller_env, user_config_path
    from ..paths import data_dir_str

    return {"caller_env": caller_env(), "user_config": user_config_path(),
            "data_dir": data_dir_str()}


def main(project: str | None = None) -> int:
    from .ops import DaemonOps
    from .tools import build_server

    root = Path(project).resolve() if project else Path.cwd()
    server = build_server(DaemonOps, root, _run_fields)
    server.run("stdio")
    return 0
