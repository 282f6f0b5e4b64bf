"""Validation of sandbox names and in-sandbox paths, run before either reaches a filesystem path."""

from __future__ import annotations

from .errors import UsageError

MAX_NAME_LEN = 63
MAX_PATH_BYTES = 4096

# A name is alphanumeric runs joined by single '-' or '_': that encodes every §2.1 rule
# (charset, alphanumeric first/last char, no "--", "__", "-_" or "_-"). Checked by hand,
# not by a regex: `exec` validates names on the CLI's hot path, where `re` costs ~3 ms.
_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_SEPARATORS = frozenset("-_")


def _is_name(name: str) -> bool:
    previous_sep = True  # so that a leading separator fails
    for c in name:
        if c in _ALNUM:
            previous_sep = False
        elif c in _SEPARATORS and not previous_sep:
            previous_sep = True
        else:
            return False
    return not previous_sep


def _show(value: str) -> str:
    # Hostile input (control chars, huge strings) must not mangle the error line.
    return repr(value[:80] + ("..." if len(value) > 80 else ""))


def validate_sandbox_name(name: str) -> str:
    """Return ``name`` if it is a valid sandbox name, else raise UsageError saying why."""
    if not isinstance(name, str):
        raise UsageError(f"sandbox name must be a string, not {type(name).__name__}")
    if not name:
        raise UsageError("sandbox name must not be empty")
    if len(name) > MAX_NAME_LEN:
        raise UsageError(
            f"sandbox name {_show(name)} is {len(name)} characters long (max {MAX_NAME_LEN})"
        )
    if _is_name(name):
        return name
    bad = sorted({c for c in name if not (c.isascii() and (c.isalnum() or c in "-_"))})
    if bad:
        why = (
            "may only contain ASCII letters, digits, '-' and '_' (found "
            + ", ".join(repr(c) for c in bad)
            + ")"
        )
    elif not name[0].isalnum() or not name[-1].isalnum():
        why = "must start and end with a letter or digit"
    else:
        why = "must not contain '--', '__', '-_' or '_-'"
    raise UsageError(f"invalid sandbox name {_show(name)}: {why}")


def sanitize_sandbox_name(text: str, fallback: str = "sandbox") -> str:
    """Best-effort valid sandbox name derived from ``text`` (e.g. a directory name)."""
    import re

    runs = re.findall(r"[A-Za-z0-9]+", text, flags=re.ASCII)
    name = "-".join(runs)[:MAX_NAME_LEN].rstrip("-")
    return name or fallback


def validate_sandbox_path(path: str) -> str:
    """Return the normalised form of an absolute in-sandbox path, or raise UsageError.

    Rejects NUL, relative paths, over-long paths and any ``..`` component (a name that merely
    contains ``..``, like ``/tmp/a..b``, is fine). ``//`` and ``/./`` are collapsed and a
    trailing slash dropped.
    """
    if not isinstance(path, str):
        raise UsageError(f"sandbox path must be a string, not {type(path).__name__}")
    if "\x00" in path:
        raise UsageError(f"sandbox path {_show(path)} contains a NUL byte")
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError:
        raise UsageError(f"sandbox path {_show(path)} is not valid UTF-8") from None
    if size > MAX_PATH_BYTES:
        raise UsageError(f"sandbox path is {size} bytes long (max {MAX_PATH_BYTES})")
    if not path.startswith("/"):
        raise UsageError(f"sandbox path {_show(path)} must be absolute (start with '/')")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UsageError(f"sandbox path {_show(path)} must not contain a '..' component")
    return "/" + "/".join(parts)
