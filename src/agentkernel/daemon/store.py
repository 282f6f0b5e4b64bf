"""The daemon's state tables in one place: their schema, a typed row per table, every query.

The manager's mixins read and write state only through `Store` (state.py keeps the
connection, its lock, the integrity check and the backups). Rows are TypedDicts of
decoded values: the JSON columns (`spec`, `helpers`, `command`) are stored as text and
turned into dicts and lists here, on the way in and out, and nowhere else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypedDict, cast

if TYPE_CHECKING:
    from .api import SandboxStatus
    from .state import StateDB

DetachedStatus = Literal["running", "completed", "failed"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    name TEXT PRIMARY KEY,
    uuid TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    backend TEXT NOT NULL,
    isolation TEXT NOT NULL,
    image TEXT NOT NULL,
    profile TEXT NOT NULL,
    spec TEXT NOT NULL,          -- JSON: what `start` needs to rebuild the sandbox
    created REAL NOT NULL,
    expires REAL,
    pid INTEGER,                 -- the backend process (bwrap / runsc) while running
    pid_start INTEGER,           -- its start time in clock ticks: guards against pid reuse
    helpers TEXT NOT NULL DEFAULT '[]',  -- JSON [[pid, start], ...] (slirp4netns, netns holder)
    scratch TEXT,
    state_dir TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ephemeral (   -- pool and one-shot sandboxes the daemon started
    name TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    scratch TEXT NOT NULL,
    pid INTEGER,
    pid_start INTEGER,
    helpers TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS detached (
    id TEXT PRIMARY KEY,
    sandbox TEXT NOT NULL,
    command TEXT NOT NULL,
    pid INTEGER NOT NULL,
    chan INTEGER NOT NULL,
    status TEXT NOT NULL,
    exit_code INTEGER,
    started REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    name TEXT PRIMARY KEY,
    sandbox TEXT NOT NULL,
    image TEXT NOT NULL,
    backend TEXT NOT NULL,
    profile TEXT NOT NULL,
    spec TEXT NOT NULL,
    created REAL NOT NULL,
    path TEXT NOT NULL
);
"""


Helper = tuple[int, int | None]  # a helper process of a sandbox: pid, start time
# The JSON columns and the value a missing or unreadable one decodes to.
_JSON_DEFAULTS: dict[str, Any] = {"spec": {}, "helpers": [], "command": []}


def _encode(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _decode(row: dict[str, Any] | None) -> Any:
    """A row as SQLite returns it, with its JSON columns decoded (helpers as tuples)."""
    if row is None:
        return None
    for column, default in _JSON_DEFAULTS.items():
        if column in row:
            try:
                value = json.loads(row[column]) if row[column] else None
            except ValueError:
                value = None
            ok = isinstance(value, type(default))
            row[column] = value if ok else type(default)()
    if "helpers" in row:
        row["helpers"] = [(h[0], h[1]) for h in row["helpers"]
                          if isinstance(h, list) and len(h) == 2 and isinstance(h[0], int)
                          and (h[1] is None or isinstance(h[1], int))]
    return row


class SandboxRow(TypedDict):
    """A persistent sandbox."""

    name: str
    uuid: str
    status: SandboxStatus  # the daemon writes "running" and "stopped"
    backend: str
    isolation: str
    image: str
    profile: str
    spec: dict[str, Any]  # what `start` needs to rebuild the sandbox
    created: float
    expires: float | None
    pid: int | None
    pid_start: int | None
    helpers: list[Helper]
    scratch: str | None
    state_dir: str


class EphemeralRow(TypedDict):
    """A pool or one-shot sandbox the daemon started (cleaned up if the daemon dies)."""

    name: str
    backend: str
    scratch: str
    pid: int | None
    pid_start: int | None
    helpers: list[Helper]


class DetachedRow(TypedDict):
    """A detached command of a persistent sandbox."""

    id: str
    sandbox: str
    command: list[str]  # argv
    pid: int
    chan: int
    status: DetachedStatus
    exit_code: int | None
    started: float


class SnapshotRow(TypedDict):
    """A snapshot of a persistent sandbox's writable layers."""

    name: str
    sandbox: str
    image: str
    backend: str
    profile: str
    spec: dict[str, Any]
    created: float
    path: str


Table = Literal["sandboxes", "detached", "snapshots"]
# The tables a record on disk rebuilds (records.py): key column, every column.
COLUMNS: dict[Table, tuple[str, tuple[str, ...]]] = {
    "sandboxes": ("name", tuple(SandboxRow.__annotations__)),
    "detached": ("id", tuple(DetachedRow.__annotations__)),
    "snapshots": ("name", tuple(SnapshotRow.__annotations__)),
}


class Store:
    """Every query of the daemon's state, over one StateDB (thread-safe as it is)."""

    def __init__(self, db: StateDB) -> None:
        self.db = db

    @property
    def restored(self) -> bool:
        """The rows came from a backup or from nothing (records.reconcile)."""
        return self.db.restored

    # ---- sandboxes ----

    def sandbox(self, name: str) -> SandboxRow | None:
        return cast("SandboxRow | None",
                    _decode(self.db.one("SELECT * FROM sandboxes WHERE name=?", (name,))))

    def sandbox_by_uuid(self, uuid: str) -> SandboxRow | None:
        return cast("SandboxRow | None",
                    _decode(self.db.one("SELECT * FROM sandboxes WHERE uuid=?", (uuid,))))

    def sandbox_exists(self, name: str) -> bool:
        return self.db.one("SELECT name FROM sandboxes WHERE name=?", (name,)) is not None

    def sandboxes(self, status: SandboxStatus | None = None) -> list[SandboxRow]:
        """Every sandbox (by name), or those with `status`."""
        if status is None:
            rows = self.db.all("SELECT * FROM sandboxes ORDER BY name")
        else:
            rows = self.db.all("SELECT * FROM sandboxes WHERE status=? ORDER BY name",
                               (status,))
        return cast("list[SandboxRow]", [_decode(r) for r in rows])

    def any_running(self) -> bool:
        return bool(self.db.all("SELECT name FROM sandboxes WHERE status = 'running'", ()))

    def expired(self, now: float) -> list[str]:
        """Names of sandboxes whose TTL ended by `now`."""
        return [r["name"] for r in self.db.all(
            "SELECT name FROM sandboxes WHERE expires IS NOT NULL AND expires <= ?", (now,))]

    def add_sandbox(self, *, name: str, uuid: str, backend: str, isolation: str, image: str,
                    profile: str, spec: Mapping[str, Any], created: float,
                    expires: float | None,
                    state_dir: str) -> None:
        """A new sandbox, stopped."""
        self.db.execute(
            "INSERT INTO sandboxes (name, uuid, status, backend, isolation, image, profile,"
            " spec, created, expires, state_dir) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (name, uuid, "stopped", backend, isolation, image, profile, _encode(spec),
             created, expires, state_dir))

    def set_running(self, name: str, *, pid: int, pid_start: int | None,
                    helpers: Sequence[Helper], scratch: str, isolation: str) -> None:
        self.db.execute(
            "UPDATE sandboxes SET status='running', pid=?, pid_start=?, helpers=?, "
            "scratch=?, isolation=? WHERE name=?",
            (pid, pid_start, _encode(helpers), scratch, isolation, name))

    def set_stopped(self, name: str) -> None:
        """Stopped: no processes, no scratch dir."""
        self.db.execute("UPDATE sandboxes SET status='stopped', pid=NULL, pid_start=NULL, "
                        "helpers='[]', scratch=NULL WHERE name=?", (name,))

    def set_expires(self, name: str, expires: float) -> None:
        self.db.execute("UPDATE sandboxes SET expires=? WHERE name=?", (expires, name))

    def delete_sandbox(self, name: str) -> None:
        self.db.execute("DELETE FROM sandboxes WHERE name=?", (name,))

    # ---- ephemeral (pool and one-shot) sandboxes ----

    def ephemerals(self) -> list[EphemeralRow]:
        return cast("list[EphemeralRow]",
                    [_decode(r) for r in self.db.all("SELECT * FROM ephemeral")])

    def add_ephemeral(self, name: str, backend: str, scratch: str) -> None:
        self.db.execute("INSERT INTO ephemeral (name, backend, scratch) VALUES (?,?,?)",
                        (name, backend, scratch))

    def set_ephemeral_processes(self, name: str, pid: int, pid_start: int | None,
                                helpers: Sequence[Helper]) -> None:
        self.db.execute("UPDATE ephemeral SET pid=?, pid_start=?, helpers=? WHERE name=?",
                        (pid, pid_start, _encode(helpers), name))

    def delete_ephemeral(self, name: str) -> None:
        self.db.execute("DELETE FROM ephemeral WHERE name=?", (name,))

    # ---- detached commands ----

    def detached(self, cmd_id: str, sandbox: str | None = None) -> DetachedRow | None:
        """A detached command (of `sandbox`, if given)."""
        if sandbox is None:
            row = self.db.one("SELECT * FROM detached WHERE id=?", (cmd_id,))
        else:
            row = self.db.one("SELECT * FROM detached WHERE id=? AND sandbox=?",
                              (cmd_id, sandbox))
        return cast("DetachedRow | None", _decode(row))

    def detached_of(self, sandbox: str, *, running: bool = False) -> list[DetachedRow]:
        """A sandbox's detached commands, oldest first (only those still running)."""
        sql = "SELECT * FROM detached WHERE sandbox=?"
        sql += " AND status='running'" if running else ""
        return cast("list[DetachedRow]",
                    [_decode(r) for r in self.db.all(sql + " ORDER BY started", (sandbox,))])

    def add_detached(self, *, cmd_id: str, sandbox: str, command: Sequence[str], pid: int,
                     chan: int, started: float) -> None:
        """A detached command, running."""
        self.db.execute("INSERT INTO detached (id, sandbox, command, pid, chan, status, "
                        "started) VALUES (?,?,?,?,?,?,?)",
                        (cmd_id, sandbox, _encode(list(command)), pid, chan, "running",
                         started))

    def finish_detached(self, cmd_id: str, status: DetachedStatus, exit_code: int | None
                        ) -> None:
        """How a running detached command ended (nothing if it is not running)."""
        self.db.execute("UPDATE detached SET status=?, exit_code=? WHERE id=? AND "
                        "status='running'", (status, exit_code, cmd_id))

    def fail_detached_of(self, sandbox: str) -> None:
        """The sandbox's running detached commands failed (it stopped or died)."""
        self.db.execute("UPDATE detached SET status='failed' WHERE sandbox=? AND "
                        "status='running'", (sandbox,))

    def delete_detached_of(self, sandbox: str) -> None:
        self.db.execute("DELETE FROM detached WHERE sandbox=?", (sandbox,))

    # ---- snapshots ----

    def snapshot(self, name: str) -> SnapshotRow | None:
        return cast("SnapshotRow | None",
                    _decode(self.db.one("SELECT * FROM snapshots WHERE name=?", (name,))))

    def snapshot_exists(self, name: str) -> bool:
        return self.db.one("SELECT name FROM snapshots WHERE name=?", (name,)) is not None

    def snapshots(self) -> list[SnapshotRow]:
        return cast("list[SnapshotRow]",
                    [_decode(r) for r in self.db.all("SELECT * FROM snapshots ORDER BY name")])

    def add_snapshot(self, *, name: str, sandbox: str, image: str, backend: str,
                     profile: str, spec: Mapping[str, Any], created: float, path: str) -> None:
        self.db.execute("INSERT INTO snapshots (name, sandbox, image, backend, profile, "
                        "spec, created, path) VALUES (?,?,?,?,?,?,?,?)",
                        (name, sandbox, image, backend, profile, _encode(spec), created, path))

    def delete_snapshot(self, name: str) -> None:
        self.db.execute("DELETE FROM snapshots WHERE name=?", (name,))

    # ---- records on disk (records.py) ----

    def upsert(self, table: Table, row: Mapping[str, Any], replace: bool) -> bool:
        """Insert `row` (or replace the one with its key); whether anything changed. Its
        JSON columns may be decoded values or (records of older versions) their text."""
        key, columns = COLUMNS[table]
        # Table and column names are the constants above, never a record's own keys.
        if not replace and self.db.one(f"SELECT {key} FROM {table} WHERE {key}=?",  # noqa: S608
                                       (row[key],)):
            return False
        sql = (f"INSERT OR REPLACE INTO {table} ({', '.join(columns)}) "  # noqa: S608
               f"VALUES ({', '.join('?' for _ in columns)})")
        self.db.execute(sql, tuple(
            row[c] if c not in _JSON_DEFAULTS or isinstance(row[c], str) else _encode(row[c])
            for c in columns))
        return True
