"""Protocol v1 (revision 1.3) between the host and ak-agent: constants, frame and TLV encoding."""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Sequence
from enum import IntEnum
from typing import NamedTuple

from ..errors import ProtocolError

VERSION = 1
HEADER = struct.Struct("<IHHI")  # payload length, type, flags, channel
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 1024 * 1024
MAX_PATH = 4096
MAX_ARGV = 4096
MAX_ENV = 4096
MAX_PING = 1024
MIN_ENTROPY = 16  # CLONE: random bytes per request
MAX_ENTROPY = 4096
MAX_HOSTNAME = 64
MAX_CLONE_DISKS = 8
FILE_CHUNK = 256 * 1024
STDIN_CHUNK = 256 * 1024

_TLV = struct.Struct("<HI")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")
_RLIMIT = struct.Struct("<IQQ")
_WINSIZE = struct.Struct("<HH")


class T(IntEnum):
    """Frame types."""

    PING = 0x01
    EXEC = 0x02
    STDIN = 0x03
    SIGNAL = 0x04
    RESIZE = 0x05
    FILE_READ = 0x06
    FILE_WRITE = 0x07
    FILE_CHUNK = 0x08
    FILE_CLOSE = 0x09
    STAT = 0x0A
    LIST = 0x0B
    MKDIR = 0x0C
    REMOVE = 0x0D
    SHUTDOWN = 0x0E
    CLONE = 0x0F  # revision 1.1: a VM restored from a snapshot becomes its own machine
    PAUSE = 0x10  # revision 1.2: stop sending this channel's output (back-pressure)...
    RESUME = 0x11  # ...until this
    CANCEL = 0x12  # revision 1.2: the host gave up on a command or transfer
    QUERY = 0x13  # revision 1.3: has the command on this channel ended, and how?
    HELLO = 0x41
    PONG = 0x42
    STARTED = 0x43
    STDOUT = 0x44
    STDERR = 0x45
    EXIT = 0x46
    OK = 0x47
    ERROR = 0x48
    FILE_DATA = 0x49
    FILE_END = 0x4A
    STAT_RESULT = 0x4B
    LIST_RESULT = 0x4C


class Tag(IntEnum):
    """TLV tags."""

    ARGV = 1
    ENV = 2
    CWD = 3
    UID = 4
    GID = 5
    TIMEOUT_MS = 6
    STDIN = 7
    PTY = 8
    RLIMIT = 9
    UMASK = 10
    GIVEN_STDIO = 11  # EXEC: stdin and stdout are the agent's --give descriptor
    PATH = 20
    OFFSET = 21
    LENGTH = 22
    MODE = 23
    APPEND = 24
    MKDIRS = 25
    SIZE = 26
    FOLLOW = 27
    PARENTS = 28
    RECURSIVE = 29
    VERSION = 40
    PID = 41
    AGENT_NAME = 42
    AGENT_UID = 43
    FEATURES = 44  # HELLO, revision 1.3: bits of what the agent serves (FEATURE_*)
    CODE = 50
    SIGNAL = 51
    TIMED_OUT = 52
    CORE = 53
    ERRNO = 60
    MESSAGE = 61
    STAGE = 62  # extension: which step of EXEC failed ("exec", "chdir", ...)
    TYPE = 70
    ST_MODE = 71
    ST_SIZE = 72
    MTIME_NS = 73
    ST_UID = 74
    ST_GID = 75
    LINK_TARGET = 76
    NAME = 80
    ENTROPY = 90
    HOSTNAME = 91
    WALLCLOCK_NS = 92
    DISK = 93


FEATURE_QUERY = 1  # HELLO FEATURES: the agent answers QUERY (revision 1.3)

FILE_TYPES = {1: "file", 2: "dir", 3: "symlink", 4: "other"}

TLV = tuple[int, bytes]


class Frame(NamedTuple):
    """One decoded frame."""

    type: int
    chan: int
    payload: bytes
    flags: int = 0


def encode_frame(ftype: int, chan: int, payload: bytes = b"") -> bytes:
    """Header + payload; refuses payloads the agent would reject as oversize."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(len(payload), ftype, 0, chan) + payload


def decode_header(data: bytes) -> tuple[int, int, int, int]:
    """(length, type, flags, chan); raises ProtocolError on an oversize length."""
    length, ftype, flags, chan = HEADER.unpack(data)
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"frame length {length} exceeds {MAX_PAYLOAD}")
    return length, ftype, flags, chan


def decode_frames(data: bytes) -> tuple[list[Frame], bytes]:
    """Split a byte buffer into complete frames; returns them and the unconsumed rest."""
    frames: list[Frame] = []
    pos = 0
    while len(data) - pos >= HEADER_SIZE:
        length, ftype, flags, chan = decode_header(data[pos : pos + HEADER_SIZE])
        end = pos + HEADER_SIZE + length
        if end > len(data):
            break
        frames.append(Frame(ftype, chan, bytes(data[pos + HEADER_SIZE : end]), flags))
        pos = end
    return frames, bytes(data[pos:])


def tlv(tag: int, value: bytes) -> bytes:
    """One TLV."""
    return _TLV.pack(tag, len(value)) + value


def encode_tlvs(items: Iterable[TLV]) -> bytes:
    """A TLV sequence."""
    return b"".join(tlv(tag, value) for tag, value in items)


def decode_tlvs(payload: bytes) -> list[TLV]:
    """Parse a TLV sequence; ProtocolError if it is truncated."""
    out: list[TLV] = []
    pos = 0
    n = len(payload)
    while pos < n:
        if n - pos < _TLV.size:
            raise ProtocolError("truncated TLV header")
        tag, length = _TLV.unpack_from(payload, pos)
        pos += _TLV.size
        if length > n - pos:
            raise ProtocolError(f"TLV {tag} claims {length} bytes, only {n - pos} left")
        out.append((tag, bytes(payload[pos : pos + length])))
        pos += length
    return out


def u8(v: int) -> bytes:
    return bytes((v & 0xFF,))


def u16(v: int) -> bytes:
    return _U16.pack(v)


def u32(v: int) -> bytes:
    return _U32.pack(v)


def u64(v: int) -> bytes:
    return _U64.pack(v)


def text(s: str | bytes, what: str = "string", limit: int | None = None) -> bytes:
    """Encode a protocol string: UTF-8 (surrogateescape), NUL-free, bounded."""
    b = s if isinstance(s, bytes) else s.encode("utf-8", "surrogateescape")
    if b"\0" in b:
        raise ValueError(f"{what} must not contain NUL: {s!r}")
    if limit is not None and len(b) > limit:
        raise ValueError(f"{what} is longer than {limit} bytes")
    return b


def path_bytes(path: str) -> bytes:
    """An absolute, NUL-free path of at most MAX_PATH bytes."""
    b = text(path, "path", MAX_PATH)
    if not b.startswith(b"/"):
        raise ValueError(f"path must be absolute: {path!r}")
    return b


def as_uint(value: bytes, what: str = "integer") -> int:
    """Decode an unsigned LE integer of 1, 2, 4 or 8 bytes."""
    if len(value) not in (1, 2, 4, 8):
        raise ProtocolError(f"{what}: bad integer width {len(value)}")
    return int.from_bytes(value, "little")


def as_i32(value: bytes) -> int:
    if len(value) != 4:
        raise ProtocolError("i32 value must be 4 bytes")
    return int(_I32.unpack(value)[0])


def as_str(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def tlv_dict(payload: bytes) -> dict[int, bytes]:
    """Last value per tag (for messages without repeated tags)."""
    return dict(decode_tlvs(payload))


def encode_exec(
    argv: Sequence[str | bytes],
    *,
    env: Iterable[tuple[str, str]] | None = None,
    cwd: str | None = None,
    uid: int | None = None,
    gid: int | None = None,
    timeout_ms: int = 0,
    stdin: bool = False,
    pty: tuple[int, int] | None = None,
    rlimits: Sequence[tuple[int, int, int]] = (),
    umask: int | None = None,
    given_stdio: bool = False,
) -> bytes:
    """Payload of an EXEC request."""
    if not argv:
        raise ValueError("argv must not be empty")
    if len(argv) > MAX_ARGV:
        raise ValueError(f"argv has more than {MAX_ARGV} entries")
    items: list[TLV] = [(Tag.ARGV, text(a, "argv entry")) for a in argv]
    env_items = list(env or ())
    if len(env_items) > MAX_ENV:
        raise ValueError(f"env has more than {MAX_ENV} entries")
    for key, val in env_items:
        if not key or "=" in key:
            raise ValueError(f"bad environment variable name: {key!r}")
        items.append((Tag.ENV, text(f"{key}={val}", "environment entry")))
    if cwd is not None:
        items.append((Tag.CWD, text(cwd, "cwd", MAX_PATH)))
    if uid is not None:
        items.append((Tag.UID, u32(uid)))
    if gid is not None:
        items.append((Tag.GID, u32(gid)))
    if timeout_ms:
        items.append((Tag.TIMEOUT_MS, u32(timeout_ms)))
    if stdin:
        items.append((Tag.STDIN, u8(1)))
    if pty is not None:
        items.append((Tag.PTY, _WINSIZE.pack(*pty)))
    for resource, soft, hard in rlimits:
        items.append((Tag.RLIMIT, _RLIMIT.pack(resource, soft, hard)))
    if umask is not None:
        items.append((Tag.UMASK, u32(umask)))
    if given_stdio:
        items.append((Tag.GIVEN_STDIO, u8(1)))
    payload = encode_tlvs(items)
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("command line and environment exceed the 1 MiB request limit")
    return payload


def winsize(rows: int, cols: int) -> bytes:
    return _WINSIZE.pack(rows, cols)


_HOSTNAME_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
_DISK_SERIAL = re.compile(r"[A-Za-z0-9_-]{1,20}")


def hostname_bytes(name: str) -> bytes:
    """A host name the agent accepts: dot-joined RFC 1123 labels, at most 64 bytes."""
    if not name or len(name) > MAX_HOSTNAME or not all(
            _HOSTNAME_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"not a valid host name: {name!r}")
    return name.encode("ascii")


def encode_clone(entropy: bytes, *, hostname: str | None = None, wallclock_ns: int | None = None,
                 disks: Sequence[tuple[str, str, bool]] = ()) -> bytes:
    """The CLONE payload: fresh random bytes, host name, wall clock, disks to mount.

    `disks` are (serial, absolute target, read-only) triples.
    """
    if not MIN_ENTROPY <= len(entropy) <= MAX_ENTROPY:
        raise ValueError(f"CLONE wants {MIN_ENTROPY}..{MAX_ENTROPY} random bytes")
    items: list[TLV] = [(Tag.ENTROPY, entropy)]
    if hostname is not None:
        items.append((Tag.HOSTNAME, hostname_bytes(hostname)))
    if wallclock_ns is not None:
        if not 0 <= wallclock_ns < 2**64:
            raise ValueError("wall clock out of range")
        items.append((Tag.WALLCLOCK_NS, u64(wallclock_ns)))
    if len(disks) > MAX_CLONE_DISKS:
        raise ValueError(f"CLONE mounts at most {MAX_CLONE_DISKS} disks")
    for serial, target, readonly in disks:
        if not _DISK_SERIAL.fullmatch(serial):
            raise ValueError(f"bad disk serial {serial!r}")
        if (not target.startswith("/") or len(target) > 255 or any(c in target for c in ":,\0")
                or "/../" in target + "/"):
            raise ValueError(f"bad mount target {target!r}")
        items.append((Tag.DISK, f"{serial}:{target}:{'ro' if readonly else 'rw'}".encode()))
    return encode_tlvs(items)
