"""Checks and conversions of API inputs (env, durations, argv) before the service sees them."""

from __future__ import annotations

import re

from ..backends import BACKEND_NAMES
from ..errors import UsageError

_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
_DURATION_PART = re.compile(r"(\d{1,9})([smhdw]?)", re.ASCII)
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_DURATION = 365 * 86400
BACKEND_CHOICES = ("auto", *BACKEND_NAMES)
PROFILE_CHOICES = ("permissive", "moderate", "restrictive")


def parse_env(pairs: list[str] | None) -> dict[str, str]:
    """`["K=V", ...]` to a dict. Unlike the CLI's `-e K`, a bare key is an error here: the
    server's own environment is never forwarded to a sandbox."""
    env: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"environment entry {key[:64]!r} must be KEY=VALUE")
        if not _ENV_KEY.fullmatch(key):
            raise UsageError(f"invalid environment variable name {key[:64]!r}")
        if "\x00" in value:
            raise UsageError(f"environment variable {key} contains a NUL byte")
        env[key] = value
    return env


def parse_duration(text: str) -> float:
    """Seconds in `30m`, `2d`, `1h30m` or a bare number of seconds; at most a year."""
    s = text.strip().lower()
    pos = 0
    total = 0
    units_seen: set[str] = set()
    while pos < len(s):
        match = _DURATION_PART.match(s, pos)
        if match is None or (match.group(2) == "" and match.end() != len(s)):
            raise UsageError(f"invalid duration {text[:40]!r}: use e.g. 90s, 30m, 1h30m, 2d")
        unit = match.group(2)
        if unit in units_seen:
            raise UsageError(f"invalid duration {text[:40]!r}: unit {unit or 's'!r} repeated")
        units_seen.add(unit)
        total += int(match.group(1)) * _UNIT[unit]
        pos = match.end()
    if pos == 0:
        raise UsageError("duration must not be empty")
    if total <= 0:
        raise UsageError(f"duration {text[:40]!r} must be positive")
    if total > MAX_DURATION:
        raise UsageError(f"duration {text[:40]!r} is longer than 365 days")
    return float(total)


def check_argv(argv: list[str]) -> list[str]:
    if not argv or not argv[0]:
        raise UsageError("command must not be empty")
    if any("\x00" in arg for arg in argv):
        raise UsageError("command arguments must not contain NUL bytes")
    return argv


def check_workdir(workdir: str | None) -> str | None:
    if workdir is None or workdir == "":
        return None
    from ..names import validate_sandbox_path

    return validate_sandbox_path(workdir)


def check_profile(profile: str | None) -> str | None:
    if profile is None or profile == "":
        return None
    if profile not in PROFILE_CHOICES:
        raise UsageError(f"unknown profile {profile[:40]!r}: choose {', '.join(PROFILE_CHOICES)}")
    return profile


def check_backend(backend: str | None) -> str | None:
    if backend is None or backend == "":
        return None
    if backend not in BACKEND_CHOICES:
        raise UsageError(f"unknown backend {backend[:40]!r}: choose {', '.join(BACKEND_CHOICES)}")
    return backend


def check_image(image: str | None) -> str | None:
    if image is None or image == "":
        return None
    if image == "host":
        return image
    from ..detect import validate_image_ref

    return validate_image_ref(image)
