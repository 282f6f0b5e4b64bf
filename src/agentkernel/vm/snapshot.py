"""MicroVM snapshots (QEMU): boot one template VM per shape, save it, start clones from it.

A template is booted to agent-ready with the very argv a clone will get (only host-side
paths differ: chardev socket, serial log, per-sandbox disk files), stopped, and saved with
QMP `migrate` to an fd we pass in (`getfd`; QEMU's seccomp sandbox forbids `exec:`). A clone
is the same argv plus `-incoming fd:N` (the saved file) and a QMP socket: QEMU loads the
state and stays paused because the template was paused; we connect the agent channel, then
`cont`. The host then sends the agent a CLONE request (fresh entropy, host name, wall clock,
per-sandbox disks to mount): see docs/protocol.md and docs/microvm.md.

What the template must not contain: anything sandbox-specific. Its agent has a generic host
name, no project disk mounted (the slot is attached, empty, and mounted by CLONE), and its
writable layer is an empty tmpfs in guest RAM, so every clone starts from the same clean
upper layer.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import SandboxError
from ..paths import data_dir
from . import qemu as q

TEMPLATE_HOSTNAME = "ak-template"
# Per-sandbox disks are attached to the template as empty sparse files of this size, and a
# clone's disk file is extended (sparse) to the same size: the guest saw that capacity.
SLOT_BYTES = 16 * 1024 * 1024 * 1024
KEEP_TEMPLATES = 6  # newest saved templates kept; older ones are removed
STATE_SUFFIX = ".state"


class SnapshotError(SandboxError):
    """A template VM could not be saved or a clone could not be restored."""


def snapshots_dir() -> Path:
    path = data_dir() / "microvm" / "snapshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _file_id(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return f"{path}:missing"
    return f"{path}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def placeholder_config(cfg: q.VmConfig, slots: frozenset[str]) -> q.VmConfig:
    """`cfg` with its per-instance host paths replaced by fixed names (for the key)."""
    drives = [q.Drive(Path(f"/slot/{d.serial}") if d.serial in slots else d.path, d.serial,
                      d.readonly) for d in cfg.drives]
    return dataclasses.replace(cfg, serial_log=Path("/serial.log"),
                               agent_socket=Path("/agent.sock"), drives=drives)


def template_key(qemu: str, cfg: q.VmConfig, slots: frozenset[str]) -> str:
    """Everything that shapes a template: the QEMU binary, kernel, initramfs, root disk and
    the whole argv (VM size, devices, network mode, kernel and agent command line)."""
    parts = ["v1", _file_id(Path(qemu)), _file_id(cfg.kernel), _file_id(cfg.initrd)]
    parts += [_file_id(d.path) for d in cfg.drives if d.serial not in slots]
    parts += q.build_argv(qemu, placeholder_config(cfg, slots))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


# ---- QMP ----


class Qmp:
    """A minimal QMP client on a unix socket (one command at a time; events skipped)."""

    def __init__(self, path: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise SnapshotError(f"QEMU exited with status {proc.returncode}")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise SnapshotError("QEMU's QMP socket did not appear") from None
                time.sleep(0.005)
        sock.settimeout(timeout)
        self._sock = sock
        self._buf = b""
        greeting = self._read()
        if "QMP" not in greeting:
            raise SnapshotError(f"not a QMP greeting: {greeting}")
        self.command("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise SnapshotError("QMP connection closed")
            self._buf += chunk
            if len(self._buf) > 1 << 20:
                raise SnapshotError("QMP reply too long")
        line, _, self._buf = self._buf.partition(b"\n")
        doc = json.loads(line)
        if not isinstance(doc, dict):
            raise SnapshotError("QMP sent a non-object")
        return doc

    def command(self, name: str, args: dict[str, Any] | None = None,
                fds: list[int] | None = None) -> Any:
        msg = {"execute": name, **({"arguments": args} if args else {})}
        data = json.dumps(msg).encode() + b"\n"
        if fds:
            self._sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                         array.array("i", fds))])
        else:
            self._sock.sendall(data)
        while True:
            reply = self._read()
            if "event" in reply:
                continue
            if "error" in reply:
                err = reply["error"]
                raise SnapshotError(f"QMP {name}: {err.get('desc', err)}")
            return reply.get("return")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


# ---- the template ----


def _prune(keep: int) -> None:
    states = sorted(snapshots_dir().glob(f"*{STATE_SUFFIX}"), key=lambda p: p.stat().st_mtime,
                    reverse=True)
    for old in states[keep:]:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
        old.with_suffix(".lock").unlink(missing_ok=True)


def discard(state: Path) -> None:
    """Forget a saved template that failed to restore; the next start builds it again."""
    state.unlink(missing_ok=True)
    state.with_suffix(".json").unlink(missing_ok=True)


def ensure_template(qemu: str, cfg: q.VmConfig, slots: frozenset[str], *,
                    prefix: Callable[[], list[str]], timeout: float,
                    uid: int | None = None) -> Path:
    """The saved state for `cfg`'s shape: booted, stopped and saved once, then cached.

    `cfg` is the clone's config; the template gets the same one with its own scratch paths
    and empty sparse files for the disks named in `slots`. `prefix` gives the argv prefix
    the template QEMU runs under (an empty network namespace, its ids); `uid` the one it
    drops to there (default `q.vmm_uid()`), owner of what it reopens by /proc/self/fd.
    Concurrent callers wait on a lock file.
    """
    key = template_key(qemu, cfg, slots)
    state = snapshots_dir() / f"{key}{STATE_SUFFIX}"
    if state.is_file():
        return state
    with open(snapshots_dir() / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if state.is_file():
                return state
            _build_template(qemu, cfg, slots, state, prefix(), timeout,
                            q.vmm_uid() if uid is None else uid)
            _prune(KEEP_TEMPLATES)
        finally:
            # The lock file stays (removing it would let a third caller lock a new inode
            # while a second one still waits on the old); _prune removes it with its state.
            fcntl.flock(lock, fcntl.LOCK_UN)
    return state


def _build_template(qemu: str, cfg: q.VmConfig, slots: frozenset[str], state: Path,
                    prefix: list[str], timeout: float, uid: int | None) -> None:
    from ..agent.client import AgentClient

    tmp = Path(tempfile.mkdtemp(prefix=".template-", dir=snapshots_dir()))
    proc: subprocess.Popen[bytes] | None = None
    client: AgentClient | None = None
    qmp: Qmp | None = None
    try:
        drives = []
        for d in cfg.drives:
            if d.serial in slots:
                slot = tmp / f"{d.serial}.img"
                with open(slot, "wb") as f:
                    f.truncate(SLOT_BYTES)
                drives.append(q.Drive(slot, d.serial, d.readonly))
            else:
                drives.append(d)
        tcfg = dataclasses.replace(cfg, serial_log=tmp / "console.log",
                                   agent_socket=tmp / "agent.sock", drives=drives)
        qmp_path = tmp / "qmp.sock"
        handles = (q.Handles.open(tcfg, uid, {"qmp": qmp_path}) if uid is not None else None)
        argv = [*prefix, *q.build_argv(qemu, tcfg, handles), *qmp_args(qmp_path, handles)]
        started = time.monotonic()
        try:
            with open(tmp / "qemu.log", "wb") as log:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
                    start_new_session=True, pass_fds=handles.pass_fds if handles else (),
                    env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        finally:
            if handles is not None:
                handles.close()
        try:
            sock = q.connect_agent_socket(tcfg.agent_socket, proc, timeout)
        except (ConnectionError, TimeoutError) as exc:
            raise SnapshotError(f"the template VM did not boot: {exc}; "
                                f"{_last_line(tmp)}") from None
        # The channel stays connected while the VM is saved: the guest's view of the port
        # ("host connected") is part of the state, and a clone connects before it runs.
        client = AgentClient.from_socket(sock)
        client.hello(timeout=15)
        booted = time.monotonic() - started
        qmp = Qmp(qmp_path, proc, 10)
        qmp.command("stop")
        out = tmp / "state"
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            qmp.command("getfd", {"fdname": "aksave"}, fds=[fd])
        finally:
            os.close(fd)
        qmp.command("migrate", {"uri": "fd:aksave"})
        deadline = time.monotonic() + max(timeout, 60)
        while True:
            info = qmp.command("query-migrate") or {}
            status = info.get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled") or time.monotonic() > deadline:
                raise SnapshotError(f"saving the template VM failed: "
                                    f"{info.get('error-desc', status or 'timeout')}")
            time.sleep(0.02)
        os.chmod(out, 0o600)
        meta = {"key": state.stem, "created": time.time(), "boot_seconds": round(booted, 3),
                "bytes": out.stat().st_size, "qemu": qemu, "accel": cfg.accel,
                "vcpus": cfg.vcpus, "memory_mb": cfg.memory_mb, "net": cfg.net,
                "slots": sorted(slots), "agent_args": cfg.agent_args}
        state.with_suffix(".json").write_text(json.dumps(meta, indent=2))
        out.replace(state)
    finally:
        if qmp is not None:
            qmp.close()
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if client is not None:
            client.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _last_line(scratch: Path) -> str:
    for name in ("qemu.log", "console.log"):
        try:
            lines = [ln for ln in (scratch / name).read_text(errors="replace").splitlines()
                     if ln.strip()]
        except OSError:
            continue
        if lines:
            return f"{name}: {lines[-1][:300]}"
    return "no output from the VMM or the guest"


# ---- clones ----


def clone_args(state_fd: int, qmp_path: Path, handles: q.Handles | None = None) -> list[str]:
    """What a clone adds to the template's argv: the saved state and a QMP socket."""
    return ["-incoming", f"fd:{state_fd}", *qmp_args(qmp_path, handles)]


def qmp_args(qmp_path: Path, handles: q.Handles | None) -> list[str]:
    return ["-chardev", q.socket_chardev("qmp", qmp_path, handles),
            "-mon", "chardev=qmp,mode=control"]


def fit_slot(image: Path) -> bool:
    """Give a per-sandbox disk file the template's slot size (sparse); False if too big."""
    size = image.stat().st_size
    if size > SLOT_BYTES:
        return False
    if size < SLOT_BYTES:
        with open(image, "r+b") as f:
            f.truncate(SLOT_BYTES)
    return True


def resume_clone(proc: subprocess.Popen[bytes], agent_socket: Path, qmp_path: Path,
                 timeout: float) -> socket.socket:
    """Connect to a restoring clone's agent channel, wait for the state to load, run it.

    The channel is connected before the guest runs, so the guest's port never sees the
    host go away (its agent would take that for the end of the session).
    """
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        while True:
            if proc.poll() is not None:
                raise SnapshotError(f"QEMU exited with status {proc.returncode} while "
                                    "restoring")
            try:
                sock.connect(str(agent_socket))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SnapshotError("the clone's agent socket did not appear") from None
                time.sleep(0.005)
        try:
            qmp = Qmp(qmp_path, proc, max(1.0, deadline - time.monotonic()))
        except OSError as exc:  # QEMU hung up: it could not load the state
            raise SnapshotError(f"restoring the snapshot failed: {exc}") from None
        try:
            while True:
                status = (qmp.command("query-status") or {}).get("status")
                if status == "paused":
                    break
                if status not in ("inmigrate", "prelaunch"):
                    raise SnapshotError(f"restoring the snapshot failed (VM is {status})")
                if time.monotonic() > deadline:
                    raise SnapshotError("restoring the snapshot timed out")
                time.sleep(0.005)
            qmp.command("cont")
        except OSError as exc:
            raise SnapshotError(f"restoring the snapshot failed: {exc}") from None
        finally:
            qmp.close()
    except BaseException:
        sock.close()
        raise
    return sock
