"""What several commands share: messages, `-e` pairs, limits, the caller's context.

On the hot path of `run`/`exec` through the daemon: imports only `os`, `sys` and the client.
"""

from __future__ import annotations

import os
import sys

from ..ipc.client import DaemonError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any


def say(msg: str) -> None:
    print(f"agentkernel: {msg}", file=sys.stderr)


def env_pairs(pairs: list[str]) -> dict[str, str]:
    """`-e KEY=VALUE`, or `-e KEY` to pass the host's value (the daemon validates names)."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            if key not in os.environ:
                raise DaemonError(f"-e {key}: not set on the host (use KEY=VALUE)", 2)
            value = os.environ[key]
        env[key] = value
    return env


def strip_dashes(args_command: list[str]) -> list[str]:
    """The command without the `--` that may lead it."""
    command = list(args_command)
    if command and command[0] == "--":
        command = command[1:]
    return command


def limits(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """--memory and --pids as request fields (profiles.UNLIMITED for `unlimited`)."""
    pids_arg = getattr(args, "pids", None)
    if not args.memory and not pids_arg:
        return None, None  # the run hot path: profiles (typing, re, enum) costs ~10 ms
    from ..profiles import parse_memory_limit, parse_pids

    memory = parse_memory_limit(args.memory) if args.memory else None
    return memory, parse_pids(pids_arg) if pids_arg else None


def caller() -> dict[str, Any]:
    """This CLI's context for the daemon's planner (context.py): the daemon plans our run
    from our environment and user config, never from its own."""
    from ..context import caller_env, user_config_path

    return {"caller_env": caller_env(), "user_config": user_config_path()}
