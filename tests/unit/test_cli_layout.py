"""The CLI is one module per command: every command (and alias) the parser knows reaches a
handler, and each handler lives in agentkernel.cli (no root, no daemon, milliseconds)."""

from __future__ import annotations

import argparse

from agentkernel.cli import build_parser


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_command_has_a_handler_in_the_cli_package() -> None:
    commands = _commands()
    assert {"run", "exec", "create", "daemon", "serve", "images", "config", "init", "doctor",
            "setup", "agents", "plugin", "mcp-server", "ls", "rm"} <= set(commands)
    for name, parser in commands.items():
        handler = parser.get_default("handler")
        assert callable(handler), f"`{name}` has no handler"
        assert handler.__module__.startswith("agentkernel.cli."), (name, handler.__module__)


def test_a_command_line_reaches_its_module() -> None:
    parser = build_parser()
    for argv, module in ((["run", "--", "true"], "run"), (["exec", "box", "true"], "sandboxes"),
                         (["daemon", "status"], "daemon"), (["images", "ls"], "images"),
                         (["mcp-server"], "agents"), (["plugin", "list"], "agents"),
                         (["setup", "--microvm"], "doctor"), (["init"], "config")):
        assert parser.parse_args(argv).handler.__module__ == f"agentkernel.cli.{module}", argv
