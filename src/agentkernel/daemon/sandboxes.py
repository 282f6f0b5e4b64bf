"""Persistent sandboxes: create, get, list, start, stop, remove, extend; audit log."""

# mypy: disable-error-code="misc"
# (the mixin's `self` is the SandboxManager that composes it, a subclass, not a supertype)

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid as uuid_mod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import procs
from ..errors import Conflict, NotFound, UsageError
from ..names import validate_sandbox_name
from .api import CreateRequest, SandboxInfo
from .common import _facts, _now, _user, rfc3339
from .containers import _remove_container
from .handles import Live
from .store import SandboxRow

if TYPE_CHECKING:
    from .manager import SandboxManager


class SandboxesMixin:
    """SandboxManager's sandboxes (a mixin: the manager is `self`; manager.py composes them)."""

    def create(self: SandboxManager, req: CreateRequest) -> SandboxInfo:
        return self.create_warned(req)[0]

    def create_warned(self: SandboxManager,
                      req: CreateRequest) -> tuple[SandboxInfo, list[str]]:
        """`create`, and its plan's warnings (the project file's among them), for the
        CLI to print as a run in-process does."""
        from ..planner import RunRequest as PlanRequest

        validate_sandbox_name(req.name)
        if req.ttl_seconds is not None and req.ttl_seconds <= 0:
            raise UsageError("ttl must be a positive number of seconds")
        for key in req.env:
            if not key or "=" in key or "\0" in key or "\0" in req.env[key]:
                raise UsageError(f"invalid environment variable {key!r}")
        workspace: Path | None = None
        if req.workdir_source:
            workspace = Path(req.workdir_source)
            if not workspace.is_absolute():
                raise UsageError("the project dir must be an absolute path")
            if not workspace.is_dir():
                raise NotFound(f"project dir {req.workdir_source} does not exist")
        cpus = req.cpus if req.cpus is not None else (float(req.vcpus) if req.vcpus else None)
        ctx = self._context(req.caller_env, req.user_config)
        with self._name_lock(req.name):
            if self.store.sandbox_exists(req.name):
                raise Conflict(f"sandbox {req.name!r} already exists")
            plan = self._plan(PlanRequest(
                argv=[], cwd=workspace, image=req.image, profile=req.profile,
                backend=req.backend, memory_mb=req.memory_mb, pids=req.pids, cpus=cpus,
                allow_hosts=tuple(req.allow_hosts), deny_hosts=tuple(req.deny_hosts),
                add_hosts=tuple(req.add_hosts), secrets=tuple(req.secrets),
                env=dict(req.env), agent=req.agent,
                registry_public_only=req.registry_public_only is True),
                ctx, persistent=True)
            backend, profile, image = plan.backend, plan.profile, plan.image
            doc = {
                "image": image, "rootfs": plan.rootfs_key,
                "profile": profile.name, "backend": backend.name,
                "memory_mb": profile.memory_mb, "cpus": profile.cpus,
                "no_network": profile.network == "none",
                "workspace": str(workspace) if workspace else None,
                # The request's -e (an agent's variables under them), with the secrets'
                # placeholders: their values are read from the store at each start.
                "env": {**plan.user_env, **plan.secret_env}, "host_env": dict(plan.pass_env),
                "home": str(plan.home) if plan.home else None,
                "registry": plan.registry.to_doc() if plan.registry else None,
                "profile_fields": profile._asdict(), "rootfs_note": plan.rootfs_note,
                # A microVM's writable disks are images of a fixed size already.
                "disk_mb": None if backend.sized_disks else self._disk_mb(plan.config),
                # egress_policy: the policy it was created with (its secrets by name)
                "egress": plan.egress.to_json() if plan.egress is not None else None,
                "agent": req.agent, "ro_binds": [list(b) for b in plan.ro_binds],
                "workspace_at": plan.workspace_at,  # an agent's project: its own path
                "user": list(plan.user) if plan.user is not None else None,  # an agent's
            }
            uid = str(uuid_mod.uuid4())
            state_dir = self._state_dir(req.name)
            if state_dir.exists():
                self._wipe_state(state_dir)  # left by a crash between insert and cleanup
            state_dir.mkdir(mode=0o700, parents=True)
            try:
                self._attach_disk(req.name, doc)
            except BaseException:
                self._wipe_state(state_dir)
                raise
            created = _now()
            expires = created + req.ttl_seconds if req.ttl_seconds else None
            self.store.add_sandbox(
                name=req.name, uuid=uid, backend=backend.name, isolation=backend.isolation,
                image=image, profile=profile.name, spec=doc, created=created,
                expires=expires, state_dir=str(state_dir))
            self._saved(req.name)
            self._audit(req.name, "sandbox_created", image=image, backend=backend.name,
                        profile=profile.name)
            try:
                self._start_live(req.name)
            except BaseException:
                self.store.delete_sandbox(req.name)
                self._wipe_state(state_dir)
                raise
            return self.get(req.name), list(plan.warnings)

    def _row(self: SandboxManager, name: str) -> SandboxRow:
        validate_sandbox_name(name)
        row = self.store.sandbox(name)
        if row is None:
            raise NotFound(f"sandbox {name!r} not found")
        return row

    def _info(self: SandboxManager, row: SandboxRow) -> SandboxInfo:
        doc = row["spec"]
        cpus = doc.get("cpus")
        return SandboxInfo(
            name=row["name"], uuid=row["uuid"], status=row["status"], backend=row["backend"],
            isolation=row["isolation"], image=row["image"], profile=row["profile"],
            vcpus=max(1, round(cpus)) if cpus else None, memory_mb=doc.get("memory_mb"),
            created_at=rfc3339(row["created"]) or "", expires_at=rfc3339(row["expires"]),
            rootfs=str(doc.get("rootfs_note") or ""), agent=doc.get("agent"))

    def get(self: SandboxManager, name: str) -> SandboxInfo:
        return self._info(self._row(name))

    def get_by_uuid(self: SandboxManager, uuid: str) -> SandboxInfo:
        row = self.store.sandbox_by_uuid(str(uuid))
        if row is None:
            raise NotFound(f"no sandbox with uuid {str(uuid)[:64]!r}")
        return self._info(row)

    def list_sandboxes(self: SandboxManager) -> list[SandboxInfo]:
        return [self._info(r) for r in self.store.sandboxes()]

    def _start_live(self: SandboxManager, name: str) -> Live:
        row = self._row(name)
        doc = row["spec"]
        res = self._resolve(name, doc)
        self._cleanup_dead(name, row["backend"], row["scratch"], row["pid"], row["pid_start"],
                           row["helpers"])
        self._attach_disk(name, doc)  # mounted again after a reboot
        sandbox = res.backend.start(res.spec)
        pid = sandbox.process.pid
        live = Live(name, sandbox.backend, sandbox.client, sandbox.scratch, pid,
                    procs.start_time(pid),
                    [(h.pid, procs.start_time(h.pid)) for h in sandbox.helpers], sandbox)
        try:
            self.store.set_running(name, pid=pid, pid_start=live.pid_start,
                                   helpers=live.helpers, scratch=str(sandbox.scratch),
                                   isolation=sandbox.isolation)
        except BaseException:
            sandbox.destroy()  # not written down, it would run on unmanaged
            raise
        self._saved(name)
        with self._lock:
            self._live[name] = live
        self._audit(name, "sandbox_started", profile=res.spec.profile.name,
                    backend=sandbox.backend)
        return live

    def start(self: SandboxManager, name: str) -> SandboxInfo:
        with self._name_lock(name):
            row = self._row(name)
            with self._lock:
                live = self._live.get(name)
            if row["status"] == "running" and live is not None and live.client.alive:
                return self._info(row)
            if live is not None:
                self._teardown(live)
            self._start_live(name)
            return self.get(name)

    def stop(self: SandboxManager, name: str) -> SandboxInfo:
        with self._name_lock(name):
            row = self._row(name)
            if not _facts(row["backend"]).stoppable:
                raise Conflict(
                    f"sandbox {name!r} runs on the {row['backend']} backend, which keeps its "
                    "filesystem in memory: stopping it would lose it (remove it instead)")
            self._stop_locked(name, row)
            self._audit(name, "sandbox_stopped")
            return self.get(name)

    def _stop_locked(self: SandboxManager, name: str, row: SandboxRow) -> None:
        with self._lock:
            live = self._live.pop(name, None)
        if live is not None:
            self._teardown(live)
            self._record_stopped(name)
        else:
            self._mark_dead_stopped(name, row)

    def _mark_dead_stopped(self: SandboxManager, name: str, row: SandboxRow) -> None:
        """A sandbox whose processes are gone: clean up after it and record it stopped."""
        self._cleanup_dead(name, row["backend"], row["scratch"], row["pid"],
                           row["pid_start"], row["helpers"])
        self._record_stopped(name)

    def _record_stopped(self: SandboxManager, name: str) -> None:
        """Stopped in the database (no processes, no scratch); its detached commands fail."""
        self.store.set_stopped(name)
        self._saved(name)
        self._fail_detached(name)

    def _teardown(self: SandboxManager, live: Live) -> None:
        """Everything of a running sandbox goes: commands, processes, cgroups, scratch."""
        for handle in list(live.execs):
            handle.kill()  # its client is told how the command ended, not cut off
        if live.sandbox is not None:
            live.sandbox.destroy()
            return
        with contextlib.suppress(Exception):
            if live.client.alive:
                live.client.shutdown()
        live.client.close()
        # Let it end by itself first (a VM's guest has synced its disks once it answered).
        deadline = time.monotonic() + 2.0
        while procs.alive(live.pid, live.pid_start) and time.monotonic() < deadline:
            time.sleep(0.01)
        self._cleanup_dead(live.name, live.backend, str(live.scratch), live.pid,
                           live.pid_start, list(live.helpers))

    def remove(self: SandboxManager, name: str) -> None:
        with self._name_lock(name):
            row = self._row(name)
            self._stop_locked(name, row)
            self.store.delete_detached_of(name)
            self.store.delete_sandbox(name)
            self._wipe_state(Path(row["state_dir"]))
            _remove_container(row["backend"], name)
        with self._lock:
            self._name_locks.pop(name, None)

    def extend(self: SandboxManager, name: str, seconds: float) -> str | None:
        if not seconds or seconds <= 0:
            raise UsageError("extend needs a positive number of seconds")
        with self._name_lock(name):
            row = self._row(name)
            base = max(_now(), row["expires"] or _now())
            expires = base + seconds
            self.store.set_expires(name, expires)
            self._saved(name)
            self._audit(name, "ttl_extended", expires_at=rfc3339(expires))
            return rfc3339(expires)

    def _audit(self: SandboxManager, name: str, event: str, **fields: Any) -> None:
        entry = {"timestamp": rfc3339(_now()), "pid": os.getpid(), "user": _user(),
                 "type": event, "sandbox": name, **fields}
        with contextlib.suppress(OSError):
            path = self._state_dir(name)
            if path.is_dir():
                with open(path / "audit.jsonl", "a") as f:
                    f.write(json.dumps(entry) + "\n")

    def egress_log(self: SandboxManager, name: str) -> list[dict[str, object]]:
        """The sandbox's egress decisions (time, host, port, rule, bytes) from the host's
        audit log: what its gates saw across restarts, bounded (egress_audit)."""
        from ..egress_audit import read_audit

        # Its own entries only: not those of an earlier sandbox that had its name.
        return read_audit(name, instance=self._row(name)["uuid"])

    def logs(self: SandboxManager, name: str) -> list[dict[str, object]]:
        self._row(name)
        entries: list[dict[str, object]] = []
        with contextlib.suppress(OSError), open(self._state_dir(name) / "audit.jsonl") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    item = json.loads(line)
                    if isinstance(item, dict):
                        entries.append(item)
        return entries
