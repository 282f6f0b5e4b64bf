"""ipc/wire.py speaks exactly the JSON the daemon's `json` does, on CPython's C parts."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from agentkernel.ipc import wire

VALUES = [
    {"op": "run", "args": {"argv": ["sh", "-c", "echo 'é' \"q\" \\\\ \t\n"], "env": {},
                           "timeout": 1.5, "keep": False, "cwd": None, "n": -42}},
    {"ev": "out", "s": 1, "d": bytes(range(256)).decode("latin-1")},
    ["\u2028", "\x00", "😀", [], {}, [[1, 2.25e-10], {"a": None}]],
    1e308, -0.0, 0, True, None, "",
]


@pytest.mark.parametrize("value", VALUES)
def test_same_text_and_values_as_json(value: object) -> None:
    text = wire.dumps(value)
    assert text == json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    assert wire.loads(text) == value == json.loads(text)
    assert wire.loads(text.encode() + b"\n") == value


def test_constants_and_errors() -> None:
    assert math.isnan(wire.loads("NaN")) and wire.loads("-Infinity") == float("-inf")
    for bad in ("", "{", '{"a": 1} x', "[1,]", "\"\x01\"", "nul"):
        with pytest.raises(ValueError):
            wire.loads(bad)
    with pytest.raises(TypeError, match="not JSON serializable"):
        wire.dumps({"b": b"bytes"})


def test_no_json_socket_or_signal_module_on_the_hot_path() -> None:
    """What the CLI imports for `run`/`exec` through the daemon (the point of wire.py)."""
    code = ("import sys; from agentkernel.cli import fast, sandboxes; "
            "from agentkernel.ipc import client; "
            "print(sorted(m for m in ('json', 'socket', 'signal', 're', 'enum', 'typing') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]", out
