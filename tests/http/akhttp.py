"""Helpers of the HTTP API tests (paths, the API key, running SDK driver scripts)."""

from __future__ import annotations

import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

from agentkernel.http.serve import RunningServer

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SDK_VENV = ROOT / ".cache" / "sdk-venv"
NODE_SDK = ROOT / ".cache" / "node-sdk" / "node_modules" / "agentkernel"
API_KEY = "test-key-" + secrets.token_hex(8)


@dataclass
class Sdks:
    python: Path
    node_sdk: Path


def client_env(srv: RunningServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "AGENTKERNEL"))}
    env.update(AGENTKERNEL_BASE_URL=srv.url, AGENTKERNEL_API_KEY=API_KEY)
    return env


def run_driver(argv: list[str], srv: RunningServer, extra: dict[str, str] | None = None,
               timeout: float = 180) -> str:
    env = client_env(srv) | (extra or {})
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout,
                          check=False, cwd=HERE)
    assert proc.returncode == 0, f"{' '.join(argv)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def prefix() -> str:
    return "t" + secrets.token_hex(3)
