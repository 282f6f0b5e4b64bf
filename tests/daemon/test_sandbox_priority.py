"""A command in a sandbox runs at the daemon's CPU priority, whether its sandbox came warm
from the pool or cold, and has no way to raise it (a lower niceness, a real-time class, a
higher RLIMIT_NICE): a sandbox must not be able to starve the host or the other runs."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from conftest import Daemon

# What a command in the sandbox reports and tries: its niceness and its parent's (the
# agent), RLIMIT_NICE, then every way up it has: a lower niceness for itself, for its
# agent (pid 1's child), the real-time classes, and raising RLIMIT_NICE.
PROBE = r"""
stat() { cut -d' ' -f19 /proc/$1/stat; }
echo "nice=$(stat self) agent=$(stat $PPID)"
echo "rlimit=$(awk '/^Max nice/ {print $5}' /proc/self/limits)"
renice -n -1 -p $$ >/dev/null 2>&1 && echo "ESCAPE renice self"
renice -n -1 -p $PPID >/dev/null 2>&1 && echo "ESCAPE renice agent"
# (GNU nice runs the command even where it cannot change the niceness: look at it.)
echo "nice_minus=$(nice -n -5 cut -d' ' -f19 /proc/self/stat 2>/dev/null)"
chrt -f 1 true >/dev/null 2>&1 && echo "ESCAPE fifo"
chrt -r 1 true >/dev/null 2>&1 && echo "ESCAPE rr"
prlimit --nice=40:40 --pid $$ >/dev/null 2>&1 && echo "ESCAPE rlimit"
echo "after=$(stat self)"
"""


def _nice_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def _served_warm(daemon: Daemon) -> int:
    out = daemon.ak("daemon", "status").stdout
    return sum(int(n) for n in re.findall(r"Served:\s+(\d+) warm", out))


def _refilled(daemon: Daemon, workspace: Path, timeout: float = 120) -> None:
    """Until the daemon keeps a sandbox for runs in `workspace` warm (its refill after a
    run takes a sandbox start: far more than no time on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while True:
        pools = json.loads(daemon.ak("daemon", "status", "--json").stdout)["pools"]
        if any(p.get("workspace") == str(workspace) and p["warm"] >= 1 for p in pools):
            return
        assert time.monotonic() < deadline, f"the pool did not refill: {pools}"
        time.sleep(0.1)


def test_a_pooled_run_is_at_the_daemons_priority_and_cannot_raise_it(daemon: Daemon,
                                                                     tmp_path: Path) -> None:
    daemon.ensure_up()
    pid = daemon.pid()
    assert pid is not None
    base = _nice_of(pid)
    warm_before = _served_warm(daemon)
    for _ in range(4):
        r = daemon.ak("run", "-i", "host", "-B", "namespaces", "-p", "moderate", "--",
                      "sh", "-c", PROBE, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "ESCAPE" not in r.stdout, r.stdout
        got = dict(kv.split("=") for kv in r.stdout.split() if "=" in kv)
        # At the daemon's niceness: the command, and the agent that forked it.
        assert int(got["nice"]) == base, r.stdout
        assert int(got["agent"]) == base, r.stdout
        assert int(got["after"]) == base, r.stdout
        assert int(got["nice_minus"]) >= base, r.stdout
        # RLIMIT_NICE n allows a niceness down to 20 - n: never below the daemon's.
        assert 20 - int(got["rlimit"]) >= base, r.stdout
        _refilled(daemon, tmp_path)  # the next run comes warm from the pool
    assert _served_warm(daemon) > warm_before  # (some of) these came warm from the pool

