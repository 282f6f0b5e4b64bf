"""What the manager's parts share: the clock and RFC 3339 times, a backend's facts, the
user, the wrong-daemon refusal."""

from __future__ import annotations

import datetime as dt
import getpass
import os
import time
from typing import TYPE_CHECKING

from ..errors import Conflict

if TYPE_CHECKING:
    from ..backends import Backend


class WrongDaemon(Conflict):
    """The caller's data dir is not this daemon's: it must run without the daemon."""


def _now() -> float:
    return time.time()


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


def _facts(backend: str) -> type[Backend]:
    """The facts of backend `backend` (its class): what it can do, how it is cleaned up."""
    from ..backends import backend_class

    return backend_class(backend)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return str(os.getuid())
