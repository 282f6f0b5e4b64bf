"""Outside review: what the sandbox sends the egress gate reaches no terminal as control
characters.

A sandbox chooses the names its connections carry (SNI, the Host header, DNS names). The
gate logs them, and `format_entry` printed them raw: in a one-shot run's refusals on
stderr, in `agentkernel egress NAME log` (and `--audit`, read after the sandbox is gone),
in the MCP tool's lines. An ESC there set the viewer's terminal title, cleared the screen,
coloured the rest (OSC 52 would write the clipboard where a terminal allows it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentkernel.egress_gate import format_entry
from sandbox_helpers import backend_available

EVIL = "\x1b]0;PWNED\x07\x1b[2J\x1b[31m\x9b1mevil.example"
ASCII_EVIL = EVIL.replace("\x9b", "")  # (what an HTTP head may carry)


def test_a_log_line_is_printable_whatever_the_sandbox_sent() -> None:
    for doc in ({"t": 0, "kind": "http", "host": EVIL, "port": 80, "allowed": False,
                 "rule": f"malformed name {EVIL!r}"},
                {"t": 0, "kind": "dns", "host": EVIL, "allowed": True, "rule": "default",
                 "answers": ["1.2.3.4"]},
                {"note": EVIL},
                {"t": 0, "kind": "tls", "addr": "1.2.3.4", "port": 443, "allowed": False,
                 "rule": "x", "error": EVIL}):
        line = format_entry(doc)
        assert line.isprintable(), repr(line)
        assert "\\x1b]0;PWNED\\x07" in line, line
    plain = {"t": 0, "kind": "dns", "host": "ok.example", "allowed": True, "rule": "default"}
    assert format_entry(plain).endswith("dns ok.example allowed by default")


@pytest.mark.skipif(os.geteuid() != 0 or not backend_available("namespaces"),
                    reason="gates drop ids only as root")
def test_a_one_shot_runs_refusals_carry_no_escape(tmp_path: Path) -> None:
    """A real sandbox sends a Host header with escapes to a name the policy denies."""
    probe = ("import socket\n"
             "s = socket.create_connection(('93.184.215.14', 80), timeout=10)\n"
             f"s.sendall(b'GET / HTTP/1.1\\r\\nHost: ' + {ASCII_EVIL.encode()!r} + "
             "b'\\r\\n\\r\\n')\n"
             "try:\n    s.recv(10)\nexcept OSError:\n    pass\nprint('sent')\n")
    env = {**os.environ, "AGENTKERNEL_NO_DAEMON": "1"}
    r = subprocess.run([sys.executable, "-P", "-m", "agentkernel", "run", "--backend",
                        "namespaces", "--deny-host", "*.example", "--", "python3", "-c", probe],
                       cwd=tmp_path, env=env, capture_output=True, timeout=120,
                       stdin=subprocess.DEVNULL, check=False)
    assert b"sent" in r.stdout, r
    refusals = [line for line in r.stderr.splitlines() if line.startswith(b"agentkernel: egress")]
    assert refusals and all(b"evil.example" in line for line in refusals), r.stderr
    assert not any(c in r.stderr for c in (b"\x1b", b"\x07", b"\xc2\x9b")), r.stderr
