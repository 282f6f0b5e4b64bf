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
from .signals import handlers_swapped

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
    from .sandbox import signals_deferred

    name = name or f"run-{os.urandom(4).hex()}"
    sandbox: Sandbox | None = None
    with exit_on_terminate():
        try:
            # A start cut short at an arbitrary point (inside a fork, between a child's
            # start and its record) can leave a process no cleanup knows of: a signal
            # waits until the start is done or failed (each bounded by its timeouts),
            # then ends the run through the cleanup.
            with signals_deferred():
                sandbox = plan_.backend.start(plan_.spec(name))
            if on_started is not None:
                on_started(sandbox)
            _end_if_terminated()
            if plan_.home_files:  # run --agent --settings
                from .agents.settings import write_into

                write_into(sandbox.client, plan_.home_files)
            result = _run_in(sandbox, plan_, timeout=timeout, stdout=stdout, stderr=stderr,
                             stdin=stdin)
        except BaseException:
            if sandbox is not None:
                sandbox.destroy()
            raise
    return sandbox, result


# How a terminating signal ends an in-process run (main thread only). It never raises at an
# arbitrary point: an exception landing between an `except` or `finally` and the cleanup it
# leads to (before `destroy` defers signals) would leave the sandbox running, and signals
# come in pairs (`timeout`, a terminal and systemd signal the run and then its process
# group). The handler records the signal; the run ends at the points that check the record
# (before the command starts, after the cleanup) or, once, inside a wait marked
# interruptible, whose exception the caller's cleanup already encloses. While the command
# runs, signals are forwarded to it instead (`_forward_signals`).
TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGINT)
_ENDING: list[int] = []  # the first terminating signal that came, if one did
_WAITING: list[bool] = []  # non-empty inside an interruptible wait


def _on_terminate(signo: int, _frame: object) -> None:
    if not _ENDING:
        _ENDING.append(signo)
    if _WAITING:
        _WAITING.clear()  # once: the exit it starts must not be cut short by another
        raise SystemExit(128 + signo)


@contextlib.contextmanager
def exit_on_terminate():  # type: ignore[no-untyped-def]
    """While a sandbox of ours lives and its command does not run (its own forwarding
    takes over then), SIGTERM, SIGHUP, SIGQUIT and SIGINT end the run through its cleanup
    (see above) instead of killing us: the default action would leave the sandbox running,
    holding our caller's pipes. The outermost use owns the handlers."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is _on_terminate):
        yield
        return
    _ENDING.clear()
    _WAITING.clear()
    with handlers_swapped(TERMINATING_SIGNALS, _on_terminate):
        yield


def terminated() -> int | None:
    """The terminating signal that came during `exit_on_terminate`, if one did."""
    return _ENDING[0] if _ENDING else None


def _end_if_terminated() -> None:
    if _ENDING:
        raise SystemExit(128 + _ENDING[0])


@contextlib.contextmanager
def _interruptible():  # type: ignore[no-untyped-def]
    """A wait a terminating signal may cut short (once): the caller's cleanup encloses it."""
    _end_if_terminated()
    _WAITING.append(True)
    try:
        yield
    finally:
        _WAITING.clear()


def _run_in(
    sandbox: Sandbox, plan_: Plan, *, timeout: float | None,
    stdout: BinaryIO, stderr: BinaryIO, stdin: BinaryIO | None,
) -> Outcome:
    with _interruptible():  # (the agent's reply to a start is prompt, but not bounded)
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
    # The descriptor itself where there is one (nothing has read from it yet): this daemon
    # thread, blocked in a buffered read of a stdin that stays open, held that object's
    # lock, and the interpreter's shutdown waited for it and aborted (exit 134, not the
    # command's code).
    try:
        fd = src.fileno()
    except (AttributeError, OSError, ValueError):
        fd = -1
    with contextlib.suppress(Exception):
        while True:
            if fd >= 0:
                chunk = os.read(fd, 65536)
            else:
                chunk = src.read1(65536) if hasattr(src, "read1") else src.read(65536)
            if not chunk:
                break
            execution.write_stdin(chunk)
    with contextlib.suppress(Exception):
        execution.close_stdin()


@contextlib.contextmanager
def _forward_signals(send: Callable[[int], None]):  # type: ignore[no-untyped-def]
    """While a command runs, Ctrl-C and friends go to it, not to us; one that came since
    its sandbox started goes to it first."""
    pending: list[int] = []
    sending: list[bool] = []

    def forward(signo: int, _frame: object) -> None:
        # A handler runs between any two bytecodes of the main thread, also inside a send
        # of its own (which holds the channel's write lock): that one sends it on instead.
        pending.append(signo)
        while pending and not sending:
            sending.append(True)
            try:
                while pending:
                    _safe(send, pending.pop(0))
            finally:
                sending.clear()

    with handlers_swapped(FORWARDED_SIGNALS, forward) as swapped:
        if swapped and _ENDING:  # delivered to the command now: its own end says how
            forward(_ENDING.pop(), None)  # the run ended
        yield


def _safe(send: Callable[[int], None], signo: int) -> None:
    with contextlib.suppress(Exception):
        send(signo)


def default_stdio() -> tuple[BinaryIO, BinaryIO]:
    return sys.stdout.buffer, sys.stderr.buffer
