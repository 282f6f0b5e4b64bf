"""planner.outcome: the one mapping of how a command ended to our exit code and message."""

from __future__ import annotations

import signal

import pytest

from agentkernel.agent.client import ExitStatus
from agentkernel.planner import EXIT_OOM, EXIT_TIMEOUT, Outcome, failed_start, outcome


def test_exit_code_passes_through() -> None:
    assert outcome(ExitStatus(code=3, signal=None)) == Outcome(3)
    assert outcome(ExitStatus(code=0, signal=None), oom=lambda: True) == Outcome(0)


def test_signal_is_128_plus_n() -> None:
    got = outcome(ExitStatus(code=None, signal=signal.SIGTERM))
    assert got == Outcome(128 + signal.SIGTERM, signal.SIGTERM)


def test_sigkill_without_oom_is_137_and_says_nothing() -> None:
    got = outcome(ExitStatus(code=None, signal=signal.SIGKILL), oom=lambda: False)
    assert got == Outcome(137, signal.SIGKILL)


def test_timeout_is_124_with_its_message() -> None:
    got = outcome(ExitStatus(code=None, signal=signal.SIGKILL, timed_out=True), timeout=1.5)
    assert got.exit_code == EXIT_TIMEOUT and got.timed_out and not got.oom_killed
    assert got.message == "command timed out after 1.5s and was killed"


def test_timeout_wins_over_an_oom_check() -> None:
    """A command killed for its timeout is not blamed on memory."""
    got = outcome(ExitStatus(code=None, signal=signal.SIGKILL, timed_out=True), timeout=2,
                  oom=lambda: True, memory_mb=64)
    assert got.exit_code == EXIT_TIMEOUT


def test_oom_kill_of_the_command() -> None:
    got = outcome(ExitStatus(code=None, signal=signal.SIGKILL), oom=lambda: True, memory_mb=64)
    assert got == Outcome(EXIT_OOM, signal.SIGKILL, oom_killed=True,
                          message="command killed: out of memory (limit 64 MiB)")


def test_a_dead_sandbox_is_an_outcome_only_when_oom_killed() -> None:
    got = outcome(None, oom=lambda: True, memory_mb=32)
    assert got.exit_code == 137 and got.oom_killed
    assert got.message == "sandbox killed: out of memory (limit 32 MiB)"
    with pytest.raises(ValueError):
        outcome(None, oom=lambda: False)


@pytest.mark.parametrize(("code", "want"), [(127, 127), (126, 126), (1, 126), (125, 126)])
def test_a_command_that_could_not_start(code: int, want: int) -> None:
    assert failed_start(code, "nope: command not found") == Outcome(
        want, message="nope: command not found")


def test_the_daemon_and_the_engine_use_this_mapping() -> None:
    """Both paths turn an ExitStatus into a result through planner.outcome."""
    from agentkernel.daemon.manager import ExecHandle

    handle = ExecHandle.__new__(ExecHandle)
    handle.timeout = 3.0
    handle._oom = lambda: True  # type: ignore[method-assign]
    handle._memory_mb = 100
    res = handle._result(ExitStatus(code=None, signal=signal.SIGKILL), b"o", b"e")
    want = outcome(ExitStatus(code=None, signal=signal.SIGKILL), oom=lambda: True,
                   memory_mb=100)
    assert (res.exit_code, res.signal, res.timed_out, res.oom_killed, res.message) == \
        (want.exit_code, want.signal, want.timed_out, want.oom_killed, want.message)
    assert (res.stdout, res.stderr) == (b"o", b"e")
