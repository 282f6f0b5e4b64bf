"""The warm pool: sandboxes started ahead of demand per key, each handed out once, then destroyed.

How it keeps up (docs/daemon.md, "The warm pool"):
- **Sized from demand.** Per key, an EWMA of takes/s times an EWMA of how long a start
  takes says how many sandboxes one start's time consumes; the key keeps that many (times
  `HEADROOM`) warm, one more while it is in use (`LIVELY_RATE`: a take then leaves one
  warm, and its refill can yield to the run), and between bursts of runs back to back
  as many as the last burst took (`BURST_MEMORY` after it: refilled while idle, for the
  next burst), never fewer than its `min`, never more than its `max`. All keys
  together stay within a count (`max_total`) and a memory cap (`memory_bytes`, measured
  on the sandboxes themselves); the other keys' minimums come before a key's surplus.
- **Refilled concurrently, bounded.** `refills` worker threads start sandboxes; while runs
  are in flight only `busy_refills` of them do, so refills cannot starve the runs they
  are for; the depth kept for the next burst fills with half of them at most.
- **A request never waits longer than a cold start.** With no warm sandbox, a take may
  claim one whose start is under way if it is expected to be ready sooner than a fresh
  start would be, and waits at most that long; otherwise the caller starts one itself.
- **Teardown off the request path.** `discard` queues a used sandbox for a destroyer
  thread; a full queue makes the caller destroy it (back-pressure, never unbounded).
- **Background work yields to runs in flight.** A start the key's next take does not
  need yet (a warm sandbox is there for it, or it is not expected before this start
  would be ready) and a teardown wait while a run is in flight or has just ended
  (SETTLE: its answer is still on its way), at most YIELD_MAX: on two cores a start
  costs tens of ms of CPU, and a warm run that shares the CPU with its own refill took
  several times longer. A start a waiting or imminent take needs is never held back.
  During a burst served warm (runs back to back, and warm sandboxes enough for the takes
  expected before a start would be ready) both wait as long as the burst lasts, not
  YIELD_MAX: the pool's depth serves it, and teardown waits until half its queue is full
  or the used sandboxes it holds (measured) no longer fit in the memory cap beside the
  warm ones (the cap counts them).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SandboxError
from .api import PoolKeyStatus

if TYPE_CHECKING:
    from ..backends import Backend
    from ..profiles import Profile
    from ..rootfs import HostRootfs, Mask
    from ..sandbox import Sandbox

FAILURE_BACKOFF = (1.0, 60.0)  # seconds: first retry, cap
REFILL_DELAY = 0.02  # seconds after a take before a start that is not urgent, runs in flight
TRIM_AFTER = 5.0  # seconds without a take before a key's surplus sandboxes are destroyed
RATE_WINDOW = 2.0  # seconds: time constant of the takes/s EWMA
LATENCY_WEIGHT = 0.2  # weight of the newest start in the start-latency EWMA
FIRST_LATENCY = 0.05  # seconds: the start latency assumed before any was measured
HEADROOM = 1.5  # warm sandboxes per sandbox a start's time consumes at the current rate
# Used sandboxes waiting for teardown; beyond, the caller tears down. Up to half of it
# waits while a burst is served warm (a burst of up to `pool_max_total` runs).
DESTROY_QUEUE = 256
QUEUE_SLACK = 0.05  # seconds a queued take waits beyond its estimate before starting itself
MAX_CLAIMS = 256  # takes queued per key; beyond, a take starts its own sandbox
COLD_ATTEMPTS = 3  # tries of a start in the caller's thread
DESTROYERS = 2  # teardown threads (a teardown mostly waits for processes to go)
DEFAULT_MEMORY = 8 * 1024 * 1024  # bytes assumed per warm sandbox until one is measured
# Background work (starts ahead of demand, teardown) yielding to runs: it waits while a run
# is in flight and SETTLE after the last one ended, but never longer than YIELD_MAX.
SETTLE = 0.01  # seconds: a run's answer goes out after it released its sandbox (MCP: ~3 ms)
YIELD_MAX = 0.03  # seconds: then it runs anyway (back-to-back runs leave no gap)
LIVELY_RATE = 0.2  # takes/s (EWMA) from which a key keeps one warm sandbox more
# Seconds from a key's last take or release under which its next take comes back to back.
BURST_GAP = 0.1
BURST_MEMORY = 60.0  # seconds after its last take a key keeps its last burst's size warm
IDLE_WAIT = 1.0  # seconds the refill workers sleep at most with nothing to do


def default_refills() -> int:
    """Concurrent starts: two per core (a start also waits: for exec, for the agent's
    HELLO), 2 to 8."""
    return max(2, min(8, 2 * (os.cpu_count() or 1)))


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
    # An agent's sandbox (planner.with_agent): its install, read-only, and where the
    # project is shown (its own path).
    ro_binds: tuple[tuple[str, str], ...] = ()
    workspace_at: str = "/workspace"
    user: tuple[int, int, str] | None = None  # its commands' uid, gid and HOME inside
    # Which install each of `ro_binds` is (runs.install_ids): `agents install` puts a new
    # dir in place, and a warm sandbox bound the old one must not serve runs after it.
    installs: tuple[tuple[int, int, int], ...] = ()
    # The caller's microVM settings (vm.settings.MicrovmSettings, its `source` blanked): the
    # backend a key's sandboxes start on is configured with them, so callers that differ in
    # them (another kernel, snapshots on/off) must not share warm VMs.
    microvm: Any = None

    def label(self) -> str:
        where = f" {self.workspace}" if self.workspace else ""
        return f"{self.image}/{self.profile.name}/{self.backend}{where}"


def _stale(st: _KeyState, sandbox: Sandbox) -> bool:
    """Made from another description of its root filesystem than the key's latest (the
    host's always-masked paths changed while it started or ran): never served."""
    return getattr(sandbox.spec, "rootfs", st.rootfs) != st.rootfs


def _masks_current(sandbox: Sandbox, masks: tuple[Mask, ...] | None) -> bool:
    """Whether a warm sandbox was made with the masks its key has now (None: not known)."""
    found = getattr(sandbox.spec, "found_masks", None)
    return masks is None or found is None or found == masks


class _Claim:
    """A take waiting for a start under way: the refill hands the sandbox over directly."""

    __slots__ = ("event", "sandbox")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.sandbox: Sandbox | None = None


class _Doomed:
    """A used sandbox queued for teardown, and the bytes it holds (0: not measured yet;
    measured once its teardown would be held back, which counts them against the cap)."""

    __slots__ = ("memory", "queued", "sandbox")

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.memory = 0
        self.queued = True


@dataclass
class _KeyState:
    key: PoolKey
    backend: Backend
    rootfs: HostRootfs
    min: int
    max: int
    configured: bool
    warm: deque[Sandbox] = field(default_factory=deque)
    starts: list[float] = field(default_factory=list)  # monotonic start times under way
    claims: deque[_Claim] = field(default_factory=deque)
    in_use: int = 0
    last_used: float = field(default_factory=time.monotonic)
    rate: float = 0.0  # takes/s EWMA as of `rate_at`
    rate_at: float = field(default_factory=time.monotonic)
    latency: float = FIRST_LATENCY  # seconds per start, EWMA
    memory: int = 0  # bytes of one warm sandbox, measured (0: not yet)
    failures: int = 0
    retry_at: float = 0.0
    last_error: str | None = None
    hits: int = 0
    waited: int = 0  # hits that waited for a start under way
    late: int = 0  # takes that waited for a start, then (it was late) started their own
    misses: int = 0
    held: float | None = None  # since when its next start has yielded to runs (hotpath)
    given_back: bool = False  # its sandboxes serve again (give_back): no spare for refills
    taken_at: float = -math.inf  # the last take
    released_at: float = -math.inf  # the last release
    gap: float = math.inf  # seconds between the last two takes: a burst shows at once
    # Takes back to back (each under BURST_GAP after the key's last take or release) until
    # the last. From a release too: a run that waited for a start (a burst outrunning the
    # pool, a loaded machine) took longer than BURST_GAP, and split its burst in two (the
    # depth learned was then the longest part: 90 of 100 at load 8).
    run: int = 0
    burst: int = 0  # the longest such run within BURST_MEMORY: kept warm between bursts

    @property
    def starting(self) -> int:
        return len(self.starts)

    def rate_now(self, now: float) -> float:
        # A `now` read before another thread's take (or a test's clock) may lie behind
        # rate_at: no decay then, never a growth (exp of a large gap overflowed and ended
        # the pool's worker thread).
        return self.rate * math.exp(-max(0.0, now - self.rate_at) / RATE_WINDOW)

    def note_take(self, now: float) -> None:
        # An event-driven EWMA of the arrival rate: each take adds 1/window, decaying.
        self.rate = self.rate_now(now) + 1.0 / RATE_WINDOW
        self.rate_at = now
        self.last_used = now
        back_to_back = self.idle(now) < BURST_GAP
        self.gap, self.taken_at = now - self.taken_at, now
        self.run = self.run + 1 if back_to_back else 1
        self.burst = max(self.run, self.burst if self.gap < BURST_MEMORY else 0)

    def note_latency(self, seconds: float) -> None:
        self.latency += LATENCY_WEIGHT * (seconds - self.latency)

    def idle(self, now: float) -> float:
        """Seconds since the key's last take or release."""
        return now - max(self.taken_at, self.released_at)

    def bursting(self, now: float) -> bool:
        """Whether its runs come back to back right now (`run`, and the last take or
        release under BURST_GAP ago)."""
        return self.run > 1 and self.idle(now) < BURST_GAP

    def target(self, now: float, depth: bool = True) -> int:
        """Warm sandboxes to keep: what the takes of one start's time need, within min/max;
        one more while the key is in use (LIVELY_RATE), so that a take leaves one warm and
        its refill can wait for the run (`WarmPool._can_wait`); and for BURST_MEMORY after
        a burst, its size (`depth`: False leaves that out). During a burst that is what
        the key aims for once it pauses (status, `wait_warm`): its refills leave it out
        until then (`WarmPool._need`)."""
        rate = self.rate_now(now)
        # (Not for a key whose sandboxes come back, wasm's: its runs leave none to refill.)
        lively = rate >= LIVELY_RATE and not self.given_back
        demand = math.ceil(rate * self.latency * HEADROOM) + lively
        if depth and self.burst > 1 and not self.given_back and \
                now - self.taken_at < BURST_MEMORY:
            # Between bursts (runs back to back, then a pause, or runs one at a time):
            # as many warm as the last burst took, filled while idle, so that the next
            # one finds them; a rate of one start's time would keep a few, and a burst
            # drains them at once. (A run after a pause counts: it used to drop the
            # target until BURST_GAP later, and paced runs drained the depth unrefilled.)
            # Reported during the burst too: a status read within BURST_GAP of its last
            # take said a few, and a bench waiting for the pool to be "back at its
            # target" began the next burst with 3 warm where it had learned 100.
            demand = max(demand, self.burst)
        return max(self.min, min(self.max, demand))

    def spare(self) -> int:
        """Sandboxes ready or coming that no waiting take has claimed."""
        return len(self.warm) + self.starting - len(self.claims)


def sandbox_memory(sandbox: Sandbox) -> int:
    """Bytes a started sandbox holds: its cgroup's peak where one exists (an upper bound),
    else the resident size of its host processes."""
    if sandbox.cgroup is not None:
        with contextlib.suppress(Exception):
            peak = sandbox.cgroup.memory_peak()
            if peak:
                return peak
    total = 0
    for proc in (sandbox.process, *sandbox.helpers):
        with contextlib.suppress(OSError, ValueError, IndexError):
            pages = int(Path(f"/proc/{proc.pid}/statm").read_text().split()[1])
            total += pages * os.sysconf("SC_PAGE_SIZE")
    return total or DEFAULT_MEMORY


class WarmPool:
    """Warm sandboxes per key, sized from demand; see the module docstring."""

    def __init__(
        self,
        start: Callable[[PoolKey, Backend, HostRootfs], Sandbox],
        destroy: Callable[[Sandbox], None],
        *,
        adhoc_min: int = 1,
        adhoc_max: int = 128,
        idle_seconds: float = 600.0,
        max_total: int = 128,
        memory_bytes: int = 1024 * 1024 * 1024,
        refills: int | None = None,
        busy_refills: int = 1,
        measure: Callable[[Sandbox], int] = sandbox_memory,
    ) -> None:
        self._start = start
        self._destroy = destroy
        self._measure = measure
        self.adhoc_min = adhoc_min
        self.adhoc_max = adhoc_max
        self.idle_seconds = idle_seconds
        self.max_total = max_total
        self.memory_bytes = memory_bytes
        self.refills = refills if refills is not None else default_refills()
        self.busy_refills = max(1, min(busy_refills, self.refills))
        self._keys: dict[PoolKey, _KeyState] = {}
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # keys changed: refills, takes
        self._doomed_cond = threading.Condition(self._lock)  # teardown queued (destroyers)
        self._closed = False
        self._doomed: deque[_Doomed] = deque()  # waiting for the destroyer
        self._doomed_bytes = 0  # of those, the measured ones' (held back: in the memory cap)
        # Started in a caller's thread: bwrap's --die-with-parent ties a sandbox to the
        # thread that started it, and a request's thread ends with its request. Such a
        # sandbox is never given back; the refill threads live as long as the pool.
        self._tied: weakref.WeakSet[Sandbox] = weakref.WeakSet()
        self._destroying = 0
        self._active_at = 0.0  # monotonic time of the last take or release (any key)
        self._teardown_held: float | None = None  # since when teardown has yielded
        self._threads = [threading.Thread(target=self._work, name=f"ak-pool-{i}", daemon=True)
                         for i in range(self.refills)]
        self._threads += [threading.Thread(target=self._destroyer, name=f"ak-pool-destroy-{i}",
                                           daemon=True) for i in range(DESTROYERS)]
        for thread in self._threads:
            thread.start()

    # ---- what the manager calls ----

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

    def acquire(self, key: PoolKey, backend: Backend, rootfs: HostRootfs,
                masks: tuple[Mask, ...] | None = None) -> tuple[Sandbox, bool]:
        """A sandbox for one run, and whether it came warm. The caller is in use until
        `release`, also when this raises; a first use of a key makes it warm from now on.
        `masks`: the root filesystem's masks as they are now (runs._found_masks); a warm
        sandbox made with others (a private entry appeared in /etc since) is not served.

        No warm sandbox: claim a start under way (it began earlier, so it is ready before
        a fresh one would be; wait at most one start's time for it), else start one in
        this thread while fewer than `refills` starts run, else queue for the next start
        the refill workers make (the cores are busy: another start would only slow every
        start down).
        """
        dead: list[Sandbox] = []
        claim: _Claim | None = None
        with self._cond:
            now = time.monotonic()
            st = self._state(key, backend, rootfs)
            if st.rootfs != rootfs:  # e.g. a credential path appeared: new masks
                st.rootfs = rootfs
                dead.extend(st.warm)  # made without them: never served
                st.warm.clear()
            st.in_use += 1
            st.note_take(now)
            self._active_at = now
            got = self._pop_alive(st, dead, masks)
            cold = got is None and (self._closed or not self._queue_or_claim(st))
            began = now
            if cold:
                st.starts.append(began)  # this thread's start holds a slot
            elif got is None:
                claim = st.claims[-1]
            queued = max(0, len(st.claims) - st.starting)  # 0: a start under way is ours
            wait = QUEUE_SLACK + st.latency * (1 + 2 * queued / self.refills)
            # A take that begins a burst wakes them too: their sleep then ends at its
            # pause, when the target rises to its size (`_idle_wait`; not a key whose
            # sandboxes come back, wasm's: it keeps no depth).
            began_burst = st.run == 2 and not st.given_back
            if got is None or began_burst or self._workers_wanted(now):
                self._cond.notify_all()
        self.discard_all(dead)
        if got is not None:
            self._count(st, "hits")
            return got, True
        if claim is not None:
            got = self._await(st, claim, wait)
            if got is not None and not _masks_current(got, masks):
                self.discard(got)  # its start began before /etc changed: start anew
                got = None
            if got is not None:
                self._count(st, "waited")
                return got, True
            with self._cond:
                began = time.monotonic()
                st.starts.append(began)
                st.late += 1
        self._count(st, "misses")
        return self._start_here(st, began), False

    def _queue_or_claim(self, st: _KeyState) -> bool:
        """Under the lock: whether a take without a warm sandbox waits for the pool (True,
        its claim appended) rather than start one itself."""
        if len(st.claims) < st.starting:
            pass  # an unclaimed start under way: ready sooner than a fresh one
        elif self._running() >= self.refills and len(st.claims) < MAX_CLAIMS:
            pass  # every start slot is busy: wait for the next start, in turn
        else:
            return False
        st.claims.append(_Claim())
        return True

    def _start_here(self, st: _KeyState, began: float) -> Sandbox:
        """Start a sandbox in the caller's thread (its slot, `began`, is in `st.starts`
        already); timed, as a refill is. A start that fails before anything ran is tried
        again."""
        try:
            for attempt in range(COLD_ATTEMPTS):
                try:
                    sandbox = self._start(st.key, st.backend, st.rootfs)
                    with self._cond:
                        self._tied.add(sandbox)
                    break
                except SandboxError:
                    # Under heavy concurrency bwrap now and then fails its netlink set-up
                    # (loopback, ECHILD); another try beats a failed run.
                    if attempt == COLD_ATTEMPTS - 1:
                        raise
        finally:
            with self._cond:
                st.starts.remove(began)
                self._cond.notify_all()
        with self._cond:
            st.note_latency(time.monotonic() - began)
        return sandbox

    def _running(self) -> int:
        return sum(st.starting for st in self._keys.values())

    def release(self, key: PoolKey) -> None:
        with self._cond:
            st = self._keys.get(key)
            if st is not None:
                st.in_use = max(0, st.in_use - 1)
                now = st.last_used = st.released_at = self._active_at = time.monotonic()
                if self._workers_wanted(now):
                    self._cond.notify_all()
                if self._doomed:
                    self._doomed_cond.notify_all()  # a teardown waiting for runs to end

    def _workers_wanted(self, now: float) -> bool:
        """Under the lock: whether a take or a release (that started nothing) may give the
        refill workers something to do, or a shorter wait: a key that wants a start, has
        takes waiting, or a start yielding to runs. Else they sleep on: waking them all
        (each takes the GIL in turn) cost a warm run, wasm's above all, whose sandbox comes
        back, about a millisecond; expiry and trims are timed, a take or release only
        defers them."""
        return any(st.claims or st.held is not None or self._need(st, now) > 0
                   for st in self._keys.values())

    def give_back(self, key: PoolKey, sandbox: Sandbox) -> None:
        """A used sandbox that may serve again (`Sandbox.reusable`): first in line for the
        key's next take (it is the warmest), else destroyed when the key is gone, the pool
        closed or the key holds its maximum already."""
        with self._cond:
            st = self._keys.get(key)
            if (st is not None and not self._closed and sandbox not in self._tied
                    and sandbox.reusable() and len(st.warm) < st.max
                    and not _stale(st, sandbox)):
                # Its take consumed no sandbox: it leaves the demand the key is sized from
                # (else runs in a row would look like a need for `max` sandboxes).
                now = time.monotonic()
                st.rate, st.rate_at = max(0.0, st.rate_now(now) - 1.0 / RATE_WINDOW), now
                st.given_back = True
                if st.claims:
                    claim = st.claims.popleft()
                    claim.sandbox = sandbox
                    claim.event.set()
                else:
                    st.warm.appendleft(sandbox)  # no refill needs to hear of it
                return
        self.discard(sandbox)

    def discard(self, sandbox: Sandbox) -> None:
        """Destroy a used sandbox off the caller's path; inline when the queue is full."""
        with self._cond:
            if not self._closed and len(self._doomed) < DESTROY_QUEUE:
                self._doomed.append(_Doomed(sandbox))
                self._doomed_cond.notify()
                return
        self._destroy_quietly(sandbox)

    def discard_all(self, sandboxes: list[Sandbox]) -> None:
        for sandbox in sandboxes:
            self.discard(sandbox)

    def status(self) -> list[PoolKeyStatus]:
        with self._cond:
            now = time.monotonic()
            return [
                PoolKeyStatus(image=st.key.image, profile=st.key.profile.name,
                              backend=st.key.backend, warm=len(st.warm), in_use=st.in_use,
                              min=st.min, max=st.max, workspace=st.key.workspace,
                              starting=st.starting, last_error=st.last_error,
                              hits=st.hits, misses=st.misses, waited=st.waited, late=st.late,
                              target=st.target(now), rate=round(st.rate_now(now), 2),
                              start_ms=round(st.latency * 1000, 1),
                              memory_kib=st.memory // 1024)
                for st in self._keys.values()
            ]

    def wait_warm(self, timeout: float) -> bool:
        """Block until every key has reached its target (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                if all(len(st.warm) >= min(st.target(now), self._room(st)) or st.last_error
                       for st in self._keys.values()):
                    return True
                left = deadline - now
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))

    def close(self) -> None:
        """Stop refilling; destroy every warm sandbox and every queued one. Starts under
        way finish first (a start cannot be interrupted half-way); they are destroyed too."""
        with self._cond:
            self._closed = True
            for st in self._keys.values():
                for claim in st.claims:
                    claim.event.set()  # their takes start cold (or fail: the daemon stops)
                st.claims.clear()
            self._cond.notify_all()
            self._doomed_cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=60)
        with self._cond:
            leftovers = [sb for st in self._keys.values() for sb in st.warm]
            for st in self._keys.values():
                st.warm.clear()
            leftovers.extend(d.sandbox for d in self._doomed)
            self._doomed.clear()
            self._doomed_bytes = 0
        for sandbox in leftovers:
            self._destroy_quietly(sandbox)

    # ---- taking ----

    def _state(self, key: PoolKey, backend: Backend, rootfs: HostRootfs) -> _KeyState:
        st = self._keys.get(key)
        if st is None:
            st = _KeyState(key, backend, rootfs, self.adhoc_min,
                           max(self.adhoc_min, self.adhoc_max), False)
            self._keys[key] = st
        return st

    @staticmethod
    def _pop_alive(st: _KeyState, dead: list[Sandbox], masks: tuple[Mask, ...] | None = None
                   ) -> Sandbox | None:
        while st.warm:
            candidate = st.warm.popleft()
            if (candidate.client.alive and candidate.process.poll() is None
                    and _masks_current(candidate, masks)):
                return candidate
            dead.append(candidate)
        return None

    def _await(self, st: _KeyState, claim: _Claim, wait: float) -> Sandbox | None:
        # The claim's start should end within `wait`; by then a fresh start would have.
        claim.event.wait(wait)
        with self._cond:
            if claim.sandbox is None:
                with contextlib.suppress(ValueError):
                    st.claims.remove(claim)  # a refill that ends later keeps it warm
            self._cond.notify_all()
            return claim.sandbox

    def _count(self, st: _KeyState, what: str) -> None:
        with self._cond:
            if what == "misses":
                st.misses += 1
            else:
                st.hits += 1
                st.waited += what == "waited"

    # ---- refill ----

    def _room(self, st: _KeyState) -> int:
        """Under the lock: how many sandboxes `st` may hold warm or starting, given the
        total count and memory caps over every key (a key not yet measured counts as
        DEFAULT_MEMORY per sandbox; used ones held for teardown count as measured). The
        other keys' minimums come first; and a key's own minimum comes before the others'
        surplus (a burst's depth: `_expire` trims it once its key is idle), so that one
        key's burst never leaves another key cold."""
        others = [o for o in self._keys.values() if o is not st]
        held = sum(len(o.warm) + o.starting for o in others)
        unmet = sum(max(0, min(o.min, o.max) - len(o.warm) - o.starting) for o in others)
        # Used sandboxes whose teardown is held back hold memory too (`_held_fits`).
        memory_held = self._doomed_bytes + sum(
            (len(o.warm) + o.starting) * (o.memory or DEFAULT_MEMORY) for o in others)
        by_memory = max(0, (self.memory_bytes - memory_held) // (st.memory or DEFAULT_MEMORY))
        room = max(0, min(self.max_total - held - unmet, by_memory))
        within_mins = self.max_total - sum(min(len(o.warm) + o.starting, o.min) for o in others)
        room = max(room, min(st.min, st.max, by_memory, within_mins))
        if not st.memory and st.starting:
            # Not measured yet: one start at a time until the first one says how big.
            room = min(room, len(st.warm) + st.starting)
        return room

    def _need(self, st: _KeyState, now: float) -> int:
        """Under the lock: starts `st` wants now: its target, within the caps, plus the
        takes waiting for a start (only a failed start leaves one without)."""
        # During a burst its depth waits for the pause: the runs need the cores now.
        want = min(st.target(now, depth=not st.bursting(now)) + len(st.claims), self._room(st))
        # A key whose sandboxes come back (wasm's workers): those its runs hold are on
        # their way (a take waiting, or starting its own, holds none).
        back = max(0, st.in_use - len(st.claims) - st.starting) if st.given_back else 0
        return want - len(st.warm) - st.starting - back

    def _expire(self, now: float) -> list[Sandbox]:
        """Under the lock: drop idle ad-hoc keys and surplus warm sandboxes."""
        out: list[Sandbox] = []
        for key, st in list(self._keys.items()):
            if (not st.configured and st.in_use == 0 and st.starting == 0
                    and not st.claims and now - st.last_used > self.idle_seconds):
                del self._keys[key]
                out.extend(st.warm)
                st.warm.clear()
                continue
            keep = min(st.target(now), self._room(st))
            if len(st.warm) > keep and now - st.last_used > TRIM_AFTER:
                # Demand fell (or a burst left more than the key needs): let them go.
                while len(st.warm) > keep:
                    out.append(st.warm.pop())
        return out

    def _next_job(self, now: float) -> _KeyState | None:
        """Under the lock: the key most in need of a start. Queued takes come first, and
        a key down to half its rate's target may use every slot (a burst's depth: half of
        them, `depth_ok`). Other starts ahead of demand yield to runs in flight: at most
        `busy_refills` at once, and only REFILL_DELAY after the key's last take (a start
        costs CPU the run just served needs). A start
        the key's next take does not need yet (`_can_wait`) also waits for the runs in
        flight to end (`_yield_left`)."""
        running = self._running()
        if running >= self.refills:
            return None
        busy = self._busy()
        ahead_ok = running < (self.busy_refills if busy else self.refills)
        # The depth kept between bursts is filled with half the slots at most: the other
        # runs of the while (another key's, the CLI's) keep a core.
        depth_ok = running < max(self.busy_refills, self.refills // 2)
        best, best_need = None, 0
        for st in self._keys.values():
            if st.retry_at > now:
                continue
            queued = len(st.claims) - st.starting  # takes waiting with no start of theirs
            if queued > 0:
                need = queued + 1000
            else:
                need = self._need(st, now)
                if need <= 0:  # nothing to start (e.g. its sandboxes came back): none yields
                    st.held = None
                    continue
                # Down to half the target its rate says or less, a key is behind demand:
                # every slot. What the rate's target leaves to start is burst depth.
                rated = st.target(now, depth=False)
                urgent = 2 * st.spare() <= rated
                ok = ahead_ok and (depth_ok or st.spare() < rated)
                if not urgent and (not ok or now - st.last_used < REFILL_DELAY):
                    continue
                if need > 0 and self._can_wait(st, now) and \
                        self._yield_left(now, st.held) > 0:
                    st.held = st.held or now  # the next take won't need it sooner: the run first
                    continue
            st.held = None
            if need > best_need:
                best, best_need = st, need
        return best

    # ---- background work yields to runs (hotpath: request latency) ----

    def _busy(self) -> bool:
        """Under the lock: whether a run holds a sandbox of this pool."""
        return any(st.in_use for st in self._keys.values())

    @staticmethod
    def _can_wait(st: _KeyState, now: float) -> bool:
        """Under the lock: whether a start for `st` may yield to runs (YIELD_MAX at most)
        without a take paying for it: the takes expected before a start held back now
        would be ready (at the key's rate, or its last gap) are fewer than the warm ones left, with
        half a take to spare. Runs back to back expect several: their refills never wait
        (a take that found neither a warm sandbox nor a start under way would start cold)."""
        window = YIELD_MAX + st.latency
        # The rate, or the last gap between takes where that says more: the EWMA needs
        # several takes to see a burst begin, the gap sees it at its second.
        expected = max(st.rate_now(now) * window, window / st.gap if st.gap > 0 else math.inf)
        left = len(st.warm) - len(st.claims)
        # In a burst no longer than the last one (the key's depth was sized from it), the
        # warm ones left may cover all of its remaining takes: nothing to start for it.
        # (A longer burst then refills as above once they are gone.)
        remaining = st.burst - st.run if st.run > 1 else 0
        return expected + 0.5 < left + 1 or 0 < remaining <= left

    def _burst(self, now: float) -> bool:
        """Under the lock: whether runs come back to back (a key's `bursting`): there is
        no gap to wait for then, and teardown held back would only pile up and then
        compete with the refills."""
        return any(st.bursting(now) for st in self._keys.values())

    def _burst_served_warm(self, now: float) -> bool:
        """Under the lock: whether runs come back to back (`_burst`) and every key they
        come for has warm sandboxes enough for the takes expected before a start would be
        ready (`_can_wait`): the burst is served from the pool's depth, and a refill or a
        teardown now would only share the cores (and the GIL) with its runs. Once a key's
        warm ones run low that stops, and its refills start at once."""
        bursting = [st for st in self._keys.values() if st.bursting(now)]
        return bool(bursting) and all(self._can_wait(st, now) for st in bursting)

    def _yield_left(self, now: float, held_since: float | None) -> float:
        """Under the lock: how long background work held back since `held_since` (None:
        not yet) still waits for the runs: while one is in flight or ended under SETTLE
        ago, and at most YIELD_MAX in all; during a burst served warm, as long as it lasts
        (a take or a release looks again sooner)."""
        if not self._busy() and now - self._active_at >= SETTLE:
            return 0.0
        if self._burst_served_warm(now):
            left = BURST_GAP - min(st.idle(now) for st in self._keys.values())
        else:
            since = now if held_since is None else held_since
            left = since + YIELD_MAX - now
        if not self._busy():
            left = min(left, self._active_at + SETTLE - now)
        return max(0.0, left)

    def _idle_wait(self, now: float) -> float:
        retry = [st.retry_at - now for st in self._keys.values() if st.retry_at > now]
        # A burst's pause raises its key's target to the burst's size, with no take or
        # release to say so: without this the depth began to fill up to IDLE_WAIT late.
        retry += [BURST_GAP - st.idle(now) for st in self._keys.values()
                  if st.burst > 1 and not st.given_back and st.bursting(now)]
        # A refill delayed by REFILL_DELAY; with every slot busy, a start's end notifies.
        if self._running() < self.refills and any(self._need(st, now) > 0
                                                  for st in self._keys.values()):
            retry.append(REFILL_DELAY)
            # A start yielding to runs: a release notifies; else its bound ends the wait.
            retry += [self._yield_left(now, st.held) for st in self._keys.values()
                      if st.held is not None]
        return max(0.005, min([IDLE_WAIT, *retry]))

    def _work(self) -> None:
        while True:
            with self._cond:
                st = None
                expired: list[Sandbox] = []
                while not self._closed:
                    now = time.monotonic()
                    expired = self._expire(now)
                    st = self._next_job(now)
                    if st is not None or expired:
                        break
                    # Wake up for idle expiry, trims and failure retries without a take.
                    self._cond.wait(self._idle_wait(now))
                if self._closed:
                    self._doomed.extend(_Doomed(sb) for sb in expired)
                    return
                began = time.monotonic()
                if st is not None:
                    st.starts.append(began)
            self.discard_all(expired)
            if st is not None:
                self._refill(st, began)

    def _refill(self, st: _KeyState, began: float) -> None:
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
        memory = self._measure(sandbox) if sandbox is not None and not st.memory else 0
        with self._cond:
            st.starts.remove(began)
            doomed = None
            if sandbox is not None:
                st.note_latency(time.monotonic() - began)
                st.failures, st.last_error = 0, None
                st.memory = st.memory or memory
                if self._closed or self._keys.get(st.key) is not st or _stale(st, sandbox):
                    doomed = sandbox
                elif st.claims:
                    claim = st.claims.popleft()
                    claim.sandbox = sandbox
                    claim.event.set()
                else:
                    st.warm.append(sandbox)
            else:
                # Failed: the takes with no start under way for them try their own now
                # (and report the error) rather than wait out the back-off.
                while len(st.claims) > st.starting:
                    st.claims.pop().event.set()
            self._cond.notify_all()
        if doomed is not None:
            self._destroy_quietly(doomed)

    # ---- teardown ----

    def _destroyer(self) -> None:
        while True:
            with self._cond:
                while not self._doomed and not self._closed:
                    self._doomed_cond.wait()
                if not self._doomed:
                    return
                held = self._teardown_yields()
                if held is True:
                    continue
                if held is False:
                    doomed = self._doomed.popleft()
                    doomed.queued = False
                    self._doomed_bytes -= doomed.memory
                    self._destroying += 1
            if isinstance(held, _Doomed):
                self._measure_doomed(held)
                continue
            sandbox = doomed.sandbox
            try:
                self._destroy_quietly(sandbox)
            finally:
                with self._cond:
                    self._destroying -= 1
                    self._cond.notify_all()

    def _measure_doomed(self, doomed: _Doomed) -> None:
        """Measure a used sandbox whose teardown would be held (outside the lock)."""
        try:
            memory = max(1, self._measure(doomed.sandbox))
        except Exception:
            memory = DEFAULT_MEMORY
        with self._cond:
            if doomed.queued and not doomed.memory:  # (not torn down meanwhile)
                doomed.memory = memory
                self._doomed_bytes += memory

    def _held_fits(self) -> bool:
        """Under the lock: whether the used sandboxes held for teardown, with every key's
        warm and starting ones, stay within the memory cap (a run may have left files in
        its tmpfs: they are measured, not assumed)."""
        pooled = sum((len(st.warm) + st.starting) * (st.memory or DEFAULT_MEMORY)
                     for st in self._keys.values())
        return pooled + self._doomed_bytes <= self.memory_bytes

    def _teardown_yields(self) -> bool | _Doomed:
        """Under the lock: wait (once, briefly) if teardown should yield to runs; True if
        it waited (the caller looks again), or a queued sandbox to measure first: held
        back, used sandboxes count against the memory cap, and teardown is held only
        while they fit (`_held_fits`). A full queue's teardown never waits."""
        now = time.monotonic()
        if self._closed or len(self._doomed) >= DESTROY_QUEUE // 2 or (
                self._burst(now) and not self._burst_served_warm(now)):
            left = 0.0
        else:
            left = self._yield_left(now, self._teardown_held)
        if left > 0:
            # (The newest are the ones not measured yet.)
            unmeasured = next((d for d in reversed(self._doomed) if not d.memory), None)
            if unmeasured is not None:
                return unmeasured
            if not self._held_fits():
                left = 0.0
        if left <= 0:
            self._teardown_held = None
            return False
        if self._teardown_held is None:
            self._teardown_held = now
        self._doomed_cond.wait(left)
        return True

    def _destroy_quietly(self, sandbox: Sandbox) -> None:
        try:
            self._destroy(sandbox)
        except Exception as exc:
            print(f"agentkernel daemon: could not destroy {sandbox.spec.name}: {exc}",
                  file=sys.stderr, flush=True)

    def drain(self, timeout: float) -> bool:
        """Block until no used sandbox waits for teardown (tests)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._doomed or self._destroying:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True


def workspace_key(path: Path | None) -> str | None:
    return str(path) if path is not None else None
