"""Unit tier for http.connections.PeerWarnings: the protocol's warnings about clients'
requests are bounded per minute, not silenced for the process's life."""

from __future__ import annotations

import logging

from agentkernel.http import connections


def _record() -> logging.LogRecord:
    return logging.LogRecord("uvicorn.error", logging.WARNING,
                             "/x/uvicorn/protocols/http/h11_impl.py", 1,
                             "Invalid HTTP request received.", (), None)


def test_a_burst_is_cut_and_the_next_minute_logs_again_with_the_count() -> None:
    f = connections.PeerWarnings()
    kept = [f.filter(_record()) for _ in range(connections.PEER_WARNINGS + 10)]
    assert sum(kept) == connections.PEER_WARNINGS + 1  # the last one says the rest go
    assert f.dropped == 9
    f.since -= connections.PEER_WINDOW  # a minute later
    later = _record()
    assert f.filter(later)
    assert later.getMessage().startswith("9 more warnings"), later.getMessage()
    assert "Invalid HTTP request received." in later.getMessage()


def test_the_servers_own_warnings_are_kept() -> None:
    f = connections.PeerWarnings()
    own = logging.LogRecord("uvicorn.error", logging.WARNING, "/x/uvicorn/server.py", 1,
                            "shutting down", (), None)
    for _ in range(connections.PEER_WARNINGS * 2):
        assert f.filter(own)
