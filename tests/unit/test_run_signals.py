"""How an in-process run treats signals (engine): recorded, never raised at an arbitrary point;
forwarded to the command without a send inside a send."""

from __future__ import annotations

import signal
import threading

import pytest

from agentkernel import engine


def test_a_terminating_signal_is_recorded_not_raised_where_it_lands() -> None:
    """The signal's exception used to land anywhere, also between a `finally` and the
    `destroy` it leads to: the sandbox was left running. Now the run ends where it checks."""
    with engine.exit_on_terminate():
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)  # the second of a pair changes nothing
        assert engine.terminated() == signal.SIGTERM
        with pytest.raises(SystemExit) as ended:
            engine._end_if_terminated()
        assert ended.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_an_interruptible_wait_is_cut_short_once() -> None:
    with engine.exit_on_terminate():
        with pytest.raises(SystemExit) as ended, engine._interruptible():
            signal.raise_signal(signal.SIGHUP)
            for _ in range(1000):  # (the handler runs at the next bytecode boundary)
                pass
        assert ended.value.code == 128 + signal.SIGHUP
        signal.raise_signal(signal.SIGTERM)  # outside a wait: recorded only
        assert engine.terminated() == signal.SIGHUP


def test_nested_uses_share_one_record() -> None:
    with engine.exit_on_terminate():
        with engine.exit_on_terminate():
            signal.raise_signal(signal.SIGQUIT)
        assert engine.terminated() == signal.SIGQUIT  # the inner one did not own the handlers


def test_a_signal_inside_a_forwarded_send_goes_after_it() -> None:
    """A handler runs between any two bytecodes, also inside a forwarding send holding the
    channel's write lock: sending from there deadlocked the run (seen: two SIGTERMs 1 ms
    apart, as `timeout` sends them)."""
    lock = threading.Lock()
    sent: list[int] = []

    def send(signo: int) -> None:
        if not lock.acquire(timeout=5):
            raise AssertionError("a send inside a send waited on its own lock")
        try:
            if not sent:
                signal.raise_signal(signal.SIGHUP)  # its handler runs inside this send
                for _ in range(1000):
                    pass
            sent.append(signo)
        finally:
            lock.release()

    with engine.exit_on_terminate(), engine._forward_signals(send):
        signal.raise_signal(signal.SIGTERM)
        for _ in range(1000):
            pass
    assert sent == [signal.SIGTERM, signal.SIGHUP]


def test_a_signal_before_the_command_goes_to_it_when_it_starts() -> None:
    """...and then the command's own end says how the run ended (it may handle it)."""
    sent: list[int] = []
    with engine.exit_on_terminate():
        signal.raise_signal(signal.SIGINT)
        with engine._forward_signals(sent.append):
            pass
        assert engine.terminated() is None
    assert sent == [signal.SIGINT]
