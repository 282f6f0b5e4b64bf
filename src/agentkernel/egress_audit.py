"""The host-side egress audit log: every gate's decisions, one JSON line each, bounded and
rotated, kept after the sandbox is gone (in the data dir; never bodies, never secret values).

Each sandbox name has its own pair of files in `<data dir>/egress-audit/`: `NAME.jsonl` and
the rotated `NAME.jsonl.1`, so a sandbox's traffic rotates out only its own entries, never
another's. Its gates append through descriptors opened before dropping their privileges
(they can no longer open or rename anything in the data dir), so rotation is done through
them too: under an exclusive flock, a file past CAP is copied over the previous one (`.1`)
and emptied. Readers take the lock shared. The total stays bounded: opening a new name's
files past KEEP + SLACK names removes those of the least recently written down to KEEP
(never a live writer's: each holds a shared lock on its `.1` for as long as it lives),
which only a new sandbox does, not any sandbox's traffic.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

AUDIT_DIR = "egress-audit"
SUFFIX = ".jsonl"
CAP = 256 * 1024  # bytes per file; with the rotated one at most twice that per name
KEEP = 64  # sandbox names whose files are kept after a prune
SLACK = 8  # names past KEEP before one: at most (KEEP + SLACK) * 2 * CAP (36 MiB) in all
MAX_FIELD = 300  # characters of a string field (a rule, an error, a host)
MAX_READ = 1000  # entries one read returns (the newest)
# What an entry may carry: decisions and byte counts only. (The gate's log fields are
# chosen by the gate, but this list is what keeps a future field from leaking here.)
FIELDS = ("kind", "host", "addr", "port", "qtype", "allowed", "rule", "error", "sent",
          "received", "secret_requests", "op", "entry", "answers", "dropped", "note")
FIELD_SET = frozenset(FIELDS)
# One encoder made once: json.dumps with separators makes a new one per call (3x slower,
# and a gate writes two entries per connection).
encode = json.JSONEncoder(separators=(",", ":")).encode


def audit_path() -> Path:
    """The directory of every sandbox's audit files."""
    from .paths import data_dir

    return data_dir() / AUDIT_DIR


def sandbox_file(directory: str | Path, sandbox: str) -> str:
    """The current audit file of the sandbox called `sandbox` (a valid name: a path part)."""
    from .names import validate_sandbox_name

    return os.path.join(directory, validate_sandbox_name(sandbox) + SUFFIX)


def _clip(value: Any) -> Any:
    if isinstance(value, str):
        return value[:MAX_FIELD]
    if isinstance(value, list):
        return [_clip(v) for v in value[:8]]
    return value if isinstance(value, (int, float, bool)) or value is None else str(value)[:80]


_PLAIN = (int, bool, float, type(None))


def clipped(fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` with every value cut to what an entry may hold (strings, lists)."""
    out = {}
    for key, value in fields.items():
        kind = type(value)
        if kind is str:
            out[key] = value if len(value) <= MAX_FIELD else value[:MAX_FIELD]
        elif kind in _PLAIN:
            out[key] = value
        else:
            out[key] = _clip(value)
    return out


class AuditWriter:
    """One gate's end of the audit log: the current file and the rotated one, opened
    before the gate drops its privileges."""

    def __init__(self, directory: str, sandbox: str, instance: str = "") -> None:
        path = sandbox_file(directory, sandbox)
        try:
            self.fd, self.old = _open_pair(path)
        except FileNotFoundError:  # the first of all
            os.makedirs(directory, mode=0o700, exist_ok=True)
            self.fd, self.old = _open_pair(path)
        if os.fstat(self.fd).st_size == 0:  # a new name (or one with nothing yet): the
            with contextlib.suppress(OSError):  # count of names may have grown
                _prune(directory, os.path.basename(path))
        self.sandbox = sandbox[:128]
        self.instance = instance[:64]  # which life of `sandbox` (SandboxSpec.instance)
        self.tag = self._tag()

    @classmethod
    def from_fds(cls, fd: int, old: int, sandbox: str, instance: str = "") -> AuditWriter:
        """One over files opened by someone else (an activated gate's, opened by its
        starter when it registered the sandbox)."""
        writer = cls.__new__(cls)
        writer.fd, writer.old, writer.sandbox = fd, old, sandbox[:128]
        writer.instance = instance[:64]
        writer.tag = writer._tag()
        return writer

    def _tag(self) -> str:
        """What every entry of this writer carries after its time: sandbox, instance."""
        return encode({"sandbox": self.sandbox,
                       **({"instance": self.instance} if self.instance else {})})[1:-1]

    def write(self, fields: dict[str, Any]) -> None:
        self.append(self.line(repr(round(time.time(), 3)),
                              encode(clipped({k: fields[k] for k in FIELDS if k in fields}))))

    def line(self, t: str, body: str) -> bytes:
        """The entry at time `t` (seconds, as JSON) whose fields are `body`: a JSON
        object (compact, as `encode` makes it) of FIELDS only, each `clipped`."""
        fields = "," + body[1:] if len(body) > 2 else "}"
        return f'{{"t":{t},{self.tag}{fields}\n'.encode()

    def append(self, lines: bytes) -> None:
        """Whole entries (`line`s), appended in one write (rotated first if they would
        take the file past CAP)."""
        if not lines:
            return
        try:  # (not contextlib.suppress: a gate writes two entries per connection)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                if os.fstat(self.fd).st_size + len(lines) > CAP:
                    self._rotate()
                os.write(self.fd, lines)
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError:
            pass

    def _rotate(self) -> None:
        """The current file becomes the previous one; the current starts empty."""
        os.ftruncate(self.old, 0)
        size, done = os.fstat(self.fd).st_size, 0
        while done < size:
            n = os.copy_file_range(self.fd, self.old, size - done, done, done)
            if n <= 0:
                break
            done += n
        os.ftruncate(self.fd, 0)


def _open_pair(path: str) -> tuple[int, int]:
    """A name's current file (to append) and rotated one, the latter locked shared for as
    long as any copy of its descriptor lives (what keeps `_prune` off a live name's)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    for _ in range(3):
        fd = os.open(path, flags | os.O_APPEND, 0o600)
        try:
            old = os.open(path + ".1", flags, 0o600)
        except OSError:
            os.close(fd)
            raise
        fcntl.flock(old, fcntl.LOCK_SH)
        # A prune may have removed them between the open and the lock (it unlinks both
        # while it holds the lock): open them again.
        if os.fstat(fd).st_nlink and os.fstat(old).st_nlink:
            return fd, old
        os.close(fd)
        os.close(old)
    raise OSError(errno.EAGAIN, f"{path}: removed again and again while being opened")


def _prune(directory: str, keep: str) -> None:
    """Once there are more than KEEP + SLACK names, remove the files of the least recently
    written down to KEEP (`keep`'s and a live writer's stay: a name whose `.1` another
    holds a lock on is in use). The slack makes that one prune per SLACK new names."""
    others = [n for n in os.listdir(directory) if n.endswith(SUFFIX) and n != keep]
    if len(others) < KEEP + SLACK:
        return  # (most starts: no stat, no removal)
    excess = len(others) - (KEEP - 1)
    names = []
    for name in others:
        with contextlib.suppress(OSError):
            names.append((os.stat(os.path.join(directory, name),
                                  follow_symlinks=False).st_mtime, name))
    for _, name in sorted(names):
        if excess <= 0:
            break
        excess -= _remove_unused(os.path.join(directory, name))


def _remove_unused(path: str) -> bool:
    """Remove a name's files unless a writer holds them (whether they went)."""
    try:
        fd = os.open(path + ".1", os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        fd = -1
    except OSError:
        return False
    try:
        if fd >= 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False  # a writer of that name is alive
        for victim in (path, path + ".1"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(victim)
        return True
    finally:
        if fd >= 0:
            os.close(fd)


def _read_pair(path: str) -> bytes:
    """One name's rotated and current files, oldest first (the current one read under a
    shared lock, so never halfway through a rotation)."""
    chunks = []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return b""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        with contextlib.suppress(FileNotFoundError), \
                open(path + ".1", "rb") as old:
            chunks.append(old.read(CAP + 4096))
        chunks.append(os.pread(fd, CAP + 4096, 0))
    finally:
        os.close(fd)  # (the lock goes with it)
    return b"".join(chunks)


def read_audit(sandbox: str | None = None, limit: int = MAX_READ,
               path: Path | None = None, instance: str | None = None
               ) -> list[dict[str, object]]:
    """The newest `limit` entries (of one sandbox, or all; of one life of it with
    `instance`, or of every sandbox that had its name), oldest first. `path`: the
    directory (audit_path())."""
    directory = path or audit_path()
    if sandbox is not None:
        return _newest(_read_pair(sandbox_file(directory, sandbox)), sandbox, limit,
                       instance)
    try:
        files = sorted(p for p in directory.iterdir() if p.name.endswith(SUFFIX))
    except OSError:
        return []
    out = [e for f in files[:KEEP * 2]
           for e in _newest(_read_pair(str(f)), None, limit, instance)]
    out.sort(key=_time)
    return out[-limit:] if limit > 0 else []


def _time(entry: dict[str, object]) -> float:
    t = entry.get("t")
    return float(t) if isinstance(t, (int, float)) else 0.0


def _newest(data: bytes, sandbox: str | None, limit: int, instance: str | None
            ) -> list[dict[str, object]]:
    """The newest `limit` entries of `data` (of `sandbox` and `instance` where given)."""
    # Newest first, and only lines that can be the sandbox's are parsed (the writer's own
    # compact format): a read costs what it returns, not the whole file.
    tag = b'"sandbox":' + json.dumps(sandbox).encode() if sandbox is not None else b""
    out: list[dict[str, object]] = []
    for line in reversed(data.splitlines()):
        if len(out) >= limit:
            break
        if tag not in line:
            continue
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if isinstance(doc, dict) and (sandbox is None or doc.get("sandbox") == sandbox) \
                    and (instance is None or doc.get("instance") == instance):
                out.append(doc)
    return out[::-1]


def latest_audit(sandbox: str, limit: int = MAX_READ,
                 path: Path | None = None) -> list[dict[str, object]]:
    """The entries of the last sandbox called `sandbox` (its newest entry's instance):
    what `egress NAME log --audit` shows of a sandbox that is gone."""
    newest = read_audit(sandbox, 1, path)
    if not newest:
        return []
    instance = newest[0].get("instance")
    return read_audit(sandbox, limit, path, instance if isinstance(instance, str) else None)
