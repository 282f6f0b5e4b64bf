"""The daemon's durable state: one SQLite database (WAL) in the data dir, safe across threads
(its tables and queries: store.py)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .store import SCHEMA  # the tables and their queries: store.py

BACKUP_INTERVAL = 2.0  # seconds: at most one backup per interval, the last change included
KEEP_DAMAGED = 3  # damaged databases kept aside for a post-mortem (the oldest go)


class StateDB:
    """A tiny wrapper: one connection, one lock, dict rows, JSON columns decoded on demand.

    Checked when opened (`PRAGMA quick_check`): a damaged file is moved aside and the last
    good backup (`state.db.bak`, taken with SQLite's backup API shortly after each change)
    takes its place, or an empty database; `problems` says what happened, `restored`
    whether the rows may be older than the sandboxes' own records (daemon/manager.py
    rebuilds from those).
    """

    def __init__(self, path: Path, backup_interval: float = BACKUP_INTERVAL) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = path
        self.backup_path = path.with_name(path.name + ".bak")
        self.problems: list[str] = []
        self.restored = False  # rows came from a backup or from nothing: reconcile them
        self._lock = threading.RLock()
        self._backup_interval = backup_interval
        self._last_backup = 0.0
        self._dirty = False
        self._timer: threading.Timer | None = None
        self._closed = False
        self._db = self._open_checked()
        self._db.execute("PRAGMA synchronous=NORMAL")
        path.chmod(0o600)

    def _open_checked(self) -> sqlite3.Connection:
        db, why = _try_open(self.path)
        if db is not None:
            return db
        aside = _move_aside(self.path)
        self.problems.append(f"{self.path.name} was damaged ({why}); moved it to {aside.name}")
        self.restored = True
        if self.backup_path.is_file():
            import shutil

            shutil.copyfile(self.backup_path, self.path)
            db, why = _try_open(self.path)
            if db is not None:
                self.problems.append(f"restored the backup {self.backup_path.name}")
                return db
            _move_aside(self.path)
            self.problems.append(f"the backup was damaged too ({why})")
        db, why = _try_open(self.path)
        if db is None:
            raise sqlite3.DatabaseError(f"cannot create {self.path}: {why}")
        self.problems.append("started a new, empty database")
        return db

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
            self._changed()

    def execute(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> None:
        with self._lock:
            self._db.execute(sql, params)
            self._changed()

    def one(self, sql: str, params: tuple[Any, ...] = ()) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(sql, params).fetchone()
        return dict(row) if row is not None else None

    def all(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        return [dict(r) for r in rows]

    def _changed(self) -> None:
        """Back up now if the last backup is old enough, else once the interval is over."""
        self._dirty = True
        wait = self._last_backup + self._backup_interval - time.monotonic()
        if wait <= 0:
            self.backup()
        elif self._timer is None and not self._closed:
            self._timer = threading.Timer(wait, self._timed_backup)
            self._timer.daemon = True
            self._timer.start()

    def _timed_backup(self) -> None:
        with self._lock:
            self._timer = None
            if self._dirty and not self._closed:
                self.backup()

    def backup(self) -> None:
        """Copy the database to state.db.bak (atomically; best effort: a full disk must not
        fail the change that asked for it)."""
        with self._lock:
            self._last_backup = time.monotonic()
            tmp = self.backup_path.with_name(self.backup_path.name + ".tmp")
            try:
                dest = sqlite3.connect(str(tmp))
                try:
                    self._db.backup(dest)
                finally:
                    dest.close()
                tmp.chmod(0o600)
                os.replace(tmp, self.backup_path)
                self._dirty = False
            except (OSError, sqlite3.Error):
                with contextlib.suppress(OSError):
                    tmp.unlink()

    def close(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._dirty and not self._closed:
                self.backup()
            self._closed = True
            self._db.close()


def _try_open(path: Path) -> tuple[sqlite3.Connection | None, str]:
    """The database at `path` (created if absent) if it passes SQLite's quick check."""
    _make_private(path)
    try:
        db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None,
                             timeout=30)
    except sqlite3.Error as exc:
        return None, str(exc)
    try:
        db.row_factory = sqlite3.Row
        result = [r[0] for r in db.execute("PRAGMA quick_check").fetchall()]
        if result != ["ok"]:
            raise sqlite3.DatabaseError("; ".join(map(str, result[:3])))
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)
        return db, ""
    except sqlite3.Error as exc:
        db.close()
        return None, str(exc)


def _make_private(path: Path) -> None:
    """The database file 0600 before SQLite opens it: SQLite gives its -wal and -shm files
    the database's mode, and the WAL holds every row (a sandbox's `-e` values too). Files
    an older version left readable by others are tightened."""
    for name, flags in ((str(path), os.O_CREAT), (f"{path}-wal", 0), (f"{path}-shm", 0)):
        try:
            fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | flags, 0o600)
        except FileNotFoundError:
            continue
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)


def _move_aside(path: Path) -> Path:
    """Rename a damaged database (and its WAL files) to `<name>.damaged-<time>`; keep the
    newest few such copies."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.damaged-{stamp}-{os.getpid()}")
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.replace(f"{path}{suffix}", f"{aside}{suffix}")
    old = sorted(path.parent.glob(f"{path.name}.damaged-*"), key=lambda p: p.stat().st_mtime)
    damaged = [p for p in old if not p.name.endswith(("-wal", "-shm"))]
    for stale in damaged[:-KEEP_DAMAGED]:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                os.unlink(f"{stale}{suffix}")
    return aside
