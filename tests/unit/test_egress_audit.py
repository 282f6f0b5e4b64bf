"""The host's egress audit log stays bounded and whole with many gates writing at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from agentkernel import egress_audit

WRITER = r"""
import sys
from agentkernel import egress_audit
egress_audit.CAP = 8192
w = egress_audit.AuditWriter(sys.argv[1], sys.argv[2])
for i in range(400):
    w.write({"kind": "tcp", "host": "h" * 400, "port": i, "allowed": False,
             "rule": "deny *", "value": "never-this", "body": "never-this"})
"""


def test_rotation_keeps_it_bounded_and_whole(tmp_path: Path) -> None:
    path = tmp_path / "egress-audit.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"sb{i}"])
             for i in range(4)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    old = Path(str(path) + ".1")
    for f in (path, old):
        assert f.stat().st_size <= 8192 and f.stat().st_mode & 0o777 == 0o600
        for line in f.read_text().splitlines():  # no line torn by another writer
            entry = json.loads(line)
            assert set(entry) <= {"t", "sandbox", *egress_audit.FIELDS}
            assert len(entry["host"]) == egress_audit.MAX_FIELD
    entries = egress_audit.read_audit(None, path=path)
    assert entries and "never-this" not in json.dumps(entries)
    # Each writer's entries stay in order across the rotation.
    for i in range(4):
        ports = [e["port"] for e in entries if e["sandbox"] == f"sb{i}"]
        assert ports == sorted(ports)
    assert [e["port"] for e in egress_audit.read_audit("sb0", limit=2, path=path)] == \
        [p for p in [e["port"] for e in entries if e["sandbox"] == "sb0"]][-2:]
    assert egress_audit.read_audit("sb0", path=tmp_path / "none") == []
