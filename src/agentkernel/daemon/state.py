"""The daemon's durable state: one SQLite database (WAL) in the data dir, safe across threads."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


class StateDB:
    """A tiny wrapper: one connection, one lock, dict rows, JSON columns decoded on demand."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None,
                                   timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        path.chmod(0o600)

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: all or nothing, serialised with every other statement."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def execute(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> None:
        with self._lock:
            self._db.execute(sql, params)

    def one(self, sql: str, params: tuple[Any, ...] = ()) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(sql, params).fetchone()
        return dict(row) if row is not None else None

    def all(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        return [dict(r) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def loads(text: str | None, default: Any = None) -> Any:
    if not text:
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default
