"""A started sandbox: the agent channel plus everything that must be cleaned up after it."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .profiles import Profile
from .rootfs import HostRootfs

if TYPE_CHECKING:
    from .agent.client import AgentClient
    from .cgroups import Cgroup


@dataclass
class SandboxSpec:
    """What to build: independent of the backend that builds it."""

    name: str
    profile: Profile
    rootfs: HostRootfs
    image: str  # the image the command asked for (reported; `host` rootfs serves it for now)
    workspace: Path | None = None  # host project dir shown at /workspace
    home: Path | None = None  # host $HOME, shown read-only at /home/user when allowed
    hostname: str = "agentkernel"
    persistent: bool = False  # survive the process that started it
    # Persistent sandboxes only: host dir that holds their writable layers, so that they
    # survive a stop/start (namespaces backend; see daemon/manager.py).
    state_dir: Path | None = None


@dataclass
class Sandbox:
    """A running sandbox. `destroy()` is idempotent and leaves nothing behind."""

    spec: SandboxSpec
    backend: str
    isolation: str
    client: AgentClient
    process: subprocess.Popen[bytes]
    scratch: Path
    cgroup: Cgroup | None = None
    helpers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. "cgroups unavailable: rlimits only"
    _destroyed: bool = False

    def oom_killed(self) -> bool:
        return self.cgroup is not None and self.cgroup.oom_killed()

    def destroy(self) -> None:
        if self._destroyed:
            return
        self._destroyed = True
        with contextlib.suppress(Exception):
            if self.client.alive:
                self.client.shutdown()
        self.client.close()
        _stop(self.process)
        if self.cgroup is not None:
            # Anything that slipped out of the sandbox's own process tree dies here.
            self.cgroup.destroy()
        for helper in self.helpers:
            # Helpers (slirp4netns, netns holders) never exit by themselves.
            _stop(helper, grace=0)
        for cleanup in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                cleanup()
        shutil.rmtree(self.scratch, ignore_errors=True)


def _stop(proc: subprocess.Popen[bytes], grace: float = 1.0) -> None:
    """Wait briefly for a process to exit by itself, then kill it."""
    deadline = time.monotonic() + grace
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
