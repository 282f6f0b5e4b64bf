"""The native `agentkernel` command (launcher/) for tests: built once, run beside the Python CLI."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

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
