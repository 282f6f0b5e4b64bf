"""The engine: run a planned command in-process — start its sandbox, stream its output live,
forward signals and stdin, and map how it ended (planner.outcome)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO

from .errors import ProtocolError
from .planner import Outcome, Plan, outcome

if TYPE_CHECKING:
    from .agent.client import Execution, ExitStatus
    from .sandbox import Sandbox

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def execute(
    plan_: Plan,
    *,
    timeout: float | None,
    stdout: BinaryIO,
    stderr: BinaryIO,
    stdin: BinaryIO | None = None,
    on_started: Callable[[Sandbox], None] | None = None,
    name: str | None = None,
) -> tuple[Sandbox, Outcome]:
    """Start the plan's sandbox, run its command, stream the output live; the caller
    destroys the sandbox."""
    name = name or f"run-{os.urandom(4).hex()}"
    with _exit_on_terminate():
        sandbox = plan_.backend.start(plan_.spec(name))
        try:
            if plan_.home_files:  # run --agent --settings
                from .agents.settings import write_into

                write_into(sandbox.client, plan_.home_files)
            if on_started is not None:
                on_started(sandbox)
            result = _run_in(sandbox, plan_, timeout=timeout, stdout=stdout, stderr=stderr,
                             stdin=stdin)
        except BaseException:
            sandbox.destroy()
            raise
    return sandbox, result


@contextlib.contextmanager
def _exit_on_terminate():  # type: ignore[no-untyped-def]
    """Until the command runs (its own forwarding takes over then), SIGTERM or SIGHUP ends
    us through an exception, so the half-started sandbox is cleaned up: the default action
    would leave it running, holding our caller's pipes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signo: int, _frame: object) -> None:
        raise SystemExit(128 + signo)

    previous = {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_in(
    sandbox: Sandbox, plan_: Plan, *, timeout: float | None,
    stdout: BinaryIO, stderr: BinaryIO, stdin: BinaryIO | None,
) -> Outcome:
    execution = sandbox.client.exec(
        plan_.argv, env=plan_.env(sandbox.spec.name), cwd=plan_.cwd, timeout=timeout,
        stdin=stdin is not None, rlimits=sandbox.command_rlimits(),
    )
    mem = sandbox.spec.profile.memory_mb
    if stdin is not None:
        threading.Thread(target=_pump_stdin, args=(stdin, execution), daemon=True).start()
    with _forward_signals(execution.signal):
        try:
            status = _stream(execution, stdout, stderr)
        except ProtocolError:
            # The whole sandbox died under the command (gVisor's sentry is OOM-killed with
            # the app inside it): say why rather than blaming the protocol.
            if sandbox.oom_killed():
                return outcome(None, oom=sandbox.oom_killed, memory_mb=mem)
            raise
    return outcome(status, timeout=timeout, oom=sandbox.oom_killed, memory_mb=mem)


def _stream(execution: Execution, stdout: BinaryIO, stderr: BinaryIO) -> ExitStatus:
    """Copy the command's output to ours as it comes; return how it ended."""
    for kind, payload in execution.events():
        if isinstance(payload, bytes):
            target = stdout if kind == "stdout" else stderr
            target.write(payload)
            target.flush()
        else:
            return payload
    raise ProtocolError("the agent ended the command's events without an exit status")


def _pump_stdin(src: BinaryIO, execution: Execution) -> None:
    with contextlib.suppress(Exception):
        while True:
            chunk = src.read1(65536) if hasattr(src, "read1") else src.read(65536)
            if not chunk:
                break
            execution.write_stdin(chunk)
    with contextlib.suppress(Exception):
        execution.close_stdin()


@contextlib.contextmanager
def _forward_signals(send: Callable[[int], None]):  # type: ignore[no-untyped-def]
    """While a command runs, Ctrl-C and friends go to it, not to us."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in FORWARDED_SIGNALS:
        previous[sig] = signal.signal(sig, lambda signo, _frame: _safe(send, signo))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _safe(send: Callable[[int], None], signo: int) -> None:
    with contextlib.suppress(Exception):
        send(signo)


def default_stdio() -> tuple[BinaryIO, BinaryIO]:
    return sys.stdout.buffer, sys.stderr.buffer
