"""AI coding agents as data: the registry, what is installed and signed in, npm installs."""

import sys

# Variables of the caller's terminal an agent gets (`run --agent`); here, with
# `interactive`, for the CLI's import-light path through the daemon.
TERMINAL_ENV = ("TERM", "COLORTERM", "LANG")


def interactive() -> bool:
    """Both stdin and stdout are terminals: `run --agent` gives the agent a PTY."""
    return sys.stdin is not None and sys.stdin.isatty() and sys.stdout.isatty()
