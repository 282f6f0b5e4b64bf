"""The egress audit log is keyed by sandbox *and* instance: a sandbox re-created under a
name that was used before never sees its predecessor's decisions (`egress NAME log
--audit`, the daemon's `egress_log`, HTTP's GET /sandboxes/{name}/egress), a kept
sandbox keeps its own across a stop/start, and a sandbox that is gone still shows the last
one's. Real sandboxes (namespaces) through the daemon; each life connects to an address of
its own in the always-denied set, so the entries tell the lives apart."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from sandbox_helpers import ak

PROBE = ("import socket, sys\n"
         "try:\n"
         "    socket.create_connection((sys.argv[1], 80), timeout=3).recv(1)\n"
         "except OSError as e:\n"
         "    print(type(e).__name__)\n")


def touch(name: str, addr: str) -> None:
    """One refused connection from the sandbox, which its gate logs."""
    r = ak("exec", name, "--", "python3", "-c", PROBE, addr)
    assert r.returncode == 0, r.stderr


def audit(name: str) -> list[dict[str, object]]:
    r = ak("egress", name, "log", "--audit", "--json")
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def addrs(entries: list[dict[str, object]]) -> set[object]:
    return {e.get("addr") for e in entries if e.get("kind") == "tcp"}


def test_a_reused_name_does_not_see_its_predecessor(project: Path) -> None:
    name = f"aud-{secrets.token_hex(3)}"
    first, second, third = "10.213.250.1", "10.213.250.2", "10.213.250.3"
    r = ak("create", name, "-B", "namespaces", "-i", "host", cwd=project)
    assert r.returncode == 0, r.stderr
    try:
        touch(name, first)
        entries = audit(name)
        assert addrs(entries) == {first}, entries
        lives = {e.get("instance") for e in entries}
        assert len(lives) == 1 and all(isinstance(i, str) and i for i in lives), entries
    finally:
        assert ak("rm", name).returncode == 0
    # Gone: `--audit` still shows what the last sandbox of that name did.
    assert addrs(audit(name)) == {first}
    r = ak("create", name, "-B", "namespaces", "-i", "host", cwd=project)
    assert r.returncode == 0, r.stderr
    try:
        assert audit(name) == []  # nothing of the predecessor's
        touch(name, second)
        assert addrs(audit(name)) == {second}
        # A stop and a start are the same sandbox: its entries stay its own.
        assert ak("stop", name).returncode == 0
        assert ak("start", name).returncode == 0
        touch(name, third)
        entries = audit(name)
        assert addrs(entries) == {second, third}, entries
        assert len({e.get("instance") for e in entries}) == 1, entries
        assert lives.isdisjoint({e.get("instance") for e in entries})
    finally:
        ak("rm", name)
    # The file keeps both lives, each with its own key.
    path = Path(os.environ["AGENTKERNEL_HOME"]) / "egress-audit" / f"{name}.jsonl"
    mine = [json.loads(line) for line in path.read_text().splitlines()
            if f'"sandbox":"{name}"' in line]
    assert {e.get("addr") for e in mine} >= {first, second, third}
    assert len({e.get("instance") for e in mine}) == 2
