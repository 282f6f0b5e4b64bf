"""A started sandbox: the agent channel plus everything that must be cleaned up after it."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from .profiles import Profile
from .rootfs import HostRootfs, Mask

if TYPE_CHECKING:
    from .agent.client import AgentClient
    from .cgroups import Cgroup
    from .egress_policy import Policy


class SandboxSpec(NamedTuple):
    """What to build: independent of the backend that builds it."""

    name: str
    profile: Profile
    rootfs: HostRootfs
    image: str  # the image the command asked for (reported; `host` rootfs serves it for now)
    workspace: Path | None = None  # host project dir shown at `workspace_at`
    home: Path | None = None  # host $HOME, shown read-only at /home/user when allowed
    hostname: str = "agentkernel"
    persistent: bool = False  # survive the process that started it
    # Persistent sandboxes only: host dir that holds their writable layers, so that they
    # survive a stop/start (namespaces backend; see daemon/manager.py).
    state_dir: Path | None = None
    # In-sandbox paths hidden by an empty mount: where the host's control plane (runtime and
    # data dirs) shows through a mounted host dir (controlplane.control_masks).
    masks: tuple[str, ...] = ()
    # Where the profile gives egress: what the sandbox may reach (egress_policy); None
    # there means the default (public addresses only).
    egress: Policy | None = None
    # Extra host dirs shown read-only: (host path, in-sandbox path), e.g. the install of
    # `run --agent`'s agent (namespaces and gVisor: agents/request.agent_backend).
    ro_binds: tuple[tuple[str, str], ...] = ()
    # Where the project is shown inside: /workspace, or (`run --agent`) its own host path,
    # checked by controlplane.workspace_target before the spec is made.
    workspace_at: str = "/workspace"
    # Commands run as (uid, gid) inside, with a HOME dir of theirs, instead of uid 0: an
    # AI agent's sandbox (agents/request.py). The project then shows as theirs (namespaces:
    # the caller's own files, as root through an id-mapped mount of that owner only).
    user: tuple[int, int, str] | None = None
    # Which life of the sandbox called `name` this is: a kept sandbox's id from creation to
    # removal (the daemon's uuid), "" for a one-shot run (its gate makes one). The egress
    # audit log keys entries by name and instance: a re-created sandbox of the same name
    # never sees its predecessor's.
    instance: str = ""
    # The root filesystem's masks with its private dirs' entries found already (a daemon's
    # walk, kept current by rootfs_watch) for a one-shot sandbox, whose view of them is
    # the host's; None: the backend has them found as it starts (the agent's walk).
    found_masks: tuple[Mask, ...] | None = None


class Sandbox:
    """A running sandbox. `destroy()` is idempotent and leaves nothing behind."""

    # A plain class, not a dataclass: the dataclasses module alone costs the CLI's hot
    # path ~5 ms to import.
    def __init__(
        self, *, spec: SandboxSpec, backend: str, isolation: str, client: AgentClient,
        process: subprocess.Popen[bytes], scratch: Path, cgroup: Cgroup | None = None,
        helpers: list[subprocess.Popen[bytes]] | None = None,
        cleanups: list[Callable[[], None]] | None = None, notes: list[str] | None = None,
        memory_floor: bool = True,
    ) -> None:
        self.spec = spec
        self.backend = backend
        self.isolation = isolation
        self.client = client
        self.process = process
        self.scratch = scratch
        self.cgroup = cgroup
        self.helpers: list[subprocess.Popen[bytes]] = helpers if helpers is not None else []
        self.cleanups: list[Callable[[], None]] = cleanups if cleanups is not None else []
        self.notes: list[str] = notes if notes is not None else []  # e.g. "rlimits only"
        self.memory_floor = memory_floor  # the backend's fact (Backend.memory_floor)
        self._destroyed = False

    def __repr__(self) -> str:
        return f"Sandbox({self.spec.name!r}, backend={self.backend!r})"

    def oom_killed(self) -> bool:
        return self.cgroup is not None and self.cgroup.oom_killed()

    def reusable(self) -> bool:
        """Whether a daemon's pool may hand this one-shot sandbox to another run of its key
        after a run ended (a wasm worker: each run is a new instance). Others never."""
        return False

    def command_rlimits(self) -> list[tuple[int, int, int]]:
        """The rlimits every command in this sandbox starts with."""
        return command_rlimits(self.spec.profile, self.cgroup, memory_floor=self.memory_floor)

    def destroy(self) -> None:
        with signals_deferred():
            if self._destroyed:
                return
            self._destroyed = True
            self._teardown()

    def _teardown(self) -> None:
        with contextlib.suppress(Exception):
            if self.client.alive:
                self.client.shutdown()
        self.client.close()
        try:
            _stop(self.process)
            if self.cgroup is not None:
                # Anything that slipped out of the sandbox's own process tree dies here.
                self.cgroup.destroy()
        finally:  # whatever failed above, the rest still goes
            # Helpers (slirp4netns, netns holders) never exit by themselves.
            _kill_and_reap_later(self.helpers)
            for cleanup in reversed(self.cleanups):
                with contextlib.suppress(Exception):
                    cleanup()
            import shutil  # lazily: its compression imports cost ~1.5 ms

            shutil.rmtree(self.scratch, ignore_errors=True)


DEFERRED_SIGNALS = ("SIGTERM", "SIGHUP", "SIGINT", "SIGQUIT")


@contextlib.contextmanager
def signals_deferred():  # type: ignore[no-untyped-def]
    """In the main thread: SIGTERM, SIGHUP, SIGINT and SIGQUIT wait until the block is
    done, then act as they would have (the first one is raised again). A cleanup cut
    short leaks its sandbox (scratch dir, cgroup, runsc state), and signals come in pairs:
    `timeout` and a terminal send one to the run and another to its process group, so
    the second used to land in the middle of the cleanup the first one started. Signal
    masks cannot do this: Python runs handlers in the main thread whichever thread the
    kernel picked, and ours has threads (its agent channel's reader)."""
    import signal

    from .signals import handlers_swapped

    got: list[int] = []

    def note(signo: int, _frame: object) -> None:
        got.append(signo)

    try:
        with handlers_swapped([getattr(signal, name) for name in DEFERRED_SIGNALS], note):
            yield
    finally:
        if got:
            signal.raise_signal(got[0])


def command_rlimits(profile: Profile, cgroup: Cgroup | None, *, memory_floor: bool = True
                    ) -> list[tuple[int, int, int]]:
    """The rlimits for commands of a sandbox with `profile` (see cgroups.rlimit_floor)."""
    from .cgroups import Limits, rlimit_floor

    # A microVM's own size bounds its memory: the guest needs no per-process floor.
    enforced = cgroup.enforced() if cgroup is not None else frozenset()
    mem = profile.memory_mb * 1024 * 1024 if profile.memory_mb else None
    if not memory_floor:
        mem = None
    return rlimit_floor(Limits(memory_bytes=mem, pids=profile.pids), enforced)


def _stop(proc: subprocess.Popen[bytes], grace: float = 1.0) -> None:
    """Wait briefly for a process to exit by itself, then kill it."""
    if grace > 0:
        # Popen.wait polls from 0.5 ms up: no fixed 5 ms sleep after a prompt exit.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
    _close_streams(proc)


def _close_streams(proc: subprocess.Popen[bytes]) -> None:
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _kill_and_reap_later(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGKILL each process now; reap the slow-dying ones on a background thread.

    slirp4netns takes ~20 ms to die: closing its tap device waits for RCU grace periods
    in the kernel. Once killed it can run no code of its own, so neither the CLI nor the
    daemon needs to wait; a CLI that exits first leaves the zombie to init.
    """
    slow = []
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            if proc.poll() is None:
                slow.append(proc)
        _close_streams(proc)
    if slow:
        import threading

        def reap() -> None:
            for proc in slow:
                proc.wait()

        threading.Thread(target=reap, name="reap-helpers", daemon=True).start()


def close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
