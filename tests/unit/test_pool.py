"""The warm pool with a fake backend: sizing from demand, caps, bounded starts and teardown,
claims on starts under way, and nothing left behind. No root, no sandboxes, seconds."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from agentkernel.daemon import pool as pool_mod
from agentkernel.daemon.pool import PoolKey, WarmPool
from agentkernel.errors import SandboxError
from agentkernel.profiles import PROFILES


class _Client:
    def __init__(self) -> None:
        self.alive = True


class _Process:
    def __init__(self) -> None:
        self.dead = False

    def poll(self) -> int | None:
        return 0 if self.dead else None


class _Spec:
    def __init__(self, name: str) -> None:
        self.name = name


class FakeSandbox:
    def __init__(self, name: str) -> None:
        self.spec = _Spec(name)
        self.client = _Client()
        self.process = _Process()
        self.cgroup = None
        self.helpers: list[Any] = []
        self.serves_again = False

    def reusable(self) -> bool:
        return self.serves_again


class FakeBackend:
    """Starts fake sandboxes after `delay` seconds; remembers which ones live."""

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None) -> None:
        self.delay = delay
        self.gate = gate  # when set, starts block until it is set
        self.lock = threading.Lock()
        self.live: set[str] = set()
        self.started = 0
        self.running = 0
        self.max_running = 0
        self.fail: Exception | None = None
        self.destroy_delay = 0.0

    def start(self, _key: PoolKey, _backend: Any, _rootfs: Any) -> FakeSandbox:
        with self.lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            n = self.started = self.started + 1
        try:
            if self.gate is not None:
                assert self.gate.wait(30)
            time.sleep(self.delay)
            if self.fail is not None:
                raise self.fail
            with self.lock:
                self.live.add(f"fake-{n}")
            return FakeSandbox(f"fake-{n}")
        finally:
            with self.lock:
                self.running -= 1

    def destroy(self, sandbox: FakeSandbox) -> None:
        time.sleep(self.destroy_delay)
        with self.lock:
            self.live.discard(sandbox.spec.name)


def key(name: str = "k") -> PoolKey:
    return PoolKey(image=name, rootfs="host", backend="fake", profile=PROFILES["restrictive"],
                   workspace=None, home=None)


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def make_pool(fake: FakeBackend) -> Iterator[Callable[..., WarmPool]]:
    pools: list[WarmPool] = []

    def make(**kw: Any) -> WarmPool:
        kw.setdefault("measure", lambda _sb: 1024 * 1024)
        p = WarmPool(fake.start, fake.destroy, **kw)  # type: ignore[arg-type]
        pools.append(p)
        return p

    yield make
    for p in pools:
        p.close()
    assert not fake.live, f"sandboxes left behind: {fake.live}"


def wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def status(p: WarmPool, k: PoolKey) -> Any:
    return next(s for s in p.status() if s.image == k.image)


def use(p: WarmPool, k: PoolKey) -> bool:
    """One run: acquire, hand back for teardown, release; whether it came warm."""
    sandbox, warm = p.acquire(k, None, None)  # type: ignore[arg-type]
    p.release(k)
    p.discard(sandbox)
    return warm


def test_configured_key_is_warm_and_each_sandbox_is_used_once(fake: FakeBackend,
                                                               make_pool: Any) -> None:
    p = make_pool()
    k = key()
    p.configure(k, None, None, 2, 4)
    assert p.wait_warm(10)
    assert status(p, k).warm == 2
    seen = set()
    for _ in range(5):
        sandbox, warm = p.acquire(k, None, None)
        assert warm
        assert sandbox.spec.name not in seen
        seen.add(sandbox.spec.name)
        p.release(k)
        p.discard(sandbox)
        wait_for(lambda: status(p, k).warm >= 2)
    assert p.drain(10)
    assert fake.live == {f"fake-{i}" for i in range(1, fake.started + 1)} - seen


def test_first_use_makes_an_adhoc_key_warm(fake: FakeBackend, make_pool: Any) -> None:
    p = make_pool(adhoc_min=1)
    k = key()
    assert use(p, k) is False  # nobody asked for this key before: a cold start
    wait_for(lambda: status(p, k).warm >= 1)
    assert use(p, k) is True
    st = status(p, k)
    assert (st.hits, st.misses) == (1, 1)


def test_the_target_follows_the_rate_of_takes_within_min_and_max(
        fake: FakeBackend, make_pool: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_mod, "RATE_WINDOW", 0.5)
    monkeypatch.setattr(pool_mod, "BURST_MEMORY", 0.5)  # (the burst's size: its own test)
    fake.delay = 0.02
    p = make_pool(adhoc_min=1, adhoc_max=6)
    k = key()
    use(p, k)
    for _ in range(40):
        use(p, k)
    busy = status(p, k)
    assert busy.rate > 5
    assert busy.target > 1  # demand raised it above min
    assert busy.target <= 6
    wait_for(lambda: status(p, k).target == 1)  # idle: the rate decays, back to min
    monkeypatch.setattr(pool_mod, "TRIM_AFTER", 0.0)
    wait_for(lambda: status(p, k).warm <= 1)  # and the surplus goes


def test_total_count_cap_holds_across_keys(fake: FakeBackend, make_pool: Any) -> None:
    fake.delay = 0.005
    p = make_pool(max_total=3)
    ka, kb = key("a"), key("b")
    p.configure(ka, None, None, 3, 3)
    p.configure(kb, None, None, 3, 3)
    peak = 0
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        held = sum(s.warm + s.starting for s in p.status())
        peak = max(peak, held)
        time.sleep(0.002)
    assert peak <= 3
    assert sum(s.warm for s in p.status()) == 3


def test_memory_cap_bounds_warm_sandboxes(fake: FakeBackend, make_pool: Any) -> None:
    p = make_pool(memory_bytes=250 * 1024 * 1024, measure=lambda _sb: 100 * 1024 * 1024,
                  refills=4)
    k = key()
    p.configure(k, None, None, 6, 6)
    wait_for(lambda: status(p, k).memory_kib > 0 and status(p, k).starting == 0)
    time.sleep(0.1)
    assert status(p, k).warm == 2  # 250 MiB / 100 MiB each


def test_starts_never_exceed_the_slots_even_under_many_takers(fake: FakeBackend,
                                                              make_pool: Any) -> None:
    fake.delay = 0.01
    p = make_pool(refills=2, adhoc_min=0, adhoc_max=0)
    k = key()
    errors: list[BaseException] = []

    def client() -> None:
        try:
            for _ in range(10):
                use(p, k)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    st = status(p, k)
    # Takers queue for the pool's starts; only one whose wait ran out starts beyond them.
    assert fake.max_running <= 2 + st.late
    assert st.hits + st.misses == 120
    assert st.waited > 0


def test_a_take_claims_a_start_under_way(fake: FakeBackend, make_pool: Any) -> None:
    gate = threading.Event()
    fake.gate = gate
    p = make_pool(refills=2)
    k = key()
    p.configure(k, None, None, 1, 1)
    wait_for(lambda: status(p, k).starting == 1)
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(p.acquire(k, None, None)))
    t.start()
    wait_for(lambda: status(p, k).in_use == 1)
    gate.set()
    t.join(10)
    sandbox, warm = got[0]
    assert warm and sandbox.spec.name == "fake-1"  # the start under way, not a new one
    p.release(k)
    p.discard(sandbox)


def test_a_take_whose_start_is_late_starts_its_own_and_nothing_leaks(
        fake: FakeBackend, make_pool: Any) -> None:
    gate = threading.Event()
    fake.gate = gate
    p = make_pool(refills=2)
    k = key()
    p.configure(k, None, None, 1, 1)
    wait_for(lambda: status(p, k).starting == 1)
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(p.acquire(k, None, None)))
    t.start()
    wait_for(lambda: status(p, k).in_use == 1)  # it claimed the stuck start
    fake.gate = None  # its own start, after the claim gives up, goes through
    t.join(30)
    sandbox, warm = result[0]
    assert warm is False and status(p, k).late == 1
    p.release(k)
    p.discard(sandbox)
    gate.set()
    wait_for(lambda: status(p, k).warm == 1)  # the late start was kept warm, not lost


def test_close_destroys_warm_queued_and_late_sandboxes(fake: FakeBackend,
                                                       make_pool: Any) -> None:
    fake.destroy_delay = 0.01
    p = make_pool(refills=2)
    k = key()
    p.configure(k, None, None, 2, 2)
    assert p.wait_warm(10)
    sandbox, _warm = p.acquire(k, None, None)
    p.release(k)
    p.discard(sandbox)
    fake.delay = 0.2  # refills under way when the pool closes
    wait_for(lambda: status(p, k).starting > 0)
    p.close()
    assert not fake.live
    after, _ = p.acquire(k, None, None)  # a closed pool still serves, cold, never keeps
    p.release(k)
    p.discard(after)
    assert not fake.live


def test_teardown_queue_is_bounded(fake: FakeBackend, make_pool: Any,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_mod, "DESTROY_QUEUE", 4)
    gate = threading.Event()
    p = make_pool(adhoc_min=0)
    k = key()
    sandboxes = [p.acquire(k, None, None)[0] for _ in range(10)]
    for _ in sandboxes:
        p.release(k)
    real = fake.destroy
    inline = []

    def slow_destroy(sb: FakeSandbox) -> None:
        if threading.current_thread().name.startswith("ak-pool-destroy"):
            gate.wait(10)
        else:
            inline.append(sb.spec.name)
        real(sb)

    p._destroy = slow_destroy
    for sb in sandboxes:
        p.discard(sb)
    assert len(inline) >= 10 - 4 - pool_mod.DESTROYERS  # a full queue: the caller waits
    gate.set()
    assert p.drain(10)


def test_a_failing_start_is_reported_and_backs_off(fake: FakeBackend,
                                                   make_pool: Any) -> None:
    fake.fail = SandboxError("no sandbox today")
    p = make_pool()
    k = key()
    with pytest.raises(SandboxError):
        p.acquire(k, None, None)
    p.release(k)
    p.configure(k, None, None, 1, 1)
    wait_for(lambda: status(p, k).last_error == "no sandbox today")
    tries = fake.started
    time.sleep(0.3)
    assert fake.started - tries <= 1  # backing off, not spinning
    fake.fail = None


def test_a_reusable_sandbox_is_given_back_first_in_line(fake: FakeBackend,
                                                         make_pool: Any) -> None:
    """A wasm worker that ended its run cleanly serves the key's next take; one that may
    not serve again, one started in the caller's thread (bwrap dies with that thread), and
    any given back to a closed pool are destroyed."""
    p = make_pool(adhoc_min=1)
    k = key()
    cold, warm = p.acquire(k, None, None)  # type: ignore[arg-type]
    assert not warm
    cold.serves_again = True
    p.release(k)
    p.give_back(k, cold)  # started here: tied to this thread
    wait_for(lambda: status(p, k).warm >= 1)
    sandbox, warm = p.acquire(k, None, None)  # type: ignore[arg-type]
    assert warm and sandbox is not cold
    sandbox.serves_again = True
    p.release(k)
    p.give_back(k, sandbox)
    again, warm = p.acquire(k, None, None)  # type: ignore[arg-type]
    assert warm and again is sandbox  # the warmest first
    for _ in range(50):  # runs in a row on one given-back sandbox: no demand for more
        p.release(k)
        p.give_back(k, again)
        again, warm = p.acquire(k, None, None)  # type: ignore[arg-type]
        assert warm
    assert status(p, k).target == 1
    again.serves_again = False  # e.g. it timed out
    p.release(k)
    p.give_back(k, again)
    assert p.drain(10)
    assert cold.spec.name not in fake.live and again.spec.name not in fake.live
    last, _ = p.acquire(k, None, None)  # type: ignore[arg-type]
    last.serves_again = True
    p.release(k)
    p.close()
    p.give_back(k, last)
    assert last.spec.name not in fake.live


def test_runs_on_a_given_back_sandbox_wake_no_pool_thread(fake: FakeBackend,
                                                         make_pool: Any) -> None:
    """A key whose sandbox comes back (wasm's worker), run after run, with pauses: its
    take and its release (after the give-back, as runs.finish does) have nothing for the
    refill and teardown threads to do, and wake none of them (each wake-up took the GIL
    on the run's path)."""
    p = make_pool(adhoc_min=1)
    k = key()
    first, _ = p.acquire(k, None, None)  # type: ignore[arg-type]
    p.discard(first)
    p.release(k)
    wait_for(lambda: status(p, k).warm >= 1)
    woken: list[str] = []
    notify_all = p._cond.notify_all

    def counted() -> None:
        woken.append(threading.current_thread().name)
        notify_all()

    for i in range(12):
        if i == 2:  # its worker came back twice: from now on nothing is to be started
            p._cond.notify_all = counted  # type: ignore[method-assign]
        sandbox, warm = p.acquire(k, None, None)  # type: ignore[arg-type]
        assert warm
        sandbox.serves_again = True
        p.give_back(k, sandbox)
        p.release(k)
        time.sleep(0.02)
    assert woken == []


# ---- background work yields to runs in flight (the request's latency) ----

@pytest.fixture
def patient(monkeypatch: pytest.MonkeyPatch) -> None:
    """Background work holds back as long as a run is in flight (within any test's time),
    and not at all once none is."""
    monkeypatch.setattr(pool_mod, "YIELD_MAX", 30.0)
    monkeypatch.setattr(pool_mod, "SETTLE", 0.0)
    monkeypatch.setattr(pool_mod, "BURST_GAP", 0.05)


def test_a_start_ahead_of_demand_waits_for_the_run_in_flight(
        fake: FakeBackend, make_pool: Any, patient: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_mod, "RATE_WINDOW", 1e6)  # rare takes: none expected soon
    p = make_pool()
    k = key()
    p.configure(k, None, None, 2, 2)
    assert p.wait_warm(10)
    started = fake.started
    sandbox, warm = p.acquire(k, None, None)
    assert warm
    time.sleep(0.3)  # a warm one is left for the next take: its refill waits for this run
    assert fake.started == started
    p.release(k)
    wait_for(lambda: fake.started == started + 1)  # the run ended: now it starts
    p.discard(sandbox)


def test_a_start_the_next_take_needs_does_not_wait(
        fake: FakeBackend, make_pool: Any, patient: None) -> None:
    """No warm sandbox left, and the next take expected before a start held back would be
    ready (here: within YIELD_MAX): it starts beside the run."""
    p = make_pool()
    k = key()
    p.configure(k, None, None, 1, 1)
    assert p.wait_warm(10)
    started = fake.started
    sandbox, warm = p.acquire(k, None, None)
    assert warm
    # Nothing warm is left for the next take: its start runs beside this run.
    wait_for(lambda: fake.started == started + 1)
    assert status(p, k).in_use == 1
    p.release(k)
    p.discard(sandbox)


def test_teardown_waits_for_the_runs_in_flight_then_happens(
        fake: FakeBackend, make_pool: Any, patient: None) -> None:
    p = make_pool()
    k = key()
    p.configure(k, None, None, 2, 2)
    assert p.wait_warm(10)
    a, _ = p.acquire(k, None, None)
    time.sleep(0.1)  # not back to back (BURST_GAP): teardown has a gap to wait for
    b, _ = p.acquire(k, None, None)
    p.release(k)
    p.discard(a)  # b's run is still in flight
    time.sleep(0.3)
    assert a.spec.name in fake.live
    p.release(k)
    wait_for(lambda: a.spec.name not in fake.live)
    p.discard(b)
    assert p.drain(10)


def test_teardown_does_not_wait_while_runs_come_back_to_back(
        fake: FakeBackend, make_pool: Any, patient: None) -> None:
    p = make_pool()
    k = key()
    p.configure(k, None, None, 2, 2)
    assert p.wait_warm(10)
    a, _ = p.acquire(k, None, None)
    b, _ = p.acquire(k, None, None)  # right after a: back to back
    p.release(k)
    p.discard(a)
    wait_for(lambda: a.spec.name not in fake.live)  # b still runs: no gap will come
    p.release(k)
    p.discard(b)


def test_background_work_yields_for_a_bounded_time_only(
        fake: FakeBackend, make_pool: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs back to back leave no gap: teardown and refills still happen."""
    monkeypatch.setattr(pool_mod, "YIELD_MAX", 0.05)
    p = make_pool()
    k = key()
    p.configure(k, None, None, 2, 2)
    assert p.wait_warm(10)
    started = fake.started
    a, _ = p.acquire(k, None, None)  # never released while we watch
    b, _ = p.acquire(k, None, None)
    p.release(k)
    p.discard(b)
    wait_for(lambda: b.spec.name not in fake.live)
    wait_for(lambda: fake.started >= started + 1)
    p.release(k)
    p.discard(a)


def test_a_key_in_use_keeps_one_more_so_its_refill_can_wait(fake: FakeBackend,
                                                          make_pool: Any) -> None:
    """One sandbox more than the rate asks for while a key is in use: a take then leaves
    one warm, and the refill may wait for the run (given-back keys, wasm's: not)."""
    p = make_pool()
    k = key()
    p.configure(k, None, None, 1, 4)
    assert p.wait_warm(10)
    sandbox, warm = p.acquire(k, None, None)
    assert warm
    assert status(p, k).target == 2
    p.release(k)
    p.discard(sandbox)
    wait_for(lambda: status(p, k).warm >= 2)


def test_a_burst_is_seen_at_its_second_take(fake: FakeBackend, make_pool: Any,
                                            patient: None,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The rate's average needs several takes to rise; two takes close together already
    mean more are coming: their refills do not wait (a third take would start cold)."""
    monkeypatch.setattr(pool_mod, "RATE_WINDOW", 1e6)  # the average alone sees no demand
    p = make_pool()
    k = key()
    p.configure(k, None, None, 3, 3)
    assert p.wait_warm(10)
    started = fake.started
    a, _ = p.acquire(k, None, None)
    b, _ = p.acquire(k, None, None)
    wait_for(lambda: fake.started > started)  # while both runs are in flight
    assert status(p, k).in_use == 2
    for sandbox in (a, b):
        p.release(k)
        p.discard(sandbox)


def test_a_warm_sandbox_made_with_other_masks_is_not_served(fake: FakeBackend,
                                                           make_pool: Any) -> None:
    """A private entry appeared in /etc since the warm ones started (runs._found_masks
    changed): they go, and the take gets a sandbox made with the masks of now."""
    from agentkernel.rootfs import Mask

    old, new = (Mask("/etc/a", False),), (Mask("/etc/a", False), Mask("/etc/b", False))
    masks = [old]
    start = fake.start

    def start_with_masks(*args: Any) -> FakeSandbox:
        sandbox = start(*args)
        sandbox.spec.found_masks = masks[0]  # type: ignore[attr-defined]
        return sandbox

    fake.start = start_with_masks  # type: ignore[method-assign]
    p = make_pool()
    k = key()
    p.configure(k, None, None, 2, 2)
    assert p.wait_warm(10)
    sandbox, warm = p.acquire(k, None, None, old)  # type: ignore[arg-type]
    assert warm and sandbox.spec.found_masks == old
    p.release(k)
    p.discard(sandbox)
    masks[0] = new
    sandbox, _warm = p.acquire(k, None, None, new)  # type: ignore[arg-type]
    assert sandbox.spec.found_masks == new
    p.release(k)
    p.discard(sandbox)
    assert p.drain(10)


def test_between_bursts_the_last_bursts_size_is_kept_warm(
        fake: FakeBackend, make_pool: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs back to back, then a pause: the key fills up to the burst's size (within its
    max) while idle, so that the next burst is served warm; later it is back to its min."""
    monkeypatch.setattr(pool_mod, "RATE_WINDOW", 0.2)
    p = make_pool(adhoc_min=1, adhoc_max=5)
    k = key()
    for _ in range(12):
        use(p, k)
    wait_for(lambda: status(p, k).warm == 5)  # the burst took 12; max 5
    assert all(use(p, k) for _ in range(5))  # the next burst: 5 warm in a row
    monkeypatch.setattr(pool_mod, "BURST_MEMORY", 0.3)
    monkeypatch.setattr(pool_mod, "TRIM_AFTER", 0.0)
    wait_for(lambda: status(p, k).target == 1 and status(p, k).warm <= 1)


# ---- a burst served from the pool's depth ----

@pytest.fixture
def long_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    """Takes 20 ms apart are a burst that does not pause while a test watches; background
    work that merely yields to runs would go after 20 ms (YIELD_MAX)."""
    monkeypatch.setattr(pool_mod, "RATE_WINDOW", 1e6)  # the gap alone says what comes
    monkeypatch.setattr(pool_mod, "BURST_GAP", 30.0)
    monkeypatch.setattr(pool_mod, "YIELD_MAX", 0.02)


def take_spaced(p: WarmPool, k: PoolKey, n: int) -> list[Any]:
    """`n` takes at least 20 ms apart (a burst under `long_burst`), all left in use."""
    taken = []
    for _ in range(n):
        time.sleep(0.02)
        sandbox, warm = p.acquire(k, None, None)  # type: ignore[arg-type]
        assert warm
        taken.append(sandbox)
    return taken


def test_a_burst_served_warm_holds_refills_and_teardown_until_it_pauses(
        fake: FakeBackend, make_pool: Any, long_burst: None) -> None:
    """Warm sandboxes enough for the takes expected soon: neither a refill nor a teardown
    shares the cores with the burst's runs (each one yielding for YIELD_MAX only would go
    during a long burst); once no run is in flight they go."""
    p = make_pool()
    k = key()
    p.configure(k, None, None, 10, 10)
    assert p.wait_warm(10)
    started = fake.started
    a, b = take_spaced(p, k, 2)
    p.release(k)
    p.discard(a)  # b's run is still in flight, the burst goes on
    time.sleep(0.3)
    assert a.spec.name in fake.live
    assert fake.started == started
    p.release(k)
    p.discard(b)
    wait_for(lambda: not ({a.spec.name, b.spec.name} & fake.live))
    wait_for(lambda: status(p, k).warm == 10)


def test_a_burst_that_runs_low_refills_at_once(fake: FakeBackend, make_pool: Any,
                                               long_burst: None) -> None:
    """The warm ones left no longer cover the takes expected before a start would be
    ready: the refills start during the burst, its runs still in flight."""
    p = make_pool()
    k = key()
    p.configure(k, None, None, 4, 4)
    assert p.wait_warm(10)
    started = fake.started
    taken = take_spaced(p, k, 3)
    wait_for(lambda: fake.started > started)
    assert status(p, k).in_use == 3
    for sandbox in taken:
        p.release(k)
        p.discard(sandbox)


def test_teardown_held_by_a_burst_is_bounded_by_half_its_queue(
        fake: FakeBackend, make_pool: Any, long_burst: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_mod, "DESTROY_QUEUE", 4)
    p = make_pool()
    k = key()
    p.configure(k, None, None, 10, 10)
    assert p.wait_warm(10)
    taken = take_spaced(p, k, 3)
    for sandbox in taken[:2]:
        p.release(k)
        p.discard(sandbox)  # the second fills half the queue: teardown goes on
    wait_for(lambda: len({s.spec.name for s in taken[:2]} & fake.live) < 2)
    assert status(p, k).in_use == 1
    p.release(k)
    p.discard(taken[2])


def test_a_keys_minimum_comes_before_another_keys_burst_depth(
        fake: FakeBackend, make_pool: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """One key's burst filled the total cap with surplus: a key used next still gets its
    minimum at once (not only once the surplus is trimmed, its key idle for TRIM_AFTER),
    not a cold start each run."""
    monkeypatch.setattr(pool_mod, "TRIM_AFTER", 1e6)
    p = make_pool(max_total=4, adhoc_min=1, adhoc_max=4)
    ka, kb = key("a"), key("b")
    for _ in range(6):
        use(p, ka)  # back to back: a burst, a keeps 4 warm for the next one
    wait_for(lambda: status(p, ka).warm == 4)
    assert not use(p, kb)  # b's first run: cold
    wait_for(lambda: status(p, kb).warm == 1)
    assert use(p, kb)
    wait_for(lambda: status(p, kb).warm == 1)
    assert status(p, ka).warm + status(p, kb).warm == 5  # a's surplus not trimmed yet


def test_runs_one_at_a_time_after_a_burst_keep_its_size_warm(
        fake: FakeBackend, make_pool: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run after a pause is not part of a burst: the key still aims at the last burst's
    size right after it (else each such run dropped the target, and paced runs drained
    the burst's depth without a refill)."""
    monkeypatch.setattr(pool_mod, "RATE_WINDOW", 0.2)
    p = make_pool(adhoc_min=1, adhoc_max=6)
    k = key()
    for _ in range(6):
        use(p, k)
    wait_for(lambda: status(p, k).warm == 6)
    time.sleep(2 * pool_mod.BURST_GAP)
    assert use(p, k)
    assert status(p, k).target == 6
    wait_for(lambda: status(p, k).warm == 6)


def test_a_burst_no_longer_than_the_last_is_served_from_the_depth_alone(
        fake: FakeBackend, make_pool: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The warm ones left cover what remains of a burst as long as the last one: no refill
    shares the cores with it, however close together its takes come; after it, the key
    refills."""
    monkeypatch.setattr(pool_mod, "RATE_WINDOW", 1e6)
    monkeypatch.setattr(pool_mod, "BURST_GAP", 0.05)
    p = make_pool()
    k = key()
    p.configure(k, None, None, 6, 6)
    assert p.wait_warm(10)
    for _ in range(6):
        use(p, k)  # back to back: a burst of 6
    assert p.wait_warm(10)
    time.sleep(0.1)  # a pause: the next take begins another burst
    started = fake.started
    taken = [p.acquire(k, None, None)[0]]  # type: ignore[arg-type]
    monkeypatch.setattr(pool_mod, "BURST_GAP", 30.0)  # it does not pause while we watch
    taken += [p.acquire(k, None, None)[0] for _ in range(4)]  # type: ignore[arg-type]
    assert status(p, k).warm == 1  # one left for the burst's last take
    time.sleep(0.3)
    assert fake.started == started
    for sandbox in taken:
        p.release(k)
        p.discard(sandbox)
    wait_for(lambda: status(p, k).warm == 6)


def test_the_depth_between_bursts_fills_with_half_the_slots(
        fake: FakeBackend, make_pool: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a key keeps only for its next burst is started at most refills // 2 at once:
    the runs meanwhile (another key's) keep a core."""
    monkeypatch.setattr(pool_mod, "RATE_WINDOW", 0.05)
    monkeypatch.setattr(pool_mod, "BURST_GAP", 1.0)  # the depth's refills begin 1 s after
    fake.delay = 0.02
    p = make_pool(adhoc_min=1, adhoc_max=8, refills=4)
    k = key()
    for _ in range(8):
        use(p, k)
    wait_for(lambda: fake.running == 0)
    fake.max_running = 0
    wait_for(lambda: status(p, k).warm == 8)
    assert fake.max_running <= 2


def test_right_after_a_burst_the_key_reports_and_refills_its_size(
        fake: FakeBackend, make_pool: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A status read within BURST_GAP of a burst's last take says what the key aims for
    once the burst pauses (a bench waiting for the pool to be "back at its target" read
    the few its rate asks for, and began the next burst with 3 warm, not 100); and the
    depth begins to fill at the pause, with no take or release to wake the refill
    workers (they slept on for up to IDLE_WAIT, here: for good)."""
    monkeypatch.setattr(pool_mod, "RATE_WINDOW", 0.05)  # the rate alone keeps one or two
    monkeypatch.setattr(pool_mod, "IDLE_WAIT", 1e6)
    p = make_pool(adhoc_min=1, adhoc_max=8)
    k = key()
    monkeypatch.setattr(pool_mod, "BURST_GAP", 30.0)  # the burst does not pause yet
    for _ in range(8):
        use(p, k)
    assert status(p, k).target == 8
    monkeypatch.setattr(pool_mod, "BURST_GAP", 0.05)  # now it has
    wait_for(lambda: status(p, k).warm == 8)


def test_teardown_held_by_a_burst_stays_within_the_memory_cap(
        fake: FakeBackend, make_pool: Any, long_burst: None) -> None:
    """Used sandboxes held for teardown during a burst count against the memory cap as
    measured (a run may have filled its tmpfs): one that would not fit is torn down at
    once, its burst still going on."""
    mib = 1024 * 1024
    used: dict[str, int] = {}
    p = make_pool(memory_bytes=16 * mib, measure=lambda sb: used.get(sb.spec.name, mib))
    k = key()
    p.configure(k, None, None, 10, 10)
    assert p.wait_warm(10)
    a, b, c = take_spaced(p, k, 3)
    p.release(k)
    p.discard(a)  # 1 MiB: with the 7 warm (7 MiB) within the cap, it waits for the burst
    time.sleep(0.3)
    assert a.spec.name in fake.live
    used[b.spec.name] = 12 * mib  # 7 + 1 + 12 > 16
    p.release(k)
    p.discard(b)
    wait_for(lambda: b.spec.name not in fake.live)  # c's run is still in flight
    assert status(p, k).in_use == 1
    p.release(k)
    p.discard(c)
    assert p.drain(10)


def test_a_slow_run_does_not_split_its_burst(fake: FakeBackend, make_pool: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A take right after the last run's end is back to back however long that run took
    (one that waited for a start under load took more than BURST_GAP): the burst is one,
    and the depth kept for the next is its whole size, not its longest part."""
    monkeypatch.setattr(pool_mod, "BURST_GAP", 1.0)
    monkeypatch.setattr(pool_mod, "RATE_WINDOW", 0.05)  # the rate alone keeps one or two
    p = make_pool(adhoc_min=1, adhoc_max=8)
    k = key()
    for _ in range(4):
        use(p, k)
    slow, _warm = p.acquire(k, None, None)  # type: ignore[arg-type]
    time.sleep(1.2)  # longer than BURST_GAP since the last take
    p.release(k)
    p.discard(slow)
    for _ in range(3):
        use(p, k)
    assert status(p, k).target == 8
    wait_for(lambda: status(p, k).warm == 8)
