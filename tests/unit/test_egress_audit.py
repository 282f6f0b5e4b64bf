"""The host's egress audit log stays bounded and whole with many gates writing at once, and
one sandbox's traffic never rotates out another's entries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentkernel import egress_audit

WRITER = r"""
import sys
from agentkernel import egress_audit
egress_audit.CAP = 8192
w = egress_audit.AuditWriter(sys.argv[1], sys.argv[2])
for i in range(int(sys.argv[3]) if len(sys.argv) > 3 else 400):
    w.write({"kind": "tcp", "host": "h" * 400, "port": i, "allowed": False,
             "rule": "deny *", "value": "never-this", "body": "never-this"})
"""


def _write(directory: Path, sandbox: str, n: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(directory), sandbox, str(n)])


def test_rotation_keeps_it_bounded_and_whole(tmp_path: Path) -> None:
    path = tmp_path / "egress-audit"
    procs = [_write(path, f"sb{i}", 400) for i in range(4)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    assert path.stat().st_mode & 0o777 == 0o700
    for i in range(4):
        current = path / f"sb{i}.jsonl"
        for f in (current, Path(str(current) + ".1")):
            assert f.stat().st_size <= 8192 and f.stat().st_mode & 0o777 == 0o600
            for line in f.read_text().splitlines():  # no line torn
                entry = json.loads(line)
                assert set(entry) <= {"t", "sandbox", *egress_audit.FIELDS}
                assert len(entry["host"]) == egress_audit.MAX_FIELD
    entries = egress_audit.read_audit(None, path=path)
    assert entries and "never-this" not in json.dumps(entries)
    # Each writer's entries stay in order across the rotation.
    for i in range(4):
        ports = [e["port"] for e in entries if e["sandbox"] == f"sb{i}"]
        assert ports == sorted(ports)
    sb0 = egress_audit.read_audit("sb0", path=path)
    assert [e["port"] for e in egress_audit.read_audit("sb0", limit=2, path=path)] == \
        [e["port"] for e in sb0][-2:]
    assert egress_audit.read_audit("sb0", path=tmp_path / "none") == []


def test_a_flooding_sandbox_cannot_evict_another_ones_entries(tmp_path: Path) -> None:
    """The attack: a sandbox's traffic (many connections, each logged) filling the log
    until its rotation drops what another sandbox's gate wrote before."""
    path = tmp_path / "egress-audit"
    assert _write(path, "victim", 5).wait(timeout=120) == 0
    flood = [_write(path, "flood", 2000) for _ in range(2)]
    for proc in flood:
        assert proc.wait(timeout=300) == 0
    assert [e["port"] for e in egress_audit.read_audit("victim", path=path)] == \
        list(range(5))
    # The flood rotated its own files (bounded) and nothing else's.
    assert (path / "flood.jsonl.1").stat().st_size > 0
    assert all(f.stat().st_size <= 8192 for f in path.iterdir())


def test_new_names_prune_the_oldest_but_never_a_live_writers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The total stays bounded by names (KEEP, here with no SLACK): opening a new name's
    files removes the least recently written ones, except those a live gate still writes
    to."""
    monkeypatch.setattr(egress_audit, "KEEP", 3)
    monkeypatch.setattr(egress_audit, "SLACK", 0)
    path = tmp_path / "egress-audit"
    live = egress_audit.AuditWriter(str(path), "live")
    live.write({"kind": "dns", "host": "a.example"})
    os.utime(path / "live.jsonl", (1, 1))  # the least recently written of all
    for name in ("gone1", "gone2", "gone3", "gone4"):
        w = egress_audit.AuditWriter(str(path), name)
        w.write({"kind": "dns", "host": f"{name}.example"})
        os.close(w.fd)
        os.close(w.old)
    kept = sorted(p.name for p in path.iterdir() if p.name.endswith(".jsonl"))
    assert kept == ["gone3.jsonl", "gone4.jsonl", "live.jsonl"]
    assert [e["host"] for e in egress_audit.read_audit("live", path=path)] == ["a.example"]


def test_a_name_that_is_no_sandbox_name_opens_nothing(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="invalid sandbox name"):
        egress_audit.AuditWriter(str(tmp_path), "../escape")
    assert list(tmp_path.iterdir()) == []
