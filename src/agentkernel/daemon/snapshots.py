"""Snapshots of persistent sandboxes: take, list, delete, restore."""

# mypy: disable-error-code="misc"
# (the mixin's `self` is the SandboxManager that composes it, a subclass, not a supertype)

from __future__ import annotations

import secrets
import subprocess
import time
import uuid as uuid_mod
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import Conflict, NotFound, SandboxError
from ..names import validate_sandbox_name
from . import records
from .api import SandboxInfo, SnapshotInfo
from .common import _facts, _now, rfc3339
from .containers import (
    ENGINE_SNAPSHOT_KEY,
    _engine,
    _engine_commit,
    _engine_snapshot_remove,
)

if TYPE_CHECKING:
    from .manager import SandboxManager
    from .store import SandboxRow, SnapshotRow


class SnapshotsMixin:
    """SandboxManager's snapshots (a mixin: the manager is `self`; manager.py composes them)."""

    def _snap_dir(self: SandboxManager) -> Path:
        path = self.root / "snapshots"
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    @staticmethod
    def _snap_info(row: SnapshotRow) -> SnapshotInfo:
        doc = row["spec"]
        cpus = doc.get("cpus")
        return SnapshotInfo(name=row["name"], sandbox=row["sandbox"],
                            image_tag=f"agentkernel-snapshot:{row['name']}",
                            backend=row["backend"], created_at=rfc3339(row["created"]) or "",
                            base_image=row["image"],
                            vcpus=max(1, round(cpus)) if cpus else None,
                            memory_mb=doc.get("memory_mb"))

    def snapshot(self: SandboxManager, name: str, snapshot_name: str | None = None) -> SnapshotInfo:
        snap = snapshot_name or f"{name}-{time.strftime('%Y%m%d%H%M%S')}"
        validate_sandbox_name(snap)
        with self._name_lock(name):
            row = self._row(name)
            if _engine(row["backend"]) is not None:  # the engine's `commit`: an image
                if self.store.snapshot_exists(snap):
                    raise Conflict(f"snapshot {snap!r} already exists")
                self._save_snapshot(name, row, snap, _engine_commit(row["backend"], name, snap))
                return self.get_snapshot(snap)
            facts = _facts(row["backend"])
            if not facts.snapshots:
                raise Conflict(f"the {row['backend']} backend cannot snapshot a sandbox's "
                               f"filesystem ({facts.snapshot_refusal})")
            if self.store.snapshot_exists(snap):
                raise Conflict(f"snapshot {snap!r} already exists")
            target = self._snap_dir() / f"{snap}.tar"
            tmp = target.with_suffix(".tmp")
            state = self._layers_dir(name)
            members = [m for m in ("layers", "dirs") if (state / m).exists()]
            # GNU tar keeps overlayfs whiteouts (0/0 devices) and opaque-dir xattrs.
            # --sparse: a hole takes no room in the sandbox's quota, whatever its size
            # (`truncate -s 16T`); read as zeros it filled the host's disk here.
            argv = ["tar", "--sparse", "--xattrs", "--xattrs-include=user.*",
                    "--xattrs-include=trusted.*", "--exclude=./layers/*/work", "-C",
                    str(state), "-cf", str(tmp), *[f"./{m}" for m in members]]
            proc = subprocess.run(argv, capture_output=True, check=False, timeout=600)
            if proc.returncode not in (0, 1):  # 1: a file changed while read (running)
                tmp.unlink(missing_ok=True)
                raise SandboxError("snapshot failed: " +
                                   proc.stderr.decode(errors="replace").strip()[-300:])
            tmp.rename(target)
            self._save_snapshot(name, row, snap, str(target))
        return self.get_snapshot(snap)

    def _save_snapshot(self: SandboxManager, name: str, row: SandboxRow, snap: str,
                       path: str) -> None:
        self.store.add_snapshot(name=snap, sandbox=name, image=row["image"],
                                backend=row["backend"], profile=row["profile"],
                                spec=row["spec"], created=_now(), path=path)
        records.save_snapshot(self.store, snap, self._snap_dir())
        self._audit(name, "snapshot_taken", snapshot=snap)

    def snapshots(self: SandboxManager) -> list[SnapshotInfo]:
        return [self._snap_info(r) for r in self.store.snapshots()]

    def _snap_row(self: SandboxManager, snapshot_name: str) -> SnapshotRow:
        validate_sandbox_name(snapshot_name)
        row = self.store.snapshot(snapshot_name)
        if row is None:
            raise NotFound(f"snapshot {snapshot_name!r} not found")
        return row

    def get_snapshot(self: SandboxManager, snapshot_name: str) -> SnapshotInfo:
        return self._snap_info(self._snap_row(snapshot_name))

    def delete_snapshot(self: SandboxManager, snapshot_name: str) -> None:
        row = self._snap_row(snapshot_name)
        self.store.delete_snapshot(snapshot_name)
        if not _engine_snapshot_remove(row["backend"], row["path"]):
            Path(row["path"]).unlink(missing_ok=True)
        (self._snap_dir() / f"{snapshot_name}.json").unlink(missing_ok=True)

    def restore_snapshot(self: SandboxManager, snapshot_name: str,
                         new_name: str | None = None) -> SandboxInfo:
        """A new sandbox from a snapshot: named after its original sandbox if that name is
        free, else after the snapshot, else `<snapshot>-<hex>`."""
        row = self._snap_row(snapshot_name)
        candidates = [new_name] if new_name else [row["sandbox"], snapshot_name,
                                                 f"{snapshot_name[:50]}-{secrets.token_hex(3)}"]
        for name in candidates:
            validate_sandbox_name(name)
            with self._name_lock(name):
                if self.store.sandbox_exists(name):
                    if new_name:
                        raise Conflict(f"sandbox {name!r} already exists")
                    continue
                return self._restore_into(name, row)
        raise Conflict("no free name to restore the snapshot into")

    def _restore_into(self: SandboxManager, name: str, snap: SnapshotRow) -> SandboxInfo:
        state_dir = self._state_dir(name)
        if state_dir.exists():
            self._wipe_state(state_dir)
        state_dir.mkdir(mode=0o700, parents=True)
        spec_doc = snap["spec"]
        if _engine(snap["backend"]) is not None:  # an engine's image: no layers of ours
            spec_doc = {**spec_doc, ENGINE_SNAPSHOT_KEY: snap["path"]}
            proc: subprocess.CompletedProcess[bytes] = subprocess.CompletedProcess([], 0)
        else:
            try:
                self._attach_disk(name, snap["spec"])
            except BaseException:
                self._wipe_state(state_dir)
                raise
            proc = subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "-C",
                                   str(self._layers_dir(name)), "-xf", snap["path"]],
                                  capture_output=True, check=False, timeout=600)
        if proc.returncode != 0:
            self._wipe_state(state_dir)
            raise SandboxError("restore failed: " +
                               proc.stderr.decode(errors="replace").strip()[-300:])
        backend = self._backend(snap["backend"])
        self.store.add_sandbox(
            name=name, uuid=str(uuid_mod.uuid4()), backend=backend.name,
            isolation=backend.isolation, image=snap["image"], profile=snap["profile"],
            spec=spec_doc, created=_now(), expires=None, state_dir=str(state_dir))
        self._saved(name)
        self._audit(name, "sandbox_restored", snapshot=snap["name"])
        try:
            self._start_live(name)
        except BaseException:
            self.store.delete_sandbox(name)
            self._wipe_state(state_dir)
            raise
        return self.get(name)
