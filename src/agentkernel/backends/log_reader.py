"""A log pipe's bounded reader: keeps the first bytes in a file, drops the rest, reads on.

base.bounded_log starts this file (`python -I -S log_reader.py MAX [UID GID]`) with the
pipe's read end on stdin and the log file (opened by the caller, never through a link) on
stdout. It copies the first MAX bytes, then reads on and drops what comes until every
writer is gone: the pipe must keep a reader as long as it has a writer (runsc, in Go, dies
of SIGPIPE on a write to a stderr with none). It runs in a session of its own, so it
outlives whoever started it, as the sandbox does (a persistent one, or a daemon that
went). Started as root with UID GID, it gives root up before it reads anything (the
interpreter, maybe under a private dir, is loaded by then). Memory is one chunk.
It imports nothing of agentkernel (it starts faster and shows less).
"""

from __future__ import annotations

import os
import sys

CHUNK = 1 << 16


def drop_to(uid: int, gid: int) -> None:
    """Become `uid`/`gid` with no supplementary groups, for good (real, effective, saved)."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def copy_bounded(src: int, dst: int, limit: int) -> int:
    """Write the first `limit` bytes read from `src` to `dst`, then read `src` to its end
    and drop the rest. A `dst` that refuses a write (a full disk) gets nothing more, and
    the reading goes on. Returns how many bytes `dst` got."""
    kept = 0
    while True:
        data = os.read(src, CHUNK)
        if not data:
            return kept
        keep = memoryview(data)[:max(0, limit - kept)]
        while keep:
            try:
                n = os.write(dst, keep)
            except OSError:
                limit = kept  # (the file takes no more; reading on is what matters)
                break
            kept += n
            keep = keep[n:]


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 3) or not all(a.isascii() and a.isdigit() for a in argv):
        print("usage: log_reader.py MAX [UID GID]", file=sys.stderr)
        return 2
    if len(argv) == 3:
        drop_to(int(argv[1]), int(argv[2]))
    copy_bounded(0, 1, int(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
