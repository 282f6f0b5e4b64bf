"""The native `agentkernel` command (launcher/) for tests: built once, run beside the Python CLI."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PY_CLI = [sys.executable, str(ROOT / "bin" / "agentkernel")]  # the Python launcher as installed
NO_PYTHON = "/nonexistent/agentkernel-test-python"  # a fallback that fails: proves no Python ran


def native_binary() -> Path:
    """launcher/build/agentkernel, built now if needed (skips where no C compiler exists)."""
    if shutil.which("make") is None or shutil.which("gcc") is None:
        pytest.skip("the native CLI needs make and a C compiler")
    subprocess.run(["make", "-s", "-C", str(ROOT / "launcher"), f"PYTHON={sys.executable}"],
                   check=True, capture_output=True, timeout=300)
    return ROOT / "launcher" / "build" / "agentkernel"


@dataclass
class Out:
    code: int
    out: bytes
    err: str


def run_cli(argv: list[str], env: dict[str, str], cwd: Path, stdin: bytes | None = None,
            timeout: float = 60) -> Out:
    proc = subprocess.run(argv, env=env, cwd=cwd, input=stdin, capture_output=True,
                          timeout=timeout, check=False,
                          stdin=None if stdin is not None else subprocess.DEVNULL)
    return Out(proc.returncode, proc.stdout, proc.stderr.decode(errors="replace"))


def both(native: Path, args: list[str], env: dict[str, str], cwd: Path,
         stdin: bytes | None = None, handled: bool = True) -> tuple[Out, Out]:
    """The same command line through the Python CLI and the native one. `handled`: the
    native one must not start Python (its fallback is pointed at nothing), else it falls
    back to this suite's Python."""
    py = run_cli([*PY_CLI, *args], env, cwd, stdin)
    nenv = {**env, "AGENTKERNEL_PYTHON": NO_PYTHON if handled else sys.executable}
    nat = run_cli([str(native), *args], nenv, cwd, stdin)
    return py, nat


_SANDBOX = re.compile(r"\b(pool|run)-[0-9a-f]{8,12}\b")
_HOW = re.compile(r"via daemon \((warm pool|cold start, the pool was empty)\)")


def normalized(text: str) -> str:
    """Output with what differs from run to run (sandbox names, warm or cold) masked."""
    return _HOW.sub("via daemon (HOW)", _SANDBOX.sub(r"\1-X", text))


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AGENTKERNEL_") and k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, **extra}


def on_a_terminal(argv: list[str], env: dict[str, str],
                  cwd: Path) -> tuple[int, bytes, list[Any]]:
    """argv with stdin, stdout and stderr on a new pty (40x100, then 50x120 and SIGWINCH
    once its output is there): its exit code, what the terminal showed, and the terminal's
    modes before and after."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=slave, stdout=slave, stderr=slave)
    seen = b""
    resized = False
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                seen += os.read(master, 65536)
            except OSError:
                break
        if not resized and b"more\n" in seen:
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 120, 0, 0))
            proc.send_signal(signal.SIGWINCH)
            resized = True
        if proc.poll() is not None and not ready:
            break
    code = proc.wait(timeout=10)
    after = termios.tcgetattr(slave)
    os.close(master)
    os.close(slave)
    return code, seen, [before, after]
