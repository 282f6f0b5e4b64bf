"""A failed pull remembered briefly, per user and registry settings, so offline runs are quiet.

Without a registry, every run whose image is not stored would try the pull again (a DNS
failure at best, a connect timeout at worst) and print the same long error. A failure is
kept for FAILED_PULL_SECONDS in the data dir's cache, under a key made of the image and the
settings that decide where it is pulled from (default registry, mirrors, insecure
registries, CA file): the same run with another mirror tries again at once, and
`agentkernel images pull` always does.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from ..errors import AgentKernelError

FAILED_PULL_SECONDS = 60.0
SHORT_REASON = 100  # characters of a registry's own reason kept in the one-line note


def short_reason(exc: AgentKernelError) -> str:
    """Why a pull failed, in a few words (`registry-1.docker.io unreachable`)."""
    short = getattr(exc, "short", None)
    text = short if isinstance(short, str) and short else exc.message
    return text if len(text) <= SHORT_REASON else text[: SHORT_REASON - 1] + "…"


def _memo_file(image: str, config: Any) -> Path:
    """`config`: the RegistryOptions the pull used (the caller's settings), or a Config."""
    import hashlib

    from ..paths import data_dir
    from .registry import RegistryOptions

    opts = config if isinstance(config, RegistryOptions) else RegistryOptions.from_config(config)
    what = image + "\n" + opts.fingerprint()
    digest = hashlib.sha256(what.encode()).hexdigest()[:24]
    return data_dir() / "cache" / f"pull-failed-{digest}"


def recent_failure(image: str, config: Any) -> str | None:
    """The short reason of a failed pull of `image` with these settings in the last
    FAILED_PULL_SECONDS, else None."""
    try:
        stamp, reason = _memo_file(image, config).read_text().split("\n", 1)
        age = time.time() - float(stamp)
    except (OSError, ValueError):
        return None
    return reason.strip() if 0 <= age < FAILED_PULL_SECONDS else None


def remember_failure(image: str, config: Any, reason: str) -> None:
    from ..paths import write_cache

    write_cache(_memo_file(image, config), f"{time.time()}\n{reason}\n")


def forget_failure(image: str, config: Any) -> None:
    """A pull that worked: the next run must not skip it because of an older failure."""
    with contextlib.suppress(OSError):
        _memo_file(image, config).unlink()
