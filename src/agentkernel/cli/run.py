"""`agentkernel run`: through the daemon's warm pool when one is up, else in this process
(plan, say what was decided, execute, start a daemon for the next runs). Shared by the
argparse CLI and the import-light fast path (cli/fast.py); imports only `os` and `sys`
until it runs."""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable
    from typing import Any, BinaryIO

    from ..planner import RunRequest
    from ..sandbox import Sandbox


def add_parser(sub: Any) -> None:
    import argparse

    p = sub.add_parser("run", help="run a command in a fresh sandbox",
                       description="Run COMMAND in a fresh isolated sandbox and remove it after.")
    p.add_argument("-i", "--image", help="image for the sandbox (default: auto-detected)")
    p.add_argument("-p", "--profile", help="security profile: permissive, moderate, restrictive")
    p.add_argument("-B", "--backend",
                   help="isolation backend: auto, namespaces, gvisor, microvm, docker, podman, "
                        "wasm, hyperlight")
    p.add_argument("--no-network", action="store_true", help="no network at all")
    from .egress import add_egress_flags

    add_egress_flags(p)
    p.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VAL",
                   help="set an environment variable in the sandbox (repeatable)")
    p.add_argument("-w", "--workdir", help="working directory inside the sandbox")
    p.add_argument("-t", "--timeout", type=float, help="kill the command after SECONDS")
    p.add_argument("-k", "--keep", action="store_true",
                   help="keep the sandbox after the command (remove with `agentkernel remove`)")
    p.add_argument("-m", "--memory", help="memory limit, e.g. 512m, 2g or unlimited")
    p.add_argument("--pids", help="process limit, e.g. 256 or unlimited")
    p.add_argument("--cpus", type=float, help="CPU limit in cores, e.g. 0.5")
    p.add_argument("-c", "--config", help="agentkernel.toml to use")
    p.add_argument("-q", "--quiet", action="store_true", help="no agentkernel messages")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="say which backend, isolation, image and profile the run got")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with the result instead of streaming")
    p.add_argument("--agent", metavar="AGENT",
                   help="run an AI coding agent (claude, codex, gemini, opencode) from "
                        "`agents install`; arguments after -- go to it (docs/agents.md)")
    p.add_argument("--review", action="store_true",
                   help="with --agent: the agent edits a copy of the project; show its diff "
                        "and apply it when you answer y")
    p.add_argument("--apply", action="store_true",
                   help="with --agent: as --review, and apply the changes without asking "
                        "(when the agent exits 0)")
    p.add_argument("--settings", action="store_true",
                   help="with --agent: copy your agent instructions and skills (never "
                        "settings files or credentials) into the agent's HOME")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")
    p.set_defaults(handler=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from ..errors import UsageError

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if (args.review or args.apply) and not args.agent:
        raise UsageError("--review and --apply are for --agent runs")
    if getattr(args, "settings", False) and not args.agent:
        raise UsageError("--settings is for --agent runs")
    if args.agent:
        from ..agents.launch import RunFlow, cmd_run_agent
        from .common import say

        via = agent_via_daemon if daemon_wanted() else None
        flow = RunFlow(run_request, run_in_process, via,
                       lambda: autostart_daemon(say if not args.quiet else lambda _: None))
        return cmd_run_agent(args, command, runs=flow)
    if not command and not args.image:  # only an image can supply a command (its Cmd)
        raise UsageError("no command given: agentkernel run [OPTIONS] -- COMMAND [ARGS...]")
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError("--timeout must be a positive number of seconds")
    if not args.json:
        return _run_plain(args, command)
    from ..errors import AgentKernelError

    try:
        return _run_plain(args, command)
    except AgentKernelError as exc:
        # --json promises one object, also when the command could not start (127, 126,
        # 125: a bad workdir, an image that is not there...); the message still goes to
        # stderr, through the usual error path. A usage error (2) is not a run: no object.
        if exc.exit_code == UsageError.exit_code:
            raise
        import json

        print(json.dumps({**_JSON_NOTHING, "exit_code": exc.exit_code,
                          "message": exc.message}), flush=True)
        raise


_JSON_NOTHING: dict[str, Any] = {
    "exit_code": 125, "stdout": "", "stderr": "", "signal": None, "timed_out": False,
    "message": None, "backend": None, "isolation": None, "image": None, "rootfs": None,
    "profile": None, "sandbox": None, "kept": False, "pooled": None, "duration_ms": None,
}  # `run --json`'s keys, for a run that had no sandbox


def _run_plain(args: argparse.Namespace, command: list[str]) -> int:
    """`run` without --agent: through the daemon when one is up, else in-process."""
    egress_flags = bool(args.allow_host or args.deny_host or args.add_host or args.secret)
    if args.keep or (daemon_wanted() and not egress_flags):  # pools keep the default policy
        # Through the daemon when one is up (warm pool); --keep starts one if needed.
        through = run_via_daemon(args, command, keep=args.keep)
        if through is not None:
            return through
    return run_in_process(args, command)


_YES = ("1", "true", "yes")
_NO = ("0", "false", "no")


def daemon_wanted() -> bool:
    """False when AGENTKERNEL_NO_DAEMON says every run stays in-process."""
    return os.environ.get("AGENTKERNEL_NO_DAEMON", "").lower() not in _YES


def _say_plan(data: dict[str, Any], say: Callable[[str], None]) -> None:
    """`-v` of a run through the daemon: the path, then what the plan gave (the lines an
    in-process run prints)."""
    how = "warm pool" if data.get("pooled") else "cold start, the pool was empty"
    say(f"via daemon ({how}): sandbox {data.get('sandbox')}")
    say(f"backend {data.get('backend')}: {data.get('isolation')}")
    for line in data.get("skipped") or []:
        say(str(line))
    say(f"image {data.get('image')} ({data.get('image_reason')}); rootfs: {data.get('rootfs')}")
    memory = f"{data.get('memory_mb')}MiB" if data.get("memory_mb") else "unlimited"
    say(f"profile {data.get('profile')}: network={data.get('network')} "
        f"workspace={data.get('workspace')} memory={memory} "
        f"pids={data.get('pids') or 'unlimited'} cpus={data.get('cpus') or 'unlimited'}")


def autostart_wanted() -> bool:
    """Whether a run without a daemon may start one (AGENTKERNEL_DAEMON_AUTOSTART)."""
    return daemon_wanted() and \
        os.environ.get("AGENTKERNEL_DAEMON_AUTOSTART", "1").lower() not in _NO


def run_in_process(args: argparse.Namespace, command: list[str]) -> int:
    """Run `command` as `args` (the run flags) ask, in a sandbox this process starts."""
    from ..cgroups import prime_migration

    prime_migration()  # first, so the kernel's wait overlaps our imports (see its docstring)
    import time

    from ..engine import execute, exit_on_terminate, terminated
    from ..planner import CallerContext, plan

    req = run_request(args, command)
    started = time.monotonic()
    plan_ = plan(req, CallerContext.here(), quiet=args.quiet)

    def say(msg: str) -> None:
        if not args.quiet:
            print(f"agentkernel: {msg}", file=sys.stderr)

    for warning in plan_.warnings:
        say(f"warning: {warning}")
    if args.verbose:
        say(f"backend {plan_.backend.name}: {plan_.backend.isolation}")
        for line in plan_.skipped:
            say(line)
        say(f"image {plan_.image} ({plan_.image_reason}); rootfs: {plan_.rootfs_note}")
        p = plan_.profile
        say(f"profile {p.name}: network={p.network} workspace={p.workspace} "
            f"memory={f'{p.memory_mb}MiB' if p.memory_mb else 'unlimited'} "
            f"pids={p.pids or 'unlimited'} "
            f"cpus={p.cpus or 'unlimited'}")
        if req.agent is not None:
            from ..agents.request import user_line

            say(user_line(plan_.backend.name, plan_.user))
    import io

    captured_out, captured_err = io.BytesIO(), io.BytesIO()
    out: BinaryIO = captured_out if args.json else sys.stdout.buffer
    err: BinaryIO = captured_err if args.json else sys.stderr.buffer
    stdin = sys.stdin.buffer if req.forward_stdin and not args.json else None
    # From the start to the end of the cleanup no signal may end us unhandled: one waits
    # while the sandbox starts or is cleaned up, goes to the command while it runs, and
    # otherwise ends the run through its cleanup (engine.exit_on_terminate). The sandbox
    # is ours from its start (`on_started`), not only from `execute`'s return.
    owned: list[Sandbox] = []
    with exit_on_terminate():
        try:
            sandbox, outcome = execute(plan_, timeout=req.timeout, stdout=out, stderr=err,
                                       stdin=stdin, on_started=owned.append)
            for note in sandbox.notes:
                say(f"note: {note}")
            if plan_.egress is not None and not args.quiet:
                from ..egress_gate import refusals

                for line in refusals(sandbox.scratch):
                    say(f"egress: {line}")
        finally:
            for each in owned:  # (destroy is idempotent: execute's own except may have)
                each.destroy()
    ending = terminated()  # (also one that came as the handlers were put back)
    if ending is not None:  # a signal after the command's end: it ends us as it would have
        return 128 + ending
    if outcome.message:
        say(outcome.message)
    if args.json:
        result: dict[str, Any] = {
            "exit_code": outcome.exit_code,
            "stdout": captured_out.getvalue().decode(errors="replace"),
            "stderr": captured_err.getvalue().decode(errors="replace"),
            "signal": outcome.signal, "timed_out": outcome.timed_out,
            "message": outcome.message, "backend": plan_.backend.name,
            "isolation": plan_.backend.isolation, "image": plan_.image,
            "rootfs": plan_.rootfs_note,
            "profile": plan_.profile.name, "sandbox": sandbox.spec.name, "kept": False,
            "pooled": None, "duration_ms": round((time.monotonic() - started) * 1000, 1),
        }
        import json

        print(json.dumps(result))
    if outcome.exit_code != 125:  # 125: the sandbox could not run; no daemon would help
        autostart_daemon(say)
    return outcome.exit_code


def run_request(args: argparse.Namespace, command: list[str]) -> RunRequest:
    """The run flags in `args` as a planner request."""
    from pathlib import Path

    from ..planner import RunRequest, parse_env
    from ..profiles import parse_memory_limit, parse_pids

    return RunRequest(
        argv=command, cwd=Path(getattr(args, "project", None) or Path.cwd()),
        image=args.image, profile=args.profile,
        backend=args.backend, no_network=args.no_network, env=parse_env(args.env),
        workdir=args.workdir, timeout=args.timeout, keep=False,
        memory_mb=parse_memory_limit(args.memory) if args.memory else None,
        pids=parse_pids(args.pids) if args.pids else None, cpus=args.cpus,
        config_path=Path(args.config) if args.config else None,
        forward_stdin=not sys.stdin.isatty() if sys.stdin else False,
        # (the daemon's fast path parses no egress flags: it sends those runs to argparse)
        allow_hosts=tuple(getattr(args, "allow_host", ())),
        deny_hosts=tuple(getattr(args, "deny_host", ())),
        add_hosts=tuple(getattr(args, "add_host", ())), secrets=tuple(getattr(args, "secret", ())),
        agent=getattr(args, "agent", None), agent_key=getattr(args, "agent_key", None),
        workspace_at=getattr(args, "workspace_at", None),  # run --agent's: its own path
        agent_settings=bool(getattr(args, "settings", False)),
    )


def autostart_daemon(say: Callable[[str], None]) -> None:
    """After a run without a daemon, start one in the background for the next runs.

    It keeps a warm sandbox for each (image, profile, backend, project) in use, so later
    runs cost milliseconds; it stops by itself after AGENTKERNEL_DAEMON_IDLE_EXIT seconds
    unused (default 900). AGENTKERNEL_DAEMON_AUTOSTART=0 (or AGENTKERNEL_NO_DAEMON=1) opts
    out.
    """
    if not autostart_wanted():
        return
    from ..ipc.client import spawn_daemon

    try:
        idle = float(os.environ.get("AGENTKERNEL_DAEMON_IDLE_EXIT", "900"))
    except ValueError:
        idle = 900.0
    if spawn_daemon(idle_exit=max(1.0, idle)):
        say(f"started the daemon in the background: it keeps sandboxes warm so the next runs "
            f"start in milliseconds, and stops after {idle:g} s unused "
            "(AGENTKERNEL_DAEMON_AUTOSTART=0 turns this off)")


# ---------------------------------------------------------------- through the daemon


def run_via_daemon(args: argparse.Namespace, command: list[str], *, keep: bool) -> int | None:
    """`agentkernel run` through the daemon's warm pool; None if no daemon is up.

    With --keep the daemon is started if needed, and the sandbox stays as a persistent one.
    """
    import time

    from ..ipc import client
    from ..ipc.client import DaemonError
    from ..paths import data_dir_str
    from .common import caller, env_pairs, limits, say

    if keep:
        return _run_keep(args, command)
    memory, pids = limits(args)
    forward_stdin = not sys.stdin.isatty() if sys.stdin else False
    req: dict[str, Any] = {
        "argv": command, "image": args.image, "profile": args.profile,
        "backend": args.backend, "env": env_pairs(args.env), "workdir": args.workdir,
        "timeout": args.timeout, "cwd": os.getcwd(), "no_network": bool(args.no_network),
        "memory_mb": memory, "pids": pids, "cpus": args.cpus,
        "config_path": os.path.abspath(args.config) if args.config else None,
        **caller(), "stdin_open": forward_stdin and not args.json,
        "data_dir": data_dir_str(),
    }
    lines = client.open_stream("run", req, auto_start=False)
    if lines is None:
        return None
    started = time.monotonic()
    captured: dict[int, list[bytes]] = {1: [], 2: []}
    info: dict[str, Any] = {}

    def on_started(data: dict[str, Any]) -> None:
        info.update(data)
        if args.quiet:
            return
        for warning in data.get("warnings") or []:
            say(f"warning: {warning}")
        if args.verbose:
            _say_plan(data, say)
        for note in data.get("notes") or []:
            say(f"note: {note}")

    sink = (lambda stream, data: captured[stream].append(data)) if args.json else None
    try:
        result = client.pump(lines, stdin_fd=0 if req["stdin_open"] else None, sink=sink,
                             on_started=on_started)
    except DaemonError as exc:
        if exc.kind == "WrongDaemon":
            return None  # a daemon of another data dir (AGENTKERNEL_HOME): run in-process
        raise
    if not args.quiet:
        for line in result.get("egress") or []:
            say(f"egress: {line}")
    if result.get("message") and not args.quiet:
        say(str(result["message"]))
    code = int(result.get("exit_code", 125))
    if args.json:
        import json  # only for --json output

        print(json.dumps({
            "exit_code": code,
            "stdout": b"".join(captured[1]).decode(errors="replace"),
            "stderr": b"".join(captured[2]).decode(errors="replace"),
            "signal": result.get("signal"), "timed_out": bool(result.get("timed_out")),
            "message": result.get("message"), "backend": info.get("backend"),
            "isolation": info.get("isolation"), "image": info.get("image"),
            "rootfs": info.get("rootfs"), "profile": info.get("profile"),
            "sandbox": info.get("sandbox"), "kept": False, "pooled": info.get("pooled"),
            "duration_ms": round((time.monotonic() - started) * 1000, 1),
        }))
    return code


def agent_via_daemon(args: argparse.Namespace, key_value: str | None) -> int | None:
    """`run --agent` through the daemon: a warm agent sandbox of its pool (planned by the
    daemon's planner from our context, as in-process), the key's value sent with the
    request for the gate of that sandbox only; on a PTY of our size when stdin and stdout
    are terminals. None when no daemon is up (the caller runs in-process and starts one)."""
    from ..agents import TERMINAL_ENV, interactive
    from ..ipc import client
    from ..ipc.client import DaemonError
    from ..paths import data_dir_str
    from .common import caller, env_pairs, limits, say

    tty = interactive()
    memory, pids = limits(args)
    req: dict[str, Any] = {
        "argv": list(args.command), "agent": args.agent, "agent_key": args.agent_key,
        "agent_key_value": key_value, "image": args.image, "profile": args.profile,
        "backend": args.backend, "workdir": args.workdir, "no_network": bool(args.no_network),
        "env": {**{k: os.environ[k] for k in TERMINAL_ENV if os.environ.get(k)},
                **env_pairs(args.env)},  # (the argparse path has them in args.env already)
        "timeout": args.timeout, "cwd": os.getcwd(), "workspace_at": args.workspace_at,
        "agent_settings": bool(getattr(args, "settings", False)),
        "memory_mb": memory, "pids": pids, "cpus": args.cpus,
        "config_path": os.path.abspath(args.config) if args.config else None,
        "allow_hosts": list(args.allow_host), "deny_hosts": list(args.deny_host),
        "add_hosts": list(args.add_host), "secrets": list(args.secret),
        **caller(), "data_dir": data_dir_str(), "stdin_open": tty or not sys.stdin.isatty(),
        "tty": list(client.terminal_size()) if tty else None,
    }
    lines = client.open_stream("run", req, auto_start=False)
    if lines is None:
        return None

    def on_started(data: dict[str, Any]) -> None:
        if not args.quiet:
            for warning in data.get("warnings") or []:
                say(f"warning: {warning}")
        if args.verbose:
            _say_plan(data, say)  # which backend and isolation, as in-process -v says
            from ..agents.request import user_line

            say(user_line(str(data.get("backend")), data.get("user")))

    restore = _raw_terminal() if tty else None
    try:
        result = client.pump(lines, stdin_fd=0 if req["stdin_open"] else None, tty=tty,
                             on_started=on_started)
    except DaemonError as exc:
        if exc.kind == "WrongDaemon":
            return None
        raise
    finally:
        if restore is not None:
            restore()
    if not args.quiet:
        for line in result.get("egress") or []:
            say(f"egress: {line}")
        if result.get("message"):
            say(str(result["message"]))
    return int(result.get("exit_code", 125))


def agent_key_of(variables: list[str]) -> tuple[str | None, str | None]:
    """The first of an agent's key variables set in our environment, and its value."""
    from ..errors import UsageError

    for name in variables:
        value = os.environ.get(name, "").strip()
        if value:
            if len(value) > 64 * 1024 or any(c in value for c in "\r\n\0"):
                raise UsageError(f"{name} must be one line of at most 64 KiB")
            return name, value
    return None, None


def _raw_terminal() -> Callable[[], None]:
    """Our terminal raw (keystrokes go to the agent's PTY as they are); the undo."""
    import termios
    import tty as tty_mod

    saved = termios.tcgetattr(0)
    tty_mod.setraw(0)
    return lambda: termios.tcsetattr(0, termios.TCSADRAIN, saved)


def _run_keep(args: argparse.Namespace, command: list[str]) -> int:
    """`run --keep`: a persistent sandbox `run-<hex>` owned by the daemon, command run in it."""
    import secrets

    from ..ipc import client
    from ..ipc.client import DaemonError
    from .common import caller, env_pairs, limits, say
    from .sandboxes import interactive

    if args.json:
        raise DaemonError("--json cannot be combined with --keep", 2)
    name = f"run-{secrets.token_hex(4)}"
    memory, pids = limits(args)
    profile = args.profile
    client.call("create", {
        "name": name, "image": args.image, "profile": profile, "backend": args.backend,
        "memory_mb": memory, "pids": pids, "cpus": args.cpus, "workdir_source": os.getcwd(),
        "env": env_pairs(args.env), **caller(),
        # the run's own egress policy and secrets, planned with the sandbox (planner)
        "allow_hosts": list(args.allow_host), "deny_hosts": list(args.deny_host),
        "add_hosts": list(args.add_host), "secrets": list(args.secret)})
    forward_stdin = not sys.stdin.isatty() if sys.stdin else False
    req: dict[str, Any] = {"name": name, "argv": command, "env": {}, "workdir": args.workdir,
                           "timeout": args.timeout, "stdin_open": forward_stdin}
    code = interactive("exec", req, stdin=forward_stdin, tty=False)
    if not args.quiet:
        say(f"sandbox '{name}' kept. Remove with: agentkernel remove {name}")
    return code
