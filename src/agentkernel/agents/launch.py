"""`run --agent NAME`: an agent CLI from agentkernel's install, in a sandbox, its key outside.

The agent's binary is the one `agents install` put in the data dir, shown read-only at
/run/agentkernel/<id>. The project is the workspace (as the profile says: copy-on-write
under moderate). Egress is default-deny: the registry row's hosts and the key's API host,
plus the user's --allow-host. The key never enters the sandbox: the host's value (the
variable the registry names, in our environment, or a stored `agentkernel secret` that
covers the agent) becomes a secret of the egress gate bound to the API host and header;
the sandbox's variable holds only the placeholder. Signed-in sessions (OAuth files) are
never copied in. The agent runs as the sandbox's root: the caller's own uid (or an
unprivileged id range) outside, with no capability; $HOME is the sandbox's own /root.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, NamedTuple

from ..errors import UsageError
from .registry import AgentSpec
from .request import AGENT_MEMORY_MB
from .status import covering_secret, key_hosts

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

    from ..planner import RunRequest

TERMINAL_ENV = ("TERM", "COLORTERM", "LANG")


class KeySource(NamedTuple):
    """Where the agent's key comes from: the secret to grant (None: no key) and what to
    call it (env:VAR, secret:NAME, missing)."""

    secret: str | None
    auth: str



class RunFlow(NamedTuple):
    """How the CLI runs a command: its request from the flags, and a whole in-process run."""

    request: Callable[[argparse.Namespace, list[str]], RunRequest]
    in_process: Callable[[argparse.Namespace, list[str]], int]


def key_source(spec: AgentSpec, environ: dict[str, str]) -> KeySource:
    """The key the agent gets, as a secret: the first of its variables set in `environ`
    (held in this process's memory only), else a stored secret that covers it."""
    from ..egress_policy import normalize_name
    from ..secrets_store import MAX_VALUE, Secret, hold

    for key in spec.keys:
        value = environ.get(key.env, "").strip()
        if not value:
            continue
        if len(value) > MAX_VALUE or any(c in value for c in "\r\n\0"):
            raise UsageError(f"{key.env} must be one line of at most 64 KiB")
        name = f"env:{key.env}"
        hold(Secret(name, tuple(normalize_name(h) for h in key_hosts(spec, key)),
                    key.header_name, key.sandbox_env, value))
        return KeySource(name, name)
    stored = covering_secret(spec)
    if stored is not None:
        return KeySource(stored, f"secret:{stored}")
    return KeySource(None, "missing")


def prepare(args: argparse.Namespace, command: list[str]) -> KeySource:
    """Turn `run --agent NAME [-- ARGS]` into a plain run's flags (in place): the agent's
    binary as the command, its install bound read-only, its key as a secret, its hosts
    allowed. Returns where the key came from."""
    from ..planner import DEFAULT_PATH
    from .registry import get
    from .request import agent_backend, agent_run

    spec = get(args.agent)
    backend = agent_backend(args.backend)
    if args.no_network:
        raise UsageError("run --agent needs the network to reach the agent's API")
    agent = agent_run(spec.id, DEFAULT_PATH, stored_key=False)
    key = key_source(spec, dict(os.environ))
    env = [f"{k}={v}" for k, v in agent.env.items()]
    env += [f"{k}={os.environ[k]}" for k in TERMINAL_ENV if os.environ.get(k)]
    args.backend = backend
    args.memory = args.memory or f"{AGENT_MEMORY_MB}m"
    args.image = args.image or "host"  # the agents are built for the host's userland
    args.env = [*env, *args.env]  # the user's -e win
    args.allow_host = [*agent.hosts, *args.allow_host]
    args.secret = [*args.secret, *([key.secret] if key.secret else [])]
    args.ro_binds = list(agent.ro_binds)
    args.workspace_mode = "rw"  # the agent edits the project (or, with --review, a copy)
    # ... shown at the project's own path (a copy under --review too), when it may be:
    # planner.same_path_target falls back to /workspace with a warning otherwise.
    args.workspace_at = os.getcwd()
    args.command = [agent.binary, *command]
    return key


def missing_key_note(spec: AgentSpec) -> str:
    first = spec.keys[0]
    oauth = f" (a sign-in in ~/{spec.oauth_files[0]} is not copied in)" \
        if spec.oauth_files else ""
    return (f"no key for {spec.name}{oauth}: set {first.env}, or store one with "
            f"`agentkernel secret set {spec.id} --host {key_hosts(spec, first)[0]} "
            f"--header {first.header_name} --env {first.env} --from-env {first.env}`")


def cmd_run_agent(args: argparse.Namespace, command: list[str], *, runs: RunFlow) -> int:
    """`agentkernel run --agent NAME [-- ARGS]`: headless (pipes) unless both stdin and
    stdout are terminals, then interactive on a real PTY. `runs`: the CLI's own run steps
    (cli/run.py passes them, so that this module never imports the CLI)."""
    from .registry import get

    if args.keep or args.json:
        raise UsageError("run --agent takes neither --keep nor --json")
    key = prepare(args, command)
    if key.secret is None and not args.quiet:
        print(f"agentkernel: warning: {missing_key_note(get(args.agent))}", file=sys.stderr)
    if not (getattr(args, "review", False) or getattr(args, "apply", False)):
        return _run(args, runs)
    from pathlib import Path

    from .review import copy_project, finish

    project = Path.cwd()
    copy = copy_project(project)
    args.project = str(copy)  # the agent's workspace: the copy
    try:
        code = _run(args, runs)
    except BaseException:
        import shutil

        shutil.rmtree(copy.parent, ignore_errors=True)
        raise
    finish(project, copy, code, apply_flag=bool(args.apply), quiet=bool(args.quiet))
    return code


def _run(args: argparse.Namespace, runs: RunFlow) -> int:
    if sys.stdin is not None and sys.stdin.isatty() and sys.stdout.isatty():
        from .terminal import run_on_pty

        return run_on_pty(args, runs.request)
    return runs.in_process(args, list(args.command))
