"""Security profiles: what a sandbox may see and use, and how overrides combine."""

from __future__ import annotations

from typing import Final, Literal, NamedTuple

from .errors import UsageError

# A kept sandbox's host disk quota where no config sets one: a large project's dependencies
# and build output fit (daemon/quota.py enforces it; container_upper sizes by it). Here, a
# leaf, so backends and config both read it without importing each other.
DEFAULT_DISK_MB: Final = 10 * 1024
# ptys one sandbox may hold, whatever its backend: the kernel shares pty.max less
# pty.reserve (3072 by default) among every devpts instance but the host's, and one
# sandbox took them all.
PTY_MAX: Final = 256

NetworkMode = Literal["host", "egress", "none"]
WorkspaceMode = Literal["rw", "cow", "ro", "none"]

PROFILE_NAMES = ("permissive", "moderate", "restrictive")

# An explicit "unlimited" memory or pids limit, as an override value and on the wire (a
# real limit is never 0). Without it a profile's cap always applies: only a config key or
# flag that says `unlimited` lifts one.
UNLIMITED: Final = 0
# permissive's caps: far above what a build or a test suite needs, yet a fork bomb stops at
# an eighth of the 32768 pids a default kernel has (pid_max), and a runaway allocation at a
# size that fits on any machine this runs on, before the host's OOM killer picks a victim.
PERMISSIVE_MEMORY_MB: Final = 4096
PERMISSIVE_PIDS: Final = 4096
MIN_MEMORY_MB: Final = 16
MIN_PIDS: Final = 8


class Profile(NamedTuple):
    """The resolved security settings of one sandbox."""

    name: str
    network: NetworkMode
    workspace: WorkspaceMode
    mount_home: bool
    pass_env: bool
    root_writable: bool
    memory_mb: int | None
    pids: int | None
    cpus: float | None
    seccomp: str  # policy name in agentkernel.seccomp

    def with_overrides(
        self,
        *,
        network: bool | None = None,
        workspace: WorkspaceMode | None = None,
        mount_home: bool | None = None,
        pass_env: bool | None = None,
        read_only: bool | None = None,
        memory_mb: int | None = None,
        pids: int | None = None,
        cpus: float | None = None,
    ) -> Profile:
        """Apply explicit overrides (config keys, then CLI flags); None keeps the profile's.

        `memory_mb` or `pids` equal to UNLIMITED lifts that cap.
        """
        p = self
        if network is not None:
            # Turning network *on* in a profile without it gives the safe kind: egress only.
            p = p._replace(network=("none" if not network else
                                    (p.network if p.network != "none" else "egress")))
        if workspace is not None:
            p = p._replace(workspace=workspace)
        if mount_home is not None:
            p = p._replace(mount_home=mount_home)
        if pass_env is not None:
            p = p._replace(pass_env=pass_env)
        if read_only is not None:
            p = p._replace(root_writable=not read_only)
        if memory_mb is not None:
            if memory_mb != UNLIMITED and memory_mb < MIN_MEMORY_MB:
                raise UsageError(f"memory limit {memory_mb} MiB is below the "
                                 f"{MIN_MEMORY_MB} MiB minimum")
            p = p._replace(memory_mb=memory_mb or None)
        if pids is not None:
            if pids != UNLIMITED and pids < MIN_PIDS:
                raise UsageError(f"pids limit {pids} is below the minimum of {MIN_PIDS}")
            p = p._replace(pids=pids or None)
        if cpus is not None:
            if not 0.01 <= cpus <= 1024:
                raise UsageError(f"cpus {cpus} must be between 0.01 and 1024")
            p = p._replace(cpus=cpus)
        return p


PROFILES: dict[str, Profile] = {
    "permissive": Profile(
        name="permissive", network="host", workspace="rw", mount_home=True, pass_env=True,
        root_writable=True, memory_mb=PERMISSIVE_MEMORY_MB, pids=PERMISSIVE_PIDS, cpus=None,
        seccomp="permissive",
    ),
    "moderate": Profile(
        name="moderate", network="egress", workspace="cow", mount_home=False, pass_env=False,
        root_writable=True, memory_mb=512, pids=512, cpus=1.0, seccomp="moderate",
    ),
    "restrictive": Profile(
        name="restrictive", network="none", workspace="ro", mount_home=False, pass_env=False,
        root_writable=False, memory_mb=256, pids=128, cpus=0.5, seccomp="restrictive",
    ),
}


def get_profile(name: str) -> Profile:
    """Look a profile up by name; `custom` is moderate plus the config's overrides."""
    key = name.strip().lower()
    if key == "custom":
        key = "moderate"
    try:
        return PROFILES[key]
    except KeyError:
        raise UsageError(
            f"unknown profile {name!r}: choose one of {', '.join(PROFILE_NAMES)}"
        ) from None


def parse_memory(text: str) -> int:
    """Parse a memory size like 512, 512m, 2g, 1.5G into MiB."""
    s = text.strip().lower().removesuffix("b").removesuffix("i")
    units = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}
    factor = 1.0
    if s and s[-1] in units:
        factor = units[s[-1]]
        s = s[:-1]
    try:
        value = float(s) * factor
    except ValueError:
        raise UsageError(f"invalid memory size {text!r} (examples: 512m, 2g)") from None
    # Below 1 MiB would truncate to 0, which is UNLIMITED to the caps: "1k" must not lift
    # a limit. inf (and NaN) have no size at all.
    if not 1 <= value < float("inf"):
        raise UsageError(f"invalid memory size {text!r} (at least 1m)")
    return int(value)


def _unlimited(text: str) -> bool:
    return text.strip().lower() in ("unlimited", "max")


def parse_memory_limit(text: str) -> int:
    """A memory limit in MiB for an override: a size, or UNLIMITED for `unlimited`."""
    return UNLIMITED if _unlimited(text) else parse_memory(text)


def parse_pids(text: str) -> int:
    """A pids limit for an override: a count, or UNLIMITED for `unlimited`."""
    if _unlimited(text):
        return UNLIMITED
    try:
        value = int(text.strip())
    except ValueError:
        raise UsageError(f"invalid pids limit {text!r} (a number, or unlimited)") from None
    if value < MIN_PIDS:
        raise UsageError(f"pids limit {value} is below the minimum of {MIN_PIDS}")
    return value
