"""egress_forkserver._room: a daemon keeps dups of each registration's fds only while
that leaves half its fd limit free; far from that line it does not list /proc/self/fd
for every sandbox, near it (and after FD_RECOUNT) it counts again."""

from __future__ import annotations

import math
import os
import resource
from collections.abc import Iterator

import pytest

from agentkernel import egress_forkserver as fs


@pytest.fixture(autouse=True)
def fresh_count() -> Iterator[None]:
    fs._fds_counted[:] = [-math.inf, 0.0]
    yield
    fs._fds_counted[:] = [-math.inf, 0.0]


def _counting(monkeypatch: pytest.MonkeyPatch, opened: int, held: list[int] | None = None
              ) -> list[int]:
    """/proc/self/fd listings say `opened` fds (plus held[0]); returns the listings made."""
    calls: list[int] = []
    real = os.listdir

    def listdir(path: str) -> list[str]:
        if path == "/proc/self/fd":
            calls.append(1)
            return [str(i) for i in range(opened + (held[0] if held else 0))]
        return real(path)

    monkeypatch.setattr(fs.os, "listdir", listdir)
    return calls


def _limit(monkeypatch: pytest.MonkeyPatch, soft: int) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (soft, soft))


def test_far_from_the_line_one_count_serves_many_registrations(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _limit(monkeypatch, 4096)
    calls = _counting(monkeypatch, 100)
    assert all(fs._room(11) for _ in range(20))
    assert len(calls) == 1
    assert fs._fds_counted[1] == 100 + 20 * 11  # what was held since is counted in


def test_near_the_line_each_call_counts_and_refuses_past_half(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _limit(monkeypatch, 1024)
    calls = _counting(monkeypatch, 300)  # over a quarter: counted every time
    assert fs._room(11) and fs._room(11)
    assert len(calls) == 2
    calls = _counting(monkeypatch, 510)
    assert not fs._room(11)  # 510 + 11 > 512: no more dups held


def test_an_old_count_is_redone(monkeypatch: pytest.MonkeyPatch) -> None:
    _limit(monkeypatch, 4096)
    calls = _counting(monkeypatch, 10)
    assert fs._room(11)
    fs._fds_counted[0] -= fs.FD_RECOUNT + 0.1
    assert fs._room(11)
    assert len(calls) == 2


def test_the_estimate_never_lets_the_real_count_pass_half(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """However many registrations come between counts, the estimate grows with each: it
    crosses the quarter line and the next call counts for real."""
    _limit(monkeypatch, 1024)
    held = [0]
    calls = _counting(monkeypatch, 100, held)
    while fs._room(11):
        held[0] += 11  # the caller holds them: the next listing sees them
        assert 100 + held[0] <= 1024 // 2
    assert len(calls) > 1
