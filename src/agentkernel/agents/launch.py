"""`run --agent NAME`: an agent CLI from agentkernel's install, in a sandbox, its key outside.

The run is planned by the one planner (`planner.with_agent`): the agent's binary from the
data dir, shown read-only at /run/agentkernel/<id>; the project read-write at its own
path; default-deny egress (the registry row's hosts and the key's API host, plus the
user's --allow-host); uid 1000 inside with its own HOME. The key never enters the
sandbox: the caller's variable (held in this process, or sent with the run to the daemon
for the gate of the sandbox it takes) or a stored `agentkernel secret` that covers the
agent becomes a secret of the egress gate, bound to the API host and header; the
sandbox's variable holds only the placeholder. Signed-in sessions (OAuth files) are never
copied in. Through the daemon's warm agent sandboxes when one is up, else in-process.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, NamedTuple

from ..errors import UsageError
from . import TERMINAL_ENV, interactive

if TYPE_CHECKING:  # (the registry is imported when used: `interactive` is on a hot path)
    import argparse
    from collections.abc import Callable

    from ..planner import RunRequest
    from .registry import AgentSpec



class KeySource(NamedTuple):
    """Where the agent's key comes from: the caller's variable (None: not from the
    environment), what to call it (env:VAR, secret:NAME, missing) and the value held."""

    env: str | None
    auth: str
    value: str | None

    @property
    def missing(self) -> bool:
        return self.auth == "missing"



class RunFlow(NamedTuple):
    """How the CLI runs a command: its request from the flags, and a whole in-process run."""

    request: Callable[[argparse.Namespace, list[str]], RunRequest]
    in_process: Callable[[argparse.Namespace, list[str]], int]
    # Through the daemon (its warm pool), given the key's value; None: no daemon is up.
    via_daemon: Callable[[argparse.Namespace, str | None], int | None] | None = None
    # After an in-process run on a PTY: start the daemon for the next runs (as run does).
    after: Callable[[], None] | None = None


def key_source(spec: AgentSpec, environ: dict[str, str]) -> KeySource:
    """The key the agent gets: the first of its variables set in `environ` (named
    `env:VAR`; its value stays in this process and goes to the gate at the start only),
    else a stored secret that covers it (the planner finds that one itself)."""
    from ..secrets_store import MAX_VALUE
    from .status import covering_secret

    for key in spec.keys:
        value = environ.get(key.env, "").strip()
        if not value:
            continue
        if len(value) > MAX_VALUE or any(c in value for c in "\r\n\0"):
            raise UsageError(f"{key.env} must be one line of at most 64 KiB")
        return KeySource(key.env, f"env:{key.env}", value)
    stored = covering_secret(spec)
    if stored is not None:
        return KeySource(None, f"secret:{stored}", None)
    return KeySource(None, "missing", None)


def prepare(args: argparse.Namespace, command: list[str]) -> KeySource:
    """Add `run --agent NAME [-- ARGS]`'s part to the run flags (in place): the agent and
    the variable its key is in, for the planner (planner.with_agent decides the rest:
    install, hosts, backend, image, memory, project mode and path), the caller's terminal
    variables, and the agent's arguments as the command. Returns where the key is."""
    from .registry import get
    from .request import agent_backend

    spec = get(args.agent)
    backend = agent_backend(args.backend)
    if args.no_network:
        raise UsageError("run --agent needs the network to reach the agent's API")
    key = key_source(spec, dict(os.environ))
    args.agent_key = key.env
    args.env = [*(f"{k}={os.environ[k]}" for k in TERMINAL_ENV if os.environ.get(k)),
                *args.env]  # the user's -e win
    args.backend = backend
    # ... shown at the project's own path (a copy under --review too), when it may be:
    # planner.same_path_target falls back to /workspace with a warning otherwise.
    args.workspace_at = os.getcwd()
    args.command = list(command)  # the agent's arguments (with_agent puts its binary first)
    return key


def hold_key(spec: AgentSpec, key: KeySource) -> None:
    """An in-process run: the caller's key held in this process's memory (never written)
    for its gate's start."""
    from ..secrets_store import Secret, hold
    from .request import key_use

    if key.env is None or key.value is None:
        return
    use = key_use(spec, key.env)
    hold(Secret(use.name, use.hosts, use.header, use.env, key.value))


def missing_key_note(spec: AgentSpec) -> str:
    from .status import key_hosts

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
    spec = get(args.agent)
    if key.missing and not args.quiet:
        print(f"agentkernel: warning: {missing_key_note(spec)}", file=sys.stderr)
    review = bool(getattr(args, "review", False) or getattr(args, "apply", False))
    if not review and runs.via_daemon is not None:
        # A warm agent sandbox of the daemon's pool; the key travels with the request
        # (over the user's own 0600 socket) to the gate of the sandbox the run takes.
        code = runs.via_daemon(args, key.value)
        if code is not None:
            return code
    hold_key(spec, key)
    if not review:
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
    if interactive():
        from .terminal import run_on_pty

        code = run_on_pty(args, runs.request)
        if runs.after is not None:
            runs.after()
    else:
        code = runs.in_process(args, list(args.command))
    return code
