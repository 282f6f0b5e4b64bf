"""The warm pool: sandboxes started ahead of time per key, each handed out once, then destroyed."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .api import PoolKeyStatus

if TYPE_CHECKING:
    from ..backends import Backend
    from ..profiles import Profile
    from ..rootfs import HostRootfs
    from ..sandbox import Sandbox

REFILL_WORKERS = 2  # concurrent sandbox starts: the host has few cores, runs come first
FAILURE_BACKOFF = (1.0, 60.0)  # seconds: first retry, cap
TRIM_AFTER = 30.0  # seconds without a take before a key's surplus sandboxes are destroyed
# After a take, a refill waits this long while spares remain: starting a sandbox costs the
# daemon CPU and GIL time that would otherwise delay the run that was just served.
REFILL_DELAY = 0.05


@dataclass(frozen=True)
class PoolKey:
    """Everything that makes two sandboxes interchangeable before a command runs in them."""

    image: str  # what the user asked for (reported)
    rootfs: str  # what actually backs it: the image ref, or "host"
    backend: str
    profile: Profile
    workspace: str | None  # host project dir at /workspace, None for none
    home: str | None  # host home (only when the profile mounts it)
    egress: Any = None  # egress_policy.Policy from the project's [network] lists, or None

    def label(self) -> str:
        where = f" {self.workspace}" if self.workspace else ""
        return f"{self.image}/{self.profile.name}/{self.backend}{where}"


@dataclass
class _KeyState:
    key: PoolKey
    backend: Backend
    rootfs: HostRootfs
    min: int
    max: int
    configured: bool
    warm: deque[Sandbox] = field(default_factory=deque)
    starting: int = 0
    in_use: int = 0
    last_used: float = field(default_factory=time.monotonic)
    failures: int = 0
    retry_at: float = 0.0
    last_error: str | None = None

    def target(self) -> int:
        # Keep `min` spare sandboxes beyond the ones in use right now, up to `max`.
        return min(self.max, self.min + self.in_use)


class WarmPool:
    """Keeps `min` started sandboxes per key; a refill starts as soon as one is taken."""

    def __init__(
        self,
        start: Callable[[PoolKey, Backend, HostRootfs], Sandbox],
        destroy: Callable[[Sandbox], None],
        *,
        adhoc_min: int = 1,
        adhoc_max: int = 8,
        idle_seconds: float = 600.0,
    ) -> None:
        self._start = start
        self._destroy = destroy
        self.adhoc_min = adhoc_min
        self.adhoc_max = adhoc_max
        self.idle_seconds = idle_seconds
        self._keys: dict[PoolKey, _KeyState] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._workers = [threading.Thread(target=self._work, name=f"ak-pool-{i}", daemon=True)
                         for i in range(REFILL_WORKERS)]
        for worker in self._workers:
            worker.start()

    def configure(self, key: PoolKey, backend: Backend, rootfs: HostRootfs,
                  min_: int, max_: int) -> None:
        """Declare a key from the config: kept warm from now on, never dropped when idle."""
        with self._cond:
            st = self._keys.get(key)
            if st is None:
                self._keys[key] = _KeyState(key, backend, rootfs, min_, max(min_, max_), True)
            else:
                st.min, st.max, st.configured = min_, max(min_, max_), True
            self._cond.notify_all()

    def take(self, key: PoolKey, backend: Backend, rootfs: HostRootfs) -> Sandbox | None:
        """A warm sandbox for `key`, or None (the caller starts one itself). Always counts
        the caller as in use until `release`; a first use of a key makes it warm from now on.
        """
        dead: list[Sandbox] = []
        got: Sandbox | None = None
        with self._cond:
            st = self._keys.get(key)
            if st is None:
                st = _KeyState(key, backend, rootfs, self.adhoc_min,
                               max(self.adhoc_min, self.adhoc_max), False)
                self._keys[key] = st
            while st.warm:
                candidate = st.warm.popleft()
                if candidate.client.alive and candidate.process.poll() is None:
                    got = candidate
                    break
                dead.append(candidate)
            st.in_use += 1
            st.last_used = time.monotonic()
            self._cond.notify_all()
        for sandbox in dead:
            self._destroy(sandbox)
        return got

    def release(self, key: PoolKey) -> None:
        with self._cond:
            st = self._keys.get(key)
            if st is not None:
                st.in_use = max(0, st.in_use - 1)
                st.last_used = time.monotonic()
                self._cond.notify_all()

    def status(self) -> list[PoolKeyStatus]:
        with self._cond:
            states = list(self._keys.values())
            return [
                PoolKeyStatus(image=st.key.image, profile=st.key.profile.name,
                              backend=st.key.backend, warm=len(st.warm), in_use=st.in_use,
                              min=st.min, max=st.max, workspace=st.key.workspace,
                              starting=st.starting, last_error=st.last_error)
                for st in states
            ]

    def wait_warm(self, timeout: float) -> bool:
        """Block until every key has reached its target (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if all(len(st.warm) >= st.target() or st.last_error for st in
                       self._keys.values()):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)

    def close(self) -> None:
        """Stop refilling and destroy every warm sandbox."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for worker in self._workers:
            worker.join(timeout=60)
        with self._cond:
            leftovers = [sb for st in self._keys.values() for sb in st.warm]
            for st in self._keys.values():
                st.warm.clear()
        for sandbox in leftovers:
            self._destroy(sandbox)

    # ---- refill ----

    def _next_job(self) -> _KeyState | None:
        """Under the lock: the key most in need of a sandbox, dropping idle ad-hoc keys."""
        now = time.monotonic()
        best: _KeyState | None = None
        for key, st in list(self._keys.items()):
            if (not st.configured and st.in_use == 0 and st.starting == 0
                    and now - st.last_used > self.idle_seconds):
                del self._keys[key]
                for sandbox in st.warm:
                    threading.Thread(target=self._destroy, args=(sandbox,), daemon=True).start()
                st.warm.clear()
                continue
            if len(st.warm) > st.target() and now - st.last_used > TRIM_AFTER:
                # A burst left more warm sandboxes than the key needs now: let them go.
                while len(st.warm) > st.target():
                    extra = st.warm.pop()
                    threading.Thread(target=self._destroy, args=(extra,), daemon=True).start()
            if st.retry_at > now:
                continue
            if st.warm and now - st.last_used < REFILL_DELAY:
                continue
            missing = st.target() - len(st.warm) - st.starting
            if missing > 0 and (best is None or missing > best.target() - len(best.warm)
                                - best.starting):
                best = st
        return best

    def _refill_pending(self) -> bool:
        return any(len(st.warm) + st.starting < st.target() for st in self._keys.values())

    def _work(self) -> None:
        while True:
            with self._cond:
                st = None
                while not self._closed:
                    st = self._next_job()
                    if st is not None:
                        break
                    # Wake up for idle expiry, delayed refills and failure retries even
                    # without a take().
                    self._cond.wait(timeout=REFILL_DELAY if self._refill_pending() else 1.0)
                if self._closed or st is None:
                    return
                st.starting += 1
            sandbox: Sandbox | None = None
            try:
                sandbox = self._start(st.key, st.backend, st.rootfs)
            except Exception as exc:
                message = getattr(exc, "message", None) or str(exc)
                print(f"agentkernel daemon: warm pool {st.key.label()}: {message}",
                      file=sys.stderr, flush=True)
                with self._cond:
                    st.failures += 1
                    st.last_error = message
                    first, cap = FAILURE_BACKOFF
                    st.retry_at = time.monotonic() + min(cap, first * 2 ** (st.failures - 1))
            with self._cond:
                st.starting -= 1
                if sandbox is not None:
                    st.failures, st.last_error = 0, None
                    if self._closed or self._keys.get(st.key) is not st:
                        doomed: Sandbox | None = sandbox
                    else:
                        st.warm.append(sandbox)
                        doomed = None
                else:
                    doomed = None
                self._cond.notify_all()
            if doomed is not None:
                with contextlib.suppress(Exception):
                    self._destroy(doomed)


def workspace_key(path: Path | None) -> str | None:
    return str(path) if path is not None else None
