"""The caller's context on the wire: which environment variables change a plan (zero imports).

A run is planned from its caller's context (planner.py): the directory it was asked from,
its user config file, and the environment variables below. The CLI sends this to the
daemon with every `run` and `create`, so that the daemon never plans a caller's run from
its own environment. This module is on the CLI's hot path: it imports nothing.
"""

from __future__ import annotations

import os

# Variables the planner reads (registry mirrors and TLS, credentials, microVM settings).
PLAN_ENV_KEYS = (
    "AGENTKERNEL_REGISTRY_MIRROR",  # images/registry.py MIRROR_ENV
    "AGENTKERNEL_REGISTRY_CA",  # images/registry.py CA_ENV
    "DOCKER_CONFIG",  # where registry credentials are read
    "AGENTKERNEL_MICROVM_ALLOW_EMULATION",  # vm/settings.py ENV_*
    "AGENTKERNEL_MICROVM_KERNEL",
    "AGENTKERNEL_MICROVM_VMM",
    "AGENTKERNEL_MICROVM_SNAPSHOT",
)
# Variables a profile with pass_env copies into the sandbox (as profiles.PASS_ENV_KEYS);
# HOME is also where the profile's mount_home looks.
PASS_ENV_KEYS = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "TERM")
CONTEXT_ENV_KEYS = PLAN_ENV_KEYS + PASS_ENV_KEYS


def caller_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The part of an environment (default: ours) that a plan may depend on."""
    source = os.environ if environ is None else environ
    return {k: source[k] for k in CONTEXT_ENV_KEYS if k in source}


def user_config_path(env: dict[str, str] | None = None) -> str | None:
    """The user's own config file, if it exists: $XDG_CONFIG_HOME/agentkernel/config.toml
    (else agentkernel.toml there, its older name), read from the caller's environment; a
    relative $XDG_CONFIG_HOME is ignored, as the XDG spec says (paths.user_config_dir_str)."""
    source = os.environ if env is None else env
    xdg = source.get("XDG_CONFIG_HOME") or ""
    if not os.path.isabs(xdg):
        xdg = os.path.join(source.get("HOME") or os.path.expanduser("~"), ".config")
    for name in ("config.toml", "agentkernel.toml"):
        path = os.path.join(xdg, "agentkernel", name)
        if os.path.isfile(path):
            return path
    return None
