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
    from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from . import agents, config, daemon, doctor, egress, images, run, sandboxes

    parser = _parser_class()(
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


_USAGE_OF = "_usage_of"  # the namespace attribute naming the parser that had leftovers


def _parser_class() -> type[argparse.ArgumentParser]:
    """An ArgumentParser (and, through add_subparsers, every subcommand's) that remembers
    which parser was left with arguments it does not know: `run --bogus` is then reported
    with `run`'s usage, not the top level's (argparse hands a subcommand's leftovers up to
    the top, whose error shows its own usage)."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                             namespace: argparse.Namespace | None = None
                             ) -> tuple[argparse.Namespace, list[str]]:
            ns, extra = super().parse_known_args(args, namespace)
            if extra and getattr(ns, _USAGE_OF, None) is None:
                setattr(ns, _USAGE_OF, self)  # the innermost parser returns first
            return ns, extra

    return Parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """`argv` parsed; unknown arguments are reported by the (sub)command they were given
    to, with its usage (exit code 2)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        owner = getattr(args, _USAGE_OF, None) or parser
        owner.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


# Long-running commands: they may become the daemon or a server, whose teardown (stores,
# sockets, threads) is worth its cost; exit_with leaves it to the interpreter.
_SERVERS = frozenset({"daemon", "serve", "mcp-server"})
_teardown = True


def _absolute_path_only() -> None:
    """Drop PATH's relative entries (an empty one, `.`, `bin`) for this process and all it
    starts: each names the current directory, which is a project's, anyone's. A PATH of
    "$EXTRA:$PATH" with EXTRA unset has one, and then `./unshare`, `./nsenter`, `./ip`,
    `./runsc` from a cloned repository ran as the caller, root for root."""
    path = os.environ.get("PATH")
    if path is None:
        return
    parts = path.split(os.pathsep)
    kept = [d for d in parts if d.startswith("/")]
    if len(kept) != len(parts):
        os.environ["PATH"] = os.pathsep.join(kept) or os.defpath


def main(argv: list[str] | None = None) -> int:
    global _teardown
    _absolute_path_only()
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
    args = parse(argv)
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
    except BrokenPipeError:
        # The reader left (`agentkernel config --json | head`): end as a shell tool does,
        # quietly, and keep the exit's own flush of stdout from failing again.
        import contextlib  # only here: the hot path never imports it

        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # SIGPIPE


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
