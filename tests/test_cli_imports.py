"""What a one-shot `agentkernel run` (no daemon) loads into the CLI process: not the egress
proxy's asyncio, ssl and logging, which belong to the gate's own process, nor hashlib
(OpenSSL) for a run that talks to no registry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentkernel import __version__
from sandbox_helpers import backend_available

LAUNCHER = Path(__file__).resolve().parents[1] / "bin" / "agentkernel"
# The gate's (egress_proxy's) imports: ~15 ms of a cold run when the CLI loaded them.
GATE_ONLY = {"asyncio", "ssl", "logging", "concurrent.futures", "agentkernel.egress_proxy"}
NO_REGISTRY = {"hashlib", "_hashlib", "base64"}  # images.registry is loaded, not used


def loaded_modules(stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines()
            if line.startswith("import time:")}


@pytest.mark.skipif(not backend_available("namespaces"), reason="needs bwrap")
def test_cold_run_with_a_gate_leaves_the_proxy_to_the_gate(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir(mode=0o700)
    env = {**os.environ, "AGENTKERNEL_HOME": str(tmp_path / "home"),
           "AGENTKERNEL_RUNTIME_DIR": str(tmp_path / "run"), "AGENTKERNEL_NO_DAEMON": "1"}
    # moderate: network through an egress gate, whose rules the CLI writes itself.
    out = subprocess.run([sys.executable, "-X", "importtime", str(LAUNCHER), "run", "-q",
                          "-i", "host", "-B", "namespaces", "-p", "moderate", "--",
                          "sh", "-c", "echo ran; exit 4"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 4, out.stderr[-2000:]
    assert out.stdout == "ran\n"
    loaded = loaded_modules(out.stderr)
    assert "agentkernel.egress_gate" in loaded  # the case this test is about: a gate ran
    assert not loaded & (GATE_ONLY | NO_REGISTRY), sorted(loaded & (GATE_ONLY | NO_REGISTRY))


def exit_with_in(code: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    (tmp / "run").mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "AGENTKERNEL_HOME": str(tmp / "home"),
           "AGENTKERNEL_RUNTIME_DIR": str(tmp / "run")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=60, check=False)


def test_exit_with_skips_teardown_only_when_nothing_needs_it(tmp_path: Path) -> None:
    """cli.exit_with: buffered output survives os._exit; an atexit hook, a live thread or a
    server command (the daemon) get the interpreter's normal exit, hooks run."""
    prelude = "import sys; from agentkernel import cli; cli.main(['--version']); "
    fast = exit_with_in(prelude + "sys.stdout.write('x' * 100000); cli.exit_with(3)",
                        tmp_path)
    assert fast.returncode == 3
    assert fast.stdout.endswith("x" * 100000)
    hooked = exit_with_in(prelude + "import atexit; atexit.register(print, 'hook ran'); "
                          "cli.exit_with(4)", tmp_path)
    assert (hooked.returncode, hooked.stdout.splitlines()[-1]) == (4, "hook ran")
    threaded = exit_with_in(prelude + "import threading, time; threading.Thread(target="
                            "lambda: (time.sleep(0.3), print('thread done'))).start(); "
                            "cli.exit_with(5)", tmp_path)
    assert (threaded.returncode, threaded.stdout.splitlines()[-1]) == (5, "thread done")
    # A server's command (here `daemon status`): the normal exit, whose teardown a
    # __del__ at exit shows.
    server = exit_with_in("from agentkernel import cli\n"
                          "class T:\n    def __del__(self): print('torn down')\n"
                          "t = T(); cli.exit_with(cli.main(['daemon', 'status']) + 10)",
                          tmp_path)
    assert server.stdout.endswith("torn down\n"), server.stdout
    # The same for a short-lived command: no teardown, so no __del__.
    short = exit_with_in("from agentkernel import cli\n"
                         "class T:\n    def __del__(self): print('torn down')\n"
                         "t = T(); cli.exit_with(cli.main(['--version']))", tmp_path)
    assert (short.returncode, short.stdout) == (0, f"agentkernel {__version__}\n")
