"""`run --agent NAME --review`: the agent edits a copy of the project; its changes are
shown as a diff and copied back only when the user says so (a `y` on the terminal, or
`--apply`).

The copy is bounded (files and bytes) and made without following links. Nothing in it is
trusted when applied: only regular files, directories and symbolic links (as links, never
followed) come back; every write into the project goes through directory descriptors
opened with O_NOFOLLOW from the project's own root, so a link the agent planted (or one
already in the project) can never send a write outside it.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple, TextIO

from ..errors import UsageError
from ..sparse import copy_sparse

MAX_FILES = 200_000
MAX_BYTES = 4 << 30  # the copy's size cap: 4 GiB
MAX_DIFF_FILE = 1 << 20  # text files larger than this are reported, not diffed
MAX_DIFF_LINES = 2000  # per file


class Change(NamedTuple):
    path: str  # relative to the project, '/'-separated
    kind: str  # added | modified | deleted


def copy_project(project: Path) -> Path:
    """A private copy of `project` (links copied as links) in a new temporary dir; the
    copy is `<dir>/project`. UsageError when it is over the caps."""
    files = size = 0
    for root, dirs, names in os.walk(project):
        files += len(names) + len(dirs)
        for name in names:
            st = os.lstat(os.path.join(root, name))
            size += st.st_size if stat.S_ISREG(st.st_mode) else 0
        if files > MAX_FILES or size > MAX_BYTES:
            raise UsageError(f"--review copies the project, and {project} is too big for it "
                             f"(over {MAX_FILES} entries or {MAX_BYTES >> 30} GiB)")
    top = Path(tempfile.mkdtemp(prefix="agentkernel-review-"))
    os.chmod(top, 0o700)
    from ..paths import plain_entries_only  # (no device's contents, no FIFO: see there)

    shutil.copytree(project, top / "project", symlinks=True, ignore=plain_entries_only)
    return top / "project"


def _entries(root: Path) -> dict[str, os.stat_result]:
    out: dict[str, os.stat_result] = {}
    for base, dirs, names in os.walk(root):
        for name in [*dirs, *names]:
            full = os.path.join(base, name)
            st = os.lstat(full)
            if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                out[os.path.relpath(full, root)] = st  # (the copy has no other kind)
    return out


def _same(a: Path, b: Path, sa: os.stat_result, sb: os.stat_result) -> bool:
    if stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode):
        return False
    if stat.S_ISLNK(sa.st_mode):
        return os.readlink(a) == os.readlink(b)
    if stat.S_ISREG(sa.st_mode):
        if sa.st_size != sb.st_size or (sa.st_mode & 0o111) != (sb.st_mode & 0o111):
            return False
        with a.open("rb") as fa, b.open("rb") as fb:
            while True:
                ca, cb = fa.read(1 << 20), fb.read(1 << 20)
                if ca != cb:
                    return False
                if not ca:
                    return True
    return True  # directories (their contents are compared entry by entry)


def changes(project: Path, copy: Path) -> list[Change]:
    """What the agent changed: entries added, modified (content, type, link target or the
    executable bit) or deleted, sorted by path."""
    before, after = _entries(project), _entries(copy)
    out = [Change(p, "deleted") for p in before if p not in after]
    for path, st in after.items():
        if path not in before:
            out.append(Change(path, "added"))
        elif not _same(project / path, copy / path, before[path], st):
            out.append(Change(path, "modified"))
    return sorted(out)


def _text(path: Path) -> list[str] | None:
    """The lines of a small text file; [] when absent; None for binary or large ones."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return []
    if stat.S_ISLNK(st.st_mode):
        return [f"-> {os.readlink(path)}\n"]
    if not stat.S_ISREG(st.st_mode):
        return []
    if st.st_size > MAX_DIFF_FILE:
        return None
    data = path.read_bytes()
    if b"\0" in data:
        return None
    return data.decode(errors="replace").splitlines(keepends=True)


def _printable(text: str) -> str:
    """`text` with every character a terminal would act on (ESC, CR, BS, C1, bidi and other
    format characters, odd line ends) escaped; tabs stay. The agent chose every byte of its
    files and names, and the diff is what the user approves: `ESC[2K`, `ESC[1A` or a bare
    CR let it erase or overwrite the lines that showed a change."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == "\t" else repr(c)[1:-1] for c in text)


def show(project: Path, copy: Path, found: list[Change], out: TextIO) -> None:
    """A unified diff of every change (binary and large files by name only), every byte of
    the agent's shown as printable text."""
    for change in found:
        name = _printable(change.path)
        a, b = _text(project / change.path), _text(copy / change.path)
        if a is None or b is None:
            out.write(f"Binary or large file {name} {change.kind}\n")
            continue
        lines = list(difflib.unified_diff(a, b, f"a/{name}", f"b/{name}"))
        for line in lines[:MAX_DIFF_LINES]:
            out.write(_printable(line[:-1] if line.endswith("\n") else line) + "\n")
        if len(lines) > MAX_DIFF_LINES:
            out.write(f"... {len(lines) - MAX_DIFF_LINES} more lines of {name}\n")
        if not lines:
            out.write(f"{change.kind}: {name}\n")


def _open_parent(root_fd: int, rel: str, *, create: bool) -> tuple[int, str]:
    """A descriptor of `rel`'s parent dir inside the project, reached component by
    component without following any link; with `create`, missing dirs are made."""
    parts = rel.split(os.sep)
    fd = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd, parts[-1]


def _remove(parent: int, name: str) -> None:
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
        try:
            for child in os.listdir(fd):
                _remove(fd, child)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=parent)
    else:
        os.unlink(name, dir_fd=parent)


def _put(parent: int, name: str, source: Path) -> None:
    """`source` (from the copy) as `name` in `parent`: a dir, a link or a file's bytes."""
    st = os.lstat(source)
    if stat.S_ISDIR(st.st_mode):
        try:
            os.mkdir(name, 0o755, dir_fd=parent)
        except FileExistsError:
            cur = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if not stat.S_ISDIR(cur.st_mode):
                _remove(parent, name)
                os.mkdir(name, 0o755, dir_fd=parent)
        return
    if stat.S_ISLNK(st.st_mode):
        _remove(parent, name)
        os.symlink(os.readlink(source), name, dir_fd=parent)
        return
    if not stat.S_ISREG(st.st_mode):
        return  # no devices, fifos or sockets come back
    _remove(parent, name)
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o755 if st.st_mode & 0o100 else 0o644, dir_fd=parent)
    with open(fd, "wb") as dst, source.open("rb") as src:
        copy_sparse(src, dst)  # holes kept: a sparse file cost the agent nothing


def apply(project: Path, copy: Path, found: list[Change]) -> list[str]:
    """Bring the changes back into the project (deletions first); returns what could not
    be applied (a path through a link, say), one line each."""
    skipped: list[str] = []
    root = os.open(project, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for change in sorted(found, key=lambda c: (c.kind != "deleted", c.path)):
            try:
                parent, name = _open_parent(root, change.path,
                                            create=change.kind != "deleted")
            except FileNotFoundError:
                continue  # inside a directory already deleted
            except OSError as exc:
                skipped.append(f"{change.path}: {exc.strerror}")
                continue
            try:
                if change.kind == "deleted":
                    _remove(parent, name)
                else:
                    _put(parent, name, copy / change.path)
            except OSError as exc:
                skipped.append(f"{change.path}: {exc.strerror}")
            finally:
                os.close(parent)
    finally:
        os.close(root)
    return skipped


def confirm() -> bool:
    """A `y` from the user's terminal (not from a pipe)."""
    try:
        with open("/dev/tty", "r+") as tty:
            tty.write("agentkernel: apply these changes to the project? [y/N] ")
            tty.flush()
            return tty.readline().strip().lower() in ("y", "yes")
    except OSError:
        return False


def finish(project: Path, copy: Path, exit_code: int, *, apply_flag: bool, quiet: bool) -> None:
    """After the agent: show its changes, apply them when asked, drop the copy."""
    try:
        found = changes(project, copy)
        if not found:
            if not quiet:
                print("agentkernel: review: the agent changed nothing", file=sys.stderr)
            return
        show(project, copy, found, sys.stdout)
        sys.stdout.flush()
        if apply_flag and exit_code != 0:
            print(f"agentkernel: review: not applied (the agent exited {exit_code})",
                  file=sys.stderr)
            return
        if apply_flag or (sys.stdin is not None and sys.stdin.isatty() and confirm()):
            skipped = apply(project, copy, found)
            for line in skipped:
                print(f"agentkernel: review: not applied: {_printable(line)}",
                      file=sys.stderr)
            print(f"agentkernel: review: applied {len(found) - len(skipped)} change(s) to "
                  f"{project}", file=sys.stderr)
        else:
            print("agentkernel: review: not applied (answer y, or run with --apply)",
                  file=sys.stderr)
    finally:
        shutil.rmtree(copy.parent, ignore_errors=True)
