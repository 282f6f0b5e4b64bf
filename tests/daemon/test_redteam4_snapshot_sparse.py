"""Outside review, round 4: a snapshot holds what a sandbox's disk holds, no more.

A persistent sandbox's disk is a quota (a sparse ext4 image, 10 GiB by default), but a file
with holes uses no room there whatever its size: `truncate -s 16T /tmp/f` fits a quota of
any size, as many times as the sandbox likes. Taking a snapshot ran `tar` without
`--sparse`, which reads a hole as zeros and writes them: the archive, on the host's own
disk beside the data dir, grew by the files' *apparent* size (terabytes for a few
commands inside). Now holes stay holes in the archive and in the restored sandbox.
Attacked with a real kept namespaces sandbox through the daemon (root: the quota mount).
"""

from __future__ import annotations

import secrets
from pathlib import Path

from conftest import Daemon  # tests/daemon/

APPARENT = 2 << 30  # what the hole claims (a real attack names terabytes)
ROOM = 64 << 20  # what the archive may take for it


def test_a_sparse_file_does_not_inflate_a_snapshot(daemon: Daemon) -> None:
    from agentkernel import AgentKernel

    name = f"box-sparse-{secrets.token_hex(3)}"
    r = daemon.ak("create", name, "-i", "host", "-B", "namespaces", "-p", "moderate")
    assert r.returncode == 0, r.stderr
    restored = ""
    snap = f"box-snap-{secrets.token_hex(3)}"
    try:
        r = daemon.ak("exec", name, "--", "sh", "-c",
                      f"truncate -s {APPARENT} /tmp/hole /root/hole && echo made")
        assert "made" in r.stdout, (r.stdout, r.stderr)
        with daemon.use(), AgentKernel() as client:
            client.take_snapshot(name, snapshot_name=snap)
            archive = daemon.home / "snapshots" / f"{snap}.tar"
            st = archive.stat()
            assert st.st_size < ROOM and st.st_blocks * 512 < ROOM, st
            # The holes come back as holes, with their size.
            restored = client.restore_snapshot(snap).name
        r = daemon.ak("exec", restored, "--", "sh", "-c",
                      "stat -c '%s %b %B' /tmp/hole /root/hole")
        assert r.returncode == 0, (r.stdout, r.stderr)
        for line in r.stdout.split("\n")[:2]:
            size, blocks, unit = (int(x) for x in line.split())
            assert size == APPARENT and blocks * unit < ROOM, r.stdout
    finally:
        for box in (restored, name):
            if box:
                daemon.ak("remove", box)
        with daemon.use(), AgentKernel() as client:
            for s in client.list_snapshots():
                if s.name == snap:
                    client.delete_snapshot(snap)
        Path(daemon.home / "snapshots" / f"{snap}.tar").unlink(missing_ok=True)
