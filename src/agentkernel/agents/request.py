"""What an agent adds to a run or a kept sandbox: its install, variables, hosts and key.

One place for `run --agent` and `create --agent` / HTTP's `agent`, through the planner
(`with_agent`), in-process or in the daemon. It imports neither the planner nor a front door: the
planner calls `agent_run` and merges the result into the request under the caller's own
settings (the user's -e, --allow-host, -m win).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from ..errors import UsageError
from .registry import AgentSpec, get
from .status import agents_dir, covering_secret, installed_binary, key_hosts

if TYPE_CHECKING:
    from ..secrets_store import Use

AGENT_MOUNT = "/run/agentkernel"  # /run is always the sandbox's own tmpfs: a mount point
SANDBOX_HOME = "/root"  # the sandbox root's, where an agent has no user of its own
# The agent CLIs are Node or Bun programs that need more than moderate's 512 MiB (Bun
# aborts at start under a 512 MiB RLIMIT_DATA, the cap an ordinary user gets): 4 GiB
# unless -m says otherwise.
AGENT_MEMORY_MB = 4096
# The backends an agent runs on: each shows the agent's install and the project at its own
# path from the host and keeps the key outside with its egress gate. None/auto: namespaces.
AGENT_BACKENDS = ("namespaces", "gvisor")
# Why the others cannot, said when one is asked for.
AGENT_REFUSALS = {
    "microvm": "a microVM's guest gets neither the host's userland the agent CLIs are built "
               "for nor the project itself (the project is a copy on a disk of the VM's: "
               "the agent's edits would never reach it; this guest kernel has no shared "
               "filesystem)",
    "wasm": "the agent CLIs are native programs, not WASI modules",
}
# An agent runs as this uid and gid inside, not 0, its HOME a dir of its own (fresh for a
# one-shot run, kept with a kept sandbox's /home; the project, read-write, shows as its
# files: see SandboxSpec.user). On every backend an agent runs on (agent_user).
AGENT_USER = (1000, 1000, "/home/agent")
USER_BACKENDS = AGENT_BACKENDS


def agent_user(backend: str, *, persistent: bool) -> tuple[int, int, str] | None:
    """The agent's user on `backend` (None: the sandbox's root): uid 1000 on namespaces
    and gVisor, one-shot or kept (`persistent`: the same user; a kept sandbox keeps it in
    its record), whoever starts it (gVisor: backends/gvisor._user_args)."""
    return AGENT_USER if backend in USER_BACKENDS else None


def user_line(backend: str, user: object) -> str:
    """What `run --agent -v` says of the agent's user (`user`: the plan's, as data, on
    `backend`)."""
    if isinstance(user, (list, tuple)) and len(user) == 3:
        return f"agent user: uid {user[0]}, gid {user[1]}, HOME {user[2]}"
    return "agent user: the sandbox's root, without capabilities"


def agent_home(backend: str) -> str:
    """The agent's HOME inside an agent sandbox on `backend`."""
    return AGENT_USER[2] if backend in USER_BACKENDS else SANDBOX_HOME


class AgentRun(NamedTuple):
    """The agent's share of a request."""

    binary: str  # its executable, inside
    env: dict[str, str]  # under the caller's -e
    hosts: tuple[str, ...]  # its API hosts (and its keys'), under the caller's lists
    ro_binds: tuple[tuple[str, str], ...]  # its install, read-only
    secret: str | None  # a stored secret that covers it, for the planner to grant
    # The key the caller holds in its environment (`run --agent`): where it may go; its
    # value reaches the gate when the sandbox is taken, never the plan.
    held: Use | None = None


def installed_dir(spec: AgentSpec) -> str:
    """agentkernel's install of the agent; UsageError with the command that installs it."""
    import os

    if not os.access(installed_binary(spec), os.X_OK):
        raise UsageError(f"{spec.name} is not installed for sandboxes: run "
                         f"`agentkernel agents install {spec.id}` first")
    return str(agents_dir() / spec.id)


def agent_backend(backend: str | None) -> str:
    """The backend an agent sandbox runs on: the one asked for if it can (namespaces,
    gvisor), namespaces for none or `auto`; UsageError saying why for the others."""
    if backend in (None, "auto"):
        return "namespaces"
    if backend in AGENT_BACKENDS:
        return backend
    why = AGENT_REFUSALS.get(backend, "agent sandboxes are not built on it yet")
    raise UsageError(f"an agent cannot run on the {backend} backend: {why}; use "
                     f"{' or '.join(AGENT_BACKENDS)}")


def key_use(spec: AgentSpec, env: str) -> Use:
    """Where the key in the caller's variable `env` may go (one of the row's key
    variables): its API hosts and header, its placeholder's variable. Named `env:VAR`,
    which no stored secret's name can be."""
    from ..egress_policy import normalize_name
    from ..secrets_store import Use

    for key in spec.keys:
        if key.env == env:
            return Use(f"env:{key.env}",
                       tuple(normalize_name(h) for h in key_hosts(spec, key)),
                       key.header_name, key.sandbox_env)
    raise UsageError(f"{env[:40]!r} is not a key variable of {spec.name}")


def agent_run(agent_id: str, default_path: str, *, stored_key: bool = True,
              key_env: str | None = None) -> AgentRun:
    """The agent's install bound read-only, its variables, its hosts and its key: the
    caller's (`key_env`, the variable it holds it in) or else (with `stored_key`) the
    stored secret that covers it. UsageError for an unknown or uninstalled agent."""
    spec = get(agent_id)
    source, inside = installed_dir(spec), f"{AGENT_MOUNT}/{spec.id}"
    bin_dir = f"{inside}/node_modules/.bin"
    env = dict(spec.run_env)
    env.update(PATH=f"{bin_dir}:{default_path}", HOME=SANDBOX_HOME)
    hosts = list(spec.hosts)
    for key in spec.keys:
        hosts += [h for h in key_hosts(spec, key) if h not in hosts]
    held = key_use(spec, key_env) if key_env else None
    return AgentRun(f"{bin_dir}/{spec.binary}", env, tuple(hosts), ((source, inside),),
                    covering_secret(spec) if stored_key and held is None else None, held)
