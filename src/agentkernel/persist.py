"""Sandboxes kept after `run --keep`: their record on disk, listing and removal."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any

from .errors import NotFound
from .names import validate_sandbox_name
from .paths import runtime_dir
from .sandbox import Sandbox

RECORD = "sandbox.json"
CONTROL_SOCKET = "ctl/agent.sock"


def _dir(name: str) -> Path:
    validate_sandbox_name(name)  # before any path is built from it
    return runtime_dir() / "sandboxes" / name


def record_kept(sandbox: Sandbox) -> None:
    """Write what `remove` needs to find and tear down the sandbox later."""
    record = {
        "name": sandbox.spec.name, "backend": sandbox.backend, "isolation": sandbox.isolation,
        "image": sandbox.spec.image, "profile": sandbox.spec.profile.name,
        "pid": sandbox.process.pid, "helpers": [h.pid for h in sandbox.helpers],
        "created": time.time(), "cgroup": sandbox.cgroup is not None,
    }
    tmp = sandbox.scratch / (RECORD + ".tmp")
    tmp.write_text(json.dumps(record))
    tmp.rename(sandbox.scratch / RECORD)


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads((path / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _alive(record: dict[str, Any], scratch: Path) -> bool:
    sock = scratch / CONTROL_SOCKET
    if not sock.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(sock))
        except OSError:
            return False
    return True


def list_kept() -> list[dict[str, Any]]:
    base = runtime_dir() / "sandboxes"
    rows = []
    for path in sorted(base.iterdir()) if base.is_dir() else []:
        record = _load(path)
        if not record:
            continue
        record["status"] = "running" if _alive(record, path) else "dead"
        rows.append(record)
    return rows


def remove_kept(name: str) -> None:
    """Stop every process of the sandbox and delete all it left on the host."""
    scratch = _dir(name)
    record = _load(scratch)
    if not record:
        raise NotFound(f"sandbox {name!r} not found")
    sock = scratch / CONTROL_SOCKET
    if sock.exists():
        with contextlib.suppress(Exception):
            from .agent.client import AgentClient

            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5.0)
            s.connect(str(sock))
            client = AgentClient.from_socket(s)
            client.hello(timeout=5)
            client.shutdown()
            client.close()
    if record.get("cgroup"):
        from .cgroups import Cgroup

        with contextlib.suppress(Exception):
            Cgroup.open(name).destroy()
    for pid in [record.get("pid"), *record.get("helpers", [])]:
        if isinstance(pid, int) and _is_ours(pid, scratch):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if record.get("backend") == "gvisor":
        from .backends.gvisor import _force_delete, _runsc

        runsc = _runsc()
        if runsc:
            _force_delete(runsc, scratch, name)
    shutil.rmtree(scratch, ignore_errors=True)


def _is_ours(pid: int, scratch: Path) -> bool:
    """Only signal a pid whose command line still names this sandbox (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(scratch).encode() in cmdline or scratch.name.encode() in cmdline
