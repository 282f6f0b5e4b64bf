"""Outside review, round 5: a root-started wasm compiler child is not the host's `nobody`.

The compiler child (backends/wasm_compile.py) gave up root for uid/gid 65534, the host's
own `nobody`: an account other local users' processes run as (an ordinary user here, and
our own `nobody`-started sandboxes and daemons). So that user can signal it (SIGSTOP the
child a daemon keeps ahead: the next root run of a new module waits out the compile wall
time and is refused; SIGKILL a compiling one: refused), prlimit and renice it; and a child
a hostile module takes over (a compiler bug: Cranelift meets untrusted input there) can
ptrace and signal every process of that account (no Yama here, and theirs are dumpable).
Every other root-started process we run without root takes an id range of its own
(idmap.allocate); now the child's ids are the first of a range of that block kept for
root's compiler children alone (idmap.helper_range, wasm.py `_compile_ids`), and this
attack fails.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

pytest.importorskip("wasmtime")
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a root daemon's child)")

NOBODY = 65534


def _uids(pid: int) -> list[int]:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return [int(x) for x in line.split()[1:]]
    raise AssertionError("no Uid line")


def test_another_user_cannot_signal_roots_compiler_child() -> None:
    from agentkernel.backends.wasm import _reap, _spawn

    child = _spawn(ahead=True)
    try:
        deadline = time.monotonic() + 30
        while _uids(child.pid)[0] == 0:  # it drops root once wasmtime is loaded
            assert child.poll() is None and time.monotonic() < deadline, "it never dropped"
            time.sleep(0.02)
        uids = _uids(child.pid)
        probe = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--",
             "kill", "-0", str(child.pid)], capture_output=True, text=True, timeout=30)
        assert probe.returncode != 0, f"nobody may signal root's compiler child ({uids})"
        assert NOBODY not in uids, uids
    finally:
        _reap(child)


def test_compiler_ids_are_no_sandbox_range() -> None:
    """Review, round 6: the child's ids were a range `allocate` gives sandboxes, locked
    while it lived. Not a PID namespace of its own: a child a hostile module took over
    could setsid() a grandchild (out of reach of our kill), close the lock and so hand
    the range to a later sandbox, whose processes it could then signal and ptrace as
    their own uid. Its ids are now a range no sandbox can get: not by allocate, nor by
    take (a container's stored range)."""
    from agentkernel import idmap
    from agentkernel.backends.wasm import _compile_ids
    from agentkernel.errors import SandboxError

    uid, gid, lock = _compile_ids()
    rng = idmap.helper_range()
    assert rng is not None and (uid, gid, lock) == (rng.uid, rng.gid, -1)
    held: list[int] = []
    try:
        for _ in range(16):
            got, fd = idmap.allocate()
            held.append(fd)
            assert not got.uid <= uid < got.uid + got.size, (uid, got)
            assert not got.gid <= gid < got.gid + got.size, (gid, got)
        with pytest.raises(SandboxError):
            idmap.take(rng, wait=0)
    finally:
        for fd in held:
            os.close(fd)


def test_no_sandbox_range_is_the_helpers_one_in_a_small_block(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every range of a three-range block handed out: the helpers' is never one."""
    from agentkernel import idmap
    from agentkernel.errors import SandboxError

    slots = tmp_path / "ids"
    slots.mkdir(mode=0o700)
    block = idmap.HostRange(0x70000000, 0x70000000, 3 * idmap.RANGE_SIZE)
    monkeypatch.setattr(idmap, "SLOTS_DIR", str(slots))
    monkeypatch.setattr(idmap, "host_range", lambda: block)
    helper = idmap.helper_range()
    assert helper is not None
    held: list[int] = []
    try:
        for _ in range(2):
            got, fd = idmap.allocate()
            held.append(fd)
            assert got.uid != helper.uid and got.gid != helper.gid, (got, helper)
        with pytest.raises(SandboxError, match="in use"):
            idmap.allocate()
    finally:
        for fd in held:
            os.close(fd)
