"""Each sandbox's own record on disk, beside its files: what rebuilds the state database.

state.db is the daemon's index; every row about a persistent sandbox is mirrored into its
state dir (`record.json`, and `exec/<id>.json` per detached command) and every snapshot's
row beside its tar (`<name>.json`). A damaged or truncated database is then rebuilt from
what is on disk, and a restored backup is brought up to date, so that no sandbox that
still exists (or still runs) is left unknown to the daemon. Writes are atomic and best
effort: a full disk must not fail the operation whose row was already written.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..names import validate_sandbox_name
from .store import COLUMNS, Store

RECORD = "record.json"
SANDBOX_COLUMNS = COLUMNS["sandboxes"][1]
DETACHED_COLUMNS = COLUMNS["detached"][1]
SNAPSHOT_COLUMNS = COLUMNS["snapshots"][1]


def _write(path: Path, row: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(row, f)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _read(path: Path, columns: tuple[str, ...]) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            row = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(row, dict) or not all(c in row for c in columns):
        return None
    return {c: row[c] for c in columns}


def save_sandbox(store: Store, name: str) -> None:
    """Mirror the sandbox's row into its state dir (nothing if it has neither)."""
    row = store.sandbox(name)
    if row is not None and Path(row["state_dir"]).is_dir():
        _write(Path(row["state_dir"]) / RECORD, row)


def save_detached(store: Store, cmd_id: str, exec_dir: Path) -> None:
    row = store.detached(cmd_id)
    if row is not None and exec_dir.is_dir():
        _write(exec_dir / f"{cmd_id}.json", row)


def save_snapshot(store: Store, name: str, snap_dir: Path) -> None:
    row = store.snapshot(name)
    if row is not None:
        _write(snap_dir / f"{name}.json", row)


def _valid_name(name: str) -> bool:
    try:
        validate_sandbox_name(name)
    except UsageError:
        return False
    return True


def reconcile(store: Store, root: Path) -> list[str]:
    """Bring the database in line with the records on disk; what was done, for the log.

    Rows missing from the database come back from the records. After a restore (a backup,
    or nothing at all) the records win over the rows, and rows whose sandbox has no state
    dir any more (removed since the backup) go.
    """
    replace = store.restored
    done: list[str] = []
    sandboxes = root / "sandboxes"
    for state_dir in sorted(sandboxes.iterdir()) if sandboxes.is_dir() else []:
        row = _read(state_dir / RECORD, SANDBOX_COLUMNS)
        if row is None or row["name"] != state_dir.name or not _valid_name(row["name"]):
            continue
        row["state_dir"] = str(state_dir)
        if store.upsert("sandboxes", row, replace):
            done.append(f"rebuilt the record of sandbox {row['name']} from {RECORD}")
        for rec in sorted((state_dir / "exec").glob("cmd-*.json")):
            cmd = _read(rec, DETACHED_COLUMNS)
            if cmd is not None and cmd["sandbox"] == row["name"]:
                store.upsert("detached", cmd, replace)
    if replace:
        for kept in store.sandboxes():
            if not Path(kept["state_dir"]).is_dir():
                store.delete_sandbox(kept["name"])
                store.delete_detached_of(kept["name"])
                done.append(f"dropped sandbox {kept['name']}: its files are gone")
    snapshots = root / "snapshots"
    for rec in sorted(snapshots.glob("*.json")) if snapshots.is_dir() else []:
        snap = _read(rec, SNAPSHOT_COLUMNS)
        if snap is not None and Path(snap["path"]).is_file() and \
                store.upsert("snapshots", snap, replace):
            done.append(f"rebuilt the record of snapshot {snap['name']}")
    return done
