"""An interactive `run --agent` on a real PTY: raw terminal, keystrokes in, resizes passed on."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Iterator

    from ..agent.client import Execution
    from ..planner import RunRequest

READ_CHUNK = 16 * 1024


def _size() -> tuple[int, int]:
    cols, rows = shutil.get_terminal_size((80, 24))
    return max(1, rows), max(1, cols)


def _pump_keys(execution: Execution) -> None:
    """The terminal's bytes to the command until our stdin ends."""
    while True:
        try:
            data = os.read(0, READ_CHUNK)
        except OSError:
            data = b""
        if not data:
            with contextlib.suppress(OSError):
                execution.close_stdin()
            return
        try:
            execution.write_stdin(data)
        except OSError:
            return


@contextlib.contextmanager
def _raw_terminal() -> Iterator[None]:
    import termios
    import tty

    saved = termios.tcgetattr(0)
    tty.setraw(0)
    try:
        yield
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)


def run_on_pty(args: argparse.Namespace,
               run_request: Callable[[argparse.Namespace, list[str]], RunRequest]) -> int:
    """Plan and start the sandbox as `run` would (`run_request`: the CLI's flags to a
    request), run the agent on a PTY the size of ours, and return its exit code."""
    from ..planner import CallerContext, outcome, plan

    req = run_request(args, list(args.command))
    plan_ = plan(req, CallerContext.here(), quiet=args.quiet)
    for warning in plan_.warnings:
        if not args.quiet:
            print(f"agentkernel: warning: {warning}", file=sys.stderr)
    sandbox = plan_.backend.start(plan_.spec(f"agent-{os.urandom(4).hex()}"))
    try:
        if plan_.home_files:  # --settings
            from .settings import write_into

            write_into(sandbox.client, plan_.home_files)
        execution = sandbox.client.exec(plan_.argv, env=plan_.env(sandbox.spec.name),
                                        cwd=plan_.cwd, stdin=True, pty=_size(),
                                        rlimits=sandbox.command_rlimits())
        previous = signal.signal(signal.SIGWINCH,
                                 lambda *_: execution.resize(*_size()))
        try:
            with _raw_terminal():
                threading.Thread(target=_pump_keys, args=(execution,), daemon=True).start()
                out = sys.stdout.buffer
                for _kind, payload in execution.events():
                    if isinstance(payload, bytes):
                        out.write(payload)
                        out.flush()
        finally:
            signal.signal(signal.SIGWINCH, previous)
        assert execution.status is not None
        result = outcome(execution.status, oom=sandbox.oom_killed,
                         memory_mb=plan_.profile.memory_mb)
    finally:
        sandbox.destroy()
    if result.message and not args.quiet:
        print(f"agentkernel: {result.message}", file=sys.stderr)
    return result.exit_code
