"""An unknown option of a subcommand is reported by that subcommand, with its usage (exit
code 2): `run --bogus` showed the top level's usage. The same through the Python CLI and
the native command (which hands what it does not know to the Python CLI), with and without
a daemon socket (the fast path of `run`/`exec` parses without argparse when one exists)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from native_cli_helpers import PY_CLI, native_binary

TOP_USAGE = "usage: agentkernel [-h]"
CASES = [
    (["run", "--bogus"], "run"),
    (["run", "-B", "namespaces", "--bogus", "--", "true"], "run"),
    (["run", "--agent", "claude-code", "--bogus"], "run"),
    (["exec", "--bogus", "box", "--", "id"], "exec"),
    (["exec", "box", "--bogus", "--", "id"], "exec"),  # after NAME: exec's late options
    (["exec", "box", "-e", "A=1", "--bogus", "--", "id"], "exec"),
    (["list", "--bogus"], "list"),
    (["daemon", "start", "--bogus"], "daemon start"),
    (["images", "pull", "--bogus", "alpine"], "images pull"),
    (["egress", "box", "show", "--bogus"], "egress"),
]


@pytest.fixture(params=["no-daemon", "daemon-socket"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    listener = None
    if request.param == "daemon-socket":  # never answers: nothing may be sent to it
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(run / "daemon.sock"))
        listener.listen(4)
    yield {**os.environ, "AGENTKERNEL_RUNTIME_DIR": str(run),
           "AGENTKERNEL_HOME": str(tmp_path / "home"), "AGENTKERNEL_DAEMON_AUTOSTART": "0",
           "AGENTKERNEL_PYTHON": sys.executable}
    if listener is not None:
        listener.close()


@pytest.mark.parametrize(("argv", "command"), CASES, ids=[" ".join(c[0]) for c in CASES])
@pytest.mark.parametrize("front", ["python", "native"])
def test_an_unknown_option_shows_its_commands_usage(env: dict[str, str], argv: list[str],
                                                   command: str, front: str) -> None:
    entry = PY_CLI if front == "python" else [str(native_binary())]
    r = subprocess.run([*entry, *argv], env=env, capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL, check=False)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert f"usage: agentkernel {command} " in r.stderr, r.stderr
    assert f"agentkernel {command}: error: unrecognized arguments: --bogus" in r.stderr, r.stderr
    assert TOP_USAGE not in r.stderr, r.stderr


def test_an_unknown_option_before_the_command_is_the_top_levels() -> None:
    r = subprocess.run([*PY_CLI, "--bogus", "list"], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 2
    assert TOP_USAGE in r.stderr and "agentkernel: error: unrecognized arguments: --bogus" \
        in r.stderr, r.stderr
