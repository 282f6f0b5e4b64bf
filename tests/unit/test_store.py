"""daemon/store: the typed rows are the schema's columns, and every query round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentkernel.daemon.state import StateDB
from agentkernel.daemon.store import COLUMNS, EphemeralRow, Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(StateDB(tmp_path / "state.db", backup_interval=3600))


def test_rows_are_the_schema(store: Store) -> None:
    tables: dict[str, tuple[str, ...]] = {t: cols for t, (_key, cols) in COLUMNS.items()}
    tables["ephemeral"] = tuple(EphemeralRow.__annotations__)
    for table, columns in tables.items():
        info = store.db.all(f"PRAGMA table_info({table})")
        assert tuple(r["name"] for r in info) == columns, table


def _sandbox(store: Store, name: str, expires: float | None = None) -> None:
    store.add_sandbox(name=name, uuid=f"u-{name}", backend="namespaces", isolation="ns",
                      image="host", profile="moderate", spec={"k": [1]}, created=1.0,
                      expires=expires, state_dir=f"/s/{name}")


def test_sandboxes(store: Store) -> None:
    _sandbox(store, "b", expires=5.0)
    _sandbox(store, "a")
    assert store.sandbox_exists("a") and not store.sandbox_exists("c")
    assert [r["name"] for r in store.sandboxes()] == ["a", "b"]
    assert store.sandbox("a") == {
        "name": "a", "uuid": "u-a", "status": "stopped", "backend": "namespaces",
        "isolation": "ns", "image": "host", "profile": "moderate", "spec": {"k": [1]},
        "created": 1.0, "expires": None, "pid": None, "pid_start": None, "helpers": [],
        "scratch": None, "state_dir": "/s/a"}
    store.set_running("a", pid=7, pid_start=9, helpers=[(8, 1), (9, None)], scratch="/r/a",
                      isolation="ns2")
    row = store.sandbox_by_uuid("u-a")
    assert row is not None and (row["status"], row["pid"], row["scratch"], row["helpers"]) == (
        "running", 7, "/r/a", [(8, 1), (9, None)])
    assert store.any_running() and [r["name"] for r in store.sandboxes("running")] == ["a"]
    store.set_stopped("a")
    row = store.sandbox("a")
    assert row is not None and (row["status"], row["pid"], row["helpers"]) == (
        "stopped", None, [])
    assert store.expired(4.0) == [] and store.expired(5.0) == ["b"]
    store.set_expires("a", 2.0)
    assert store.expired(3.0) == ["a"]
    store.delete_sandbox("a")
    assert store.sandbox("a") is None


def test_ephemeral_detached_snapshots(store: Store) -> None:
    store.add_ephemeral("pool-1", "namespaces", "/r/pool-1")
    store.set_ephemeral_processes("pool-1", 3, 4, [])
    assert store.ephemerals() == [{"name": "pool-1", "backend": "namespaces",
                                   "scratch": "/r/pool-1", "pid": 3, "pid_start": 4,
                                   "helpers": []}]
    store.delete_ephemeral("pool-1")
    assert store.ephemerals() == []

    for i, started in ((1, 2.0), (2, 1.0)):
        store.add_detached(cmd_id=f"cmd-{i}", sandbox="a", command=["true"], pid=i,
                           chan=i, started=started)
    assert [r["id"] for r in store.detached_of("a")] == ["cmd-2", "cmd-1"]
    store.finish_detached("cmd-1", "completed", 0)
    store.finish_detached("cmd-1", "failed", 9)  # only a running command ends
    row = store.detached("cmd-1", "a")
    assert row is not None and (row["status"], row["exit_code"]) == ("completed", 0)
    assert store.detached("cmd-1", "other") is None
    assert [r["id"] for r in store.detached_of("a", running=True)] == ["cmd-2"]
    store.fail_detached_of("a")
    assert store.detached_of("a", running=True) == []
    store.delete_detached_of("a")
    assert store.detached_of("a") == []

    store.add_snapshot(name="s1", sandbox="a", image="host", backend="namespaces",
                       profile="moderate", spec={"k": [1]}, created=1.0, path="/p/s1.tar")
    assert store.snapshot_exists("s1") and [r["name"] for r in store.snapshots()] == ["s1"]
    store.delete_snapshot("s1")
    assert store.snapshot("s1") is None


def _image(store: Store, name: str) -> str | None:
    row = store.sandbox(name)
    return row["image"] if row is not None else None


def test_upsert_keeps_or_replaces(store: Store) -> None:
    _sandbox(store, "a")
    got = store.sandbox("a")
    assert got is not None
    row: dict[str, object] = {**got, "image": "other"}
    assert not store.upsert("sandboxes", row, replace=False)
    assert _image(store, "a") == "host"
    assert store.upsert("sandboxes", row, replace=True)
    assert _image(store, "a") == "other"


def test_json_columns_from_old_records_and_damage(store: Store) -> None:
    """A record of an older version holds its JSON columns as text; a damaged column reads
    as its empty value instead of failing every query of the table."""
    _sandbox(store, "a")
    got = store.sandbox("a")
    assert got is not None
    old: dict[str, object] = {**got, "spec": '{"disk_mb": 5}', "helpers": "[[3, null]]"}
    assert store.upsert("sandboxes", old, replace=True)
    row = store.sandbox("a")
    assert row is not None and (row["spec"], row["helpers"]) == ({"disk_mb": 5}, [(3, None)])
    store.db.execute("UPDATE sandboxes SET spec='{not json', helpers='[[\"x\", 1], 7]' "
                     "WHERE name='a'")
    row = store.sandbox("a")
    assert row is not None and (row["spec"], row["helpers"]) == ({}, [])
