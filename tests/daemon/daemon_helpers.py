"""Helpers for the daemon tests: find sandbox processes and cgroups on the host."""

from __future__ import annotations

import os
from pathlib import Path

WATCHED = {"bwrap", "runsc", "runsc-gofer", "runsc-sandbox", "slirp4netns", "ak-agent", "agent"}


def sandbox_processes(root: str) -> set[tuple[int, str]]:
    """Live (not zombie) sandbox processes of the tests under `root`: (pid, name).

    bwrap and runsc name files under the test's data/runtime dirs in their argv; a
    slirp4netns names only a pid, so an orphaned one (parent 1) counts as ours. Other
    suites running at the same time keep theirs as children of their own processes.
    """
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        name = stat[stat.find(b"(") + 1 : stat.rfind(b")")].decode(errors="replace")
        state = stat[stat.rfind(b")") + 2 :][:1]
        if state in (b"Z", b"X"):
            continue  # this host's pid 1 never reaps orphans; a zombie holds nothing
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = stat[stat.rfind(b")") + 2 :].split()[1]
        orphan_slirp = name == "slirp4netns" and ppid == b"1"
        ours = (name in WATCHED or name.startswith("exe")) and root.encode() in cmdline
        if orphan_slirp or ours:
            found.add((int(entry), name))
    return found


def all_pids() -> set[int]:
    return {int(e) for e in os.listdir("/proc") if e.isdigit()}


def cgroup_dirs() -> set[str]:
    """Every agentkernel/<name> cgroup directory on this host. Groups come and go while
    this walks (any sandbox on the host being torn down): a vanished one is skipped."""
    found = set()
    for top, dirs, _files in os.walk("/sys/fs/cgroup"):  # errors (vanished dirs): skipped
        if os.path.basename(top) == "agentkernel":
            found.update(os.path.join(top, d) for d in dirs)
    return found
