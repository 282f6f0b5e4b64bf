"""The `agentkernel` command line: the entry point, the parser built from one module per
command (cli/<command>.py), and the one place errors become exit codes."""

from __future__ import annotations

import os
import sys

from .. import __version__
from ..errors import AgentKernelError

# The hot path (`run`/`exec` through the daemon) must not pay for argparse, typing or json.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse


def build_parser() -> argparse.ArgumentParser:
    import argparse

    from . import agents, config, daemon, doctor, egress, images, run, sandboxes

    parser = argparse.ArgumentParser(
        prog="agentkernel",
        description="Run AI coding agents and untrusted code in isolated sandboxes.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"agentkernel {__version__}")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    run.add_parser(sub)
    doctor.add_doctor_parser(sub)
    config.add_init_parser(sub)
    images.add_parser(sub)
    config.add_config_parser(sub)
    sandboxes.add_parsers(sub)
    egress.add_parsers(sub)
    daemon.add_daemon_parser(sub)
    daemon.add_serve_parser(sub)
    agents.add_parsers(sub)
    doctor.add_setup_parser(sub)
    return parser


# Long-running commands: they may become the daemon or a server, whose teardown (stores,
# sockets, threads) is worth its cost; exit_with leaves it to the interpreter.
_SERVERS = frozenset({"daemon", "serve", "mcp-server"})
_teardown = True


def main(argv: list[str] | None = None) -> int:
    global _teardown
    raw = sys.argv[1:] if argv is None else list(argv)
    _teardown = bool(raw[:1]) and raw[0] in _SERVERS
    if raw in (["--version"], ["-V"]):  # no parser needed
        print(f"agentkernel {__version__}")
        return 0
    if raw[:1] == ["run"] or raw[:1] == ["exec"]:
        # Plain `run`/`exec` through a running daemon: parsed without argparse.
        from .fast import fast_main

        code = fast_main(raw)
        if code is not None:
            return code
    args = build_parser().parse_args(argv)
    try:
        handler = getattr(args, "handler", None)
        if handler is None:
            build_parser().print_help()
            return 2
        return int(handler(args))
    except AgentKernelError as exc:
        print(f"agentkernel: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def exit_with(code: int) -> None:
    """Leave with `code`, skipping the interpreter's teardown when nothing needs it.

    Tearing down (module dicts, a last gc) costs a warm run a few ms of its ~30. It is
    skipped only for a short-lived command (not the daemon or a server), when no atexit
    hook is registered (logging, weakref.finalize, tempfile cleanups all register one) and
    no other thread runs; stdio is flushed first, and a flush that fails takes the normal
    exit so its error is reported as usual.
    """
    import atexit

    threading = sys.modules.get("threading")
    if not _teardown and atexit._ncallbacks() == 0 and \
            (threading is None or threading.active_count() == 1):
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):  # a closed pipe or file, or no stdio
            sys.exit(code)
        os._exit(code & 0xFF)  # what the OS keeps of sys.exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_with(main())
