"""`run` and `exec` through a running daemon, parsed without argparse (the CLI's hot path).

Anything this parser does not recognise (help, --keep, bundled short flags, bad values)
returns None, and the regular argparse CLI handles the command exactly as before.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

from .run import autostart_wanted, daemon_wanted  # noqa: F401 - re-exported

_RUN_VALUES = {"-i": "image", "--image": "image", "-p": "profile", "--profile": "profile",
               "-B": "backend", "--backend": "backend", "-e": "env", "--env": "env",
               "-w": "workdir", "--workdir": "workdir", "-t": "timeout", "--timeout": "timeout",
               "-m": "memory", "--memory": "memory", "--pids": "pids", "--cpus": "cpus",
               "-c": "config", "--config": "config", "--agent": "agent"}
_RUN_FLAGS = {"--no-network": "no_network", "-q": "quiet", "--quiet": "quiet",
              "-v": "verbose", "--verbose": "verbose", "--json": "json"}
_EXEC_VALUES = {"-e": "env", "--env": "env", "-w": "workdir", "--workdir": "workdir",
                "--timeout": "timeout"}
_EXEC_FLAGS = {"-t": "tty", "--tty": "tty", "-i": "interactive", "--interactive": "interactive"}
_FLOATS = {"timeout", "cpus"}


def _parse(tokens: list[str], values: dict[str, str], flags: dict[str, str],
           ns: SimpleNamespace) -> int | None:
    """Options up to the first positional; returns its index, None if unsure."""
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "--" or not tok.startswith("-") or tok == "-":
            return i
        key, eq, inline = tok.partition("=") if tok.startswith("--") else (tok, "", "")
        if key in flags and not eq:
            setattr(ns, flags[key], True)
            i += 1
            continue
        if key not in values:
            return None  # -h, --keep, -qv, a typo: argparse knows best
        if eq:
            value = inline
            i += 1
        else:
            if i + 1 >= len(tokens):
                return None
            value = tokens[i + 1]
            i += 2
        dest = values[key]
        if dest == "env":
            ns.env.append(value)
        elif dest in _FLOATS:
            try:
                setattr(ns, dest, float(value))
            except ValueError:
                return None
        else:
            setattr(ns, dest, value)
    return i


def fast_main(argv: list[str]) -> int | None:
    """The exit code, or None to let the full CLI handle this command line.

    `run` goes through the daemon when one is up, else runs in-process — either way without
    building the argparse parser (~10 ms). `exec` needs the daemon.
    """
    use_daemon = daemon_wanted()
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "run":
            ns = SimpleNamespace(image=None, profile=None, backend=None, env=[], workdir=None,
                                 timeout=None, memory=None, pids=None, cpus=None,
                                 config=None, no_network=False, quiet=False, verbose=False,
                                 json=False, keep=False, agent=None)
            at = _parse(rest, _RUN_VALUES, _RUN_FLAGS, ns)
            if at is None:
                return None
            command = rest[at:]
            if command[:1] == ["--"]:
                command = command[1:]
            if ns.agent is not None:
                return _agent(ns, command, use_daemon) if not ns.json else None
            if not command or ns.json or (ns.timeout is not None and ns.timeout <= 0):
                return None  # (--json: the full CLI's cmd_run, which answers failures too)
            if use_daemon and _daemon_socket_exists():
                from .run import run_via_daemon

                code = run_via_daemon(ns, command, keep=False)  # type: ignore[arg-type]
                if code is not None:
                    return code
            from .run import run_in_process

            return run_in_process(ns, command)  # type: ignore[arg-type]
        if not use_daemon or not _daemon_socket_exists():
            return None
        ns = SimpleNamespace(env=[], workdir=None, timeout=None, tty=False, interactive=False)
        at = _parse(rest, _EXEC_VALUES, _EXEC_FLAGS, ns)
        if at is None or at >= len(rest) or rest[at] == "--":
            return None
        ns.name, ns.command = rest[at], rest[at + 1 :]
        from .sandboxes import cmd_exec

        return cmd_exec(ns)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from ..errors import AgentKernelError

        if isinstance(exc, AgentKernelError):
            print(f"agentkernel: {exc.message}", file=sys.stderr)
            return exc.exit_code
        raise


def _agent(ns: SimpleNamespace, command: list[str], use_daemon: bool) -> int | None:
    """`run --agent NAME [-- ARGS]` without argparse (no egress flags, no --review: those
    go to the full CLI): through the daemon's warm agent sandboxes when one is up."""
    if not use_daemon or not _daemon_socket_exists():
        return None  # in-process, then the daemon is started: the full CLI does that
    from ..ipc import client
    from .run import agent_key_of, agent_via_daemon

    try:  # the daemon knows the registry: its key variables, without our reading it
        info = client.call("agent_keys", {"agent": ns.agent}, auto_start=False)
    except client.DaemonError:
        return None  # not ours, gone, or an older one: the full CLI decides
    ns.agent_key, value = agent_key_of(list(info.get("keys") or []))
    if ns.agent_key is None and not info.get("stored") and not ns.quiet:
        print(f"agentkernel: warning: {info.get('missing')}", file=sys.stderr)
    for flag in ("allow_host", "deny_host", "add_host", "secret"):
        setattr(ns, flag, [])
    ns.workspace_at = os.getcwd()
    ns.command = command
    return agent_via_daemon(ns, value)  # type: ignore[arg-type]


def _daemon_socket_exists() -> bool:
    from ..paths import daemon_socket  # not .client: json and socket cost ~3 ms

    return os.path.exists(daemon_socket())
