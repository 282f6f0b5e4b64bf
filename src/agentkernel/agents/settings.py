"""`create`/`run --agent NAME --settings`: the host's agent instructions and skills, copied in.

Only what the registry row's `settings` names (instructions, skills, commands: documents,
never settings files or sign-ins), read from the caller's own $HOME without following any
link (a link in ~/.claude/skills could point at ~/.ssh), regular files only, bounded in
count and size. The sandbox gets copies in its own HOME; nothing of the host is mounted.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from .registry import AgentSpec

if TYPE_CHECKING:
    from ..agent.client import AgentClient

MAX_FILES = 500
MAX_FILE = 1 << 20  # larger files are skipped
MAX_TOTAL = 8 << 20


class SettingsFile(NamedTuple):
    path: str  # $HOME-relative
    data: bytes
    mode: int


def _read(path: Path) -> tuple[bytes, int] | None:
    """A regular file's bytes and mode, opened without following a link; None otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    with open(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE:
            return None
        return f.read(MAX_FILE + 1)[:MAX_FILE], 0o755 if st.st_mode & 0o100 else 0o644


def collect(spec: AgentSpec, home: Path) -> tuple[list[SettingsFile], list[str]]:
    """The files to copy, and what was skipped (one line each: too many, too big)."""
    found: list[SettingsFile] = []
    skipped: list[str] = []
    total = 0
    for rel in spec.settings:
        top = home / rel
        try:
            st = os.lstat(top)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            paths = sorted(
                Path(root, name) for root, dirs, names in os.walk(top) for name in names)
        elif stat.S_ISREG(st.st_mode):
            paths = [top]
        else:
            continue  # a link: not followed
        for path in paths:
            if path.is_symlink():
                continue
            got = _read(path)
            rel_path = str(path.relative_to(home))
            if got is None:
                skipped.append(f"{rel_path}: not a regular file of at most 1 MiB")
                continue
            if len(found) >= MAX_FILES or total + len(got[0]) > MAX_TOTAL:
                skipped.append(f"{rel_path}: over {MAX_FILES} files or 8 MiB in all")
                continue
            total += len(got[0])
            found.append(SettingsFile(rel_path, *got))
    return found, skipped


def write_into(client: AgentClient, files: tuple[tuple[str, bytes, int], ...]) -> None:
    """A plan's `home_files` into a started sandbox, before its command: written by the
    in-sandbox agent (so as the agent's user where it has one), dirs made as needed."""
    for path, data, mode in files:
        client.write_file(path, data, mode=mode, mkdirs=True)
