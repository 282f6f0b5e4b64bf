"""A small SandboxService over REAL persistent sandboxes, for the API tests until the
daemon's SandboxManager exists (namespaces backend, host userland; nothing is mocked)."""

from __future__ import annotations

import secrets
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from agentkernel.daemon.api import (
    BackendInfo,
    CreateRequest,
    DetachedInfo,
    ExecRequest,
    ExecResult,
    OnOutput,
    PoolKeyStatus,
    RunRequest,
    SandboxInfo,
    SnapshotInfo,
)
from agentkernel.errors import Conflict, NotFound
from agentkernel.sandbox import Sandbox

ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
CAPS = {"snapshots": True, "attach": False, "mount_cwd": True}


def _now() -> str:
    return datetime.now(UTC).isoformat()


@dataclass
class _Detached:
    info: DetachedInfo
    out: bytearray = field(default_factory=bytearray)
    err: bytearray = field(default_factory=bytearray)
    kill: object = None


@dataclass
class _Box:
    info: SandboxInfo
    sandbox: Sandbox
    detached: dict[str, _Detached] = field(default_factory=dict)
    log: list[dict[str, object]] = field(default_factory=list)


class StandInService:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._boxes: dict[str, _Box] = {}
        self._snaps: dict[str, tuple[SnapshotInfo, bytes]] = {}

    # -- helpers --
    def _start(self, name: str) -> Sandbox:
        from agentkernel.backends import get_backend
        from agentkernel.profiles import get_profile
        from agentkernel.rootfs import host_rootfs
        from agentkernel.sandbox import SandboxSpec

        spec = SandboxSpec(name=name, profile=get_profile("moderate"), rootfs=host_rootfs(),
                           image="host", persistent=True)
        return get_backend("namespaces").start(spec)

    def _box(self, name: str) -> _Box:
        with self._lock:
            box = self._boxes.get(name)
        if box is None:
            raise NotFound(f"sandbox {name!r} not found")
        return box

    @staticmethod
    def _exec(sb: Sandbox, req: ExecRequest, on_output: OnOutput | None) -> ExecResult:
        from agentkernel.errors import AgentRequestError

        try:
            execution = sb.client.exec(req.argv, env={**ENV, **req.env},
                                       cwd=req.workdir or "/root", timeout=req.timeout)
        except AgentRequestError as exc:  # as the manager: not found/executable is a result
            if exc.exit_code not in (126, 127):
                raise
            return ExecResult(exc.exit_code, b"", b"", message=exc.message)
        out, err = bytearray(), bytearray()
        for kind, payload in execution.events():
            if isinstance(payload, bytes):
                (out if kind == "stdout" else err).extend(payload)
                if on_output is not None:
                    on_output(kind, payload)  # type: ignore[arg-type]
            else:
                return ExecResult(payload.shell_code, bytes(out), bytes(err), payload.signal,
                                  payload.timed_out)
        raise AssertionError("no exit")

    # -- sandboxes --
    def create(self, req: CreateRequest) -> SandboxInfo:
        with self._lock:
            if req.name in self._boxes:
                raise Conflict(f"sandbox {req.name!r} exists already")
            self._boxes[req.name] = None  # type: ignore[assignment]
        try:
            sb = self._start(req.name)
        except BaseException:
            with self._lock:
                del self._boxes[req.name]
            raise
        expires = None
        if req.ttl_seconds:
            expires = (datetime.now(UTC) + timedelta(seconds=req.ttl_seconds)).isoformat()
        info = SandboxInfo(name=req.name, uuid=str(uuidlib.uuid4()), status="running",
                           backend=sb.backend, isolation=sb.isolation, image=req.image or "host",
                           profile=req.profile or "moderate", vcpus=req.vcpus,
                           memory_mb=req.memory_mb, created_at=_now(), expires_at=expires)
        with self._lock:
            self._boxes[req.name] = _Box(info, sb)
        return info

    def get(self, name: str) -> SandboxInfo:
        return self._box(name).info

    def get_by_uuid(self, uuid: str) -> SandboxInfo:
        with self._lock:
            for box in self._boxes.values():
                if box is not None and box.info.uuid == uuid:
                    return box.info
        raise NotFound(f"no sandbox with uuid {uuid}")

    def list_sandboxes(self) -> list[SandboxInfo]:
        with self._lock:
            return [b.info for b in self._boxes.values() if b is not None]

    def start(self, name: str) -> SandboxInfo:
        return self._box(name).info

    def stop(self, name: str) -> SandboxInfo:
        raise Conflict("stop is not supported by the stand-in")

    def remove(self, name: str) -> None:
        box = self._box(name)
        with self._lock:
            self._boxes.pop(name, None)
        box.sandbox.destroy()

    def extend(self, name: str, seconds: float) -> str | None:
        box = self._box(name)
        base = datetime.fromisoformat(box.info.expires_at) if box.info.expires_at else \
            datetime.now(UTC)
        box.info.expires_at = (base + timedelta(seconds=seconds)).isoformat()
        return box.info.expires_at

    # -- commands --
    def exec(self, name: str, req: ExecRequest, on_output: OnOutput | None = None) -> ExecResult:
        box = self._box(name)
        box.log.append({"ts": _now(), "event": "exec", "command": req.argv})
        return self._exec(box.sandbox, req, on_output)

    def run(self, req: RunRequest, on_output: OnOutput | None = None) -> ExecResult:
        sb = self._start(f"run-{secrets.token_hex(4)}")
        try:
            return self._exec(sb, ExecRequest(req.argv, req.env, req.workdir, req.timeout),
                              on_output)
        finally:
            sb.destroy()

    def exec_detached(self, name: str, req: ExecRequest) -> DetachedInfo:
        box = self._box(name)
        execution = box.sandbox.client.exec(req.argv, env={**ENV, **req.env},
                                            cwd=req.workdir or "/root")
        cmd_id = secrets.token_hex(6)
        det = _Detached(DetachedInfo(cmd_id, name, req.argv, execution.pid, "running", _now()))
        det.kill = execution.kill

        def pump() -> None:
            for kind, payload in execution.events():
                if isinstance(payload, bytes):
                    (det.out if kind == "stdout" else det.err).extend(payload)
                else:
                    det.info.exit_code = payload.shell_code
                    det.info.status = "completed" if payload.shell_code == 0 else "failed"

        threading.Thread(target=pump, daemon=True).start()
        box.detached[cmd_id] = det
        return det.info

    def _det(self, name: str, cmd_id: str) -> _Detached:
        det = self._box(name).detached.get(cmd_id)
        if det is None:
            raise NotFound(f"no detached command {cmd_id}")
        return det

    def detached_list(self, name: str) -> list[DetachedInfo]:
        return [d.info for d in self._box(name).detached.values()]

    def detached_status(self, name: str, cmd_id: str) -> DetachedInfo:
        return self._det(name, cmd_id).info

    def detached_logs(self, name: str, cmd_id: str) -> tuple[bytes, bytes]:
        det = self._det(name, cmd_id)
        return bytes(det.out), bytes(det.err)

    def detached_kill(self, name: str, cmd_id: str) -> None:
        det = self._det(name, cmd_id)
        if det.info.status == "running":
            det.kill()  # type: ignore[operator]
            for _ in range(200):
                if det.info.status != "running":
                    break
                time.sleep(0.01)

    def logs(self, name: str) -> list[dict[str, object]]:
        return list(self._box(name).log)

    # -- files --
    def read_file(self, name: str, path: str) -> bytes:
        from agentkernel.errors import AgentRequestError

        try:
            return self._box(name).sandbox.client.read_file(path)
        except AgentRequestError as exc:
            raise NotFound(exc.message) from None

    def write_file(self, name: str, path: str, data: bytes, mode: int = 0o644) -> int:
        return self._box(name).sandbox.client.write_file(path, data, mode=mode, mkdirs=True)

    def delete_file(self, name: str, path: str) -> None:
        from agentkernel.errors import AgentRequestError

        try:
            self._box(name).sandbox.client.remove(path)
        except AgentRequestError as exc:
            raise NotFound(exc.message) from None

    # -- snapshots: a tar of /tmp, restored into a fresh sandbox --
    def snapshot(self, name: str, snapshot_name: str | None = None) -> SnapshotInfo:
        box = self._box(name)
        snap = snapshot_name or f"{name}-{secrets.token_hex(3)}"
        if snap in self._snaps:
            raise Conflict(f"snapshot {snap!r} exists already")
        res = self._exec(box.sandbox, ExecRequest(["tar", "-C", "/", "-cf", "-", "tmp"]), None)
        info = SnapshotInfo(snap, name, f"snapshot:{snap}", box.info.backend, _now(),
                            box.info.image)
        self._snaps[snap] = (info, res.stdout)
        return info

    def snapshots(self) -> list[SnapshotInfo]:
        return [s for s, _ in self._snaps.values()]

    def get_snapshot(self, snapshot_name: str) -> SnapshotInfo:
        if snapshot_name not in self._snaps:
            raise NotFound(f"snapshot {snapshot_name!r} not found")
        return self._snaps[snapshot_name][0]

    def delete_snapshot(self, snapshot_name: str) -> None:
        self.get_snapshot(snapshot_name)
        del self._snaps[snapshot_name]

    def restore_snapshot(self, snapshot_name: str) -> SandboxInfo:
        info, data = self._snaps.get(snapshot_name) or (None, b"")
        if info is None:
            raise NotFound(f"snapshot {snapshot_name!r} not found")
        new = f"{snapshot_name}-restored"
        restored = self.create(CreateRequest(name=new))
        sb = self._box(new).sandbox
        sb.client.write_file("/tmp/.snap.tar", data)
        self._exec(sb, ExecRequest(["tar", "-C", "/", "-xf", "/tmp/.snap.tar"]), None)
        return restored

    # -- host --
    def backends(self) -> list[BackendInfo]:
        return [BackendInfo("namespaces", True, True, "ready", "Linux namespaces",
                            dict(CAPS))]

    def pool_status(self) -> list[PoolKeyStatus]:
        return []

    def close(self) -> None:
        for box in list(self._boxes.values()):
            if box is not None:
                box.sandbox.destroy()
        self._boxes.clear()
