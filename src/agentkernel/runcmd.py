"""`agentkernel run` in this process (no daemon, or none wanted): plan, say what was decided,
execute, and start a daemon for the next runs. Shared by the argparse CLI and the
import-light fast path (daemon/fastpath.py); imports only `os` and `sys` until it runs."""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable
    from typing import Any, BinaryIO

    from .planner import RunRequest

_YES = ("1", "true", "yes")
_NO = ("0", "false", "no")


def daemon_wanted() -> bool:
    """False when AGENTKERNEL_NO_DAEMON says every run stays in-process."""
    return os.environ.get("AGENTKERNEL_NO_DAEMON", "").lower() not in _YES


def autostart_wanted() -> bool:
    """Whether a run without a daemon may start one (AGENTKERNEL_DAEMON_AUTOSTART)."""
    return daemon_wanted() and \
        os.environ.get("AGENTKERNEL_DAEMON_AUTOSTART", "1").lower() not in _NO


def run_in_process(args: argparse.Namespace, command: list[str]) -> int:
    """Run `command` as `args` (the run flags) ask, in a sandbox this process starts."""
    from .cgroups import prime_migration

    prime_migration()  # first, so the kernel's wait overlaps our imports (see its docstring)
    import time

    from .engine import execute
    from .planner import CallerContext, plan

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
    import io

    captured_out, captured_err = io.BytesIO(), io.BytesIO()
    out: BinaryIO = captured_out if args.json else sys.stdout.buffer
    err: BinaryIO = captured_err if args.json else sys.stderr.buffer
    stdin = sys.stdin.buffer if req.forward_stdin and not args.json else None
    sandbox, outcome = execute(plan_, timeout=req.timeout, stdout=out, stderr=err,
                               stdin=stdin)
    try:
        for note in sandbox.notes:
            say(f"note: {note}")
        if plan_.egress is not None and not args.quiet:
            from .egress_gate import refusals

            for line in refusals(sandbox.scratch):
                say(f"egress: {line}")
    finally:
        sandbox.destroy()
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
            "duration_ms": round((time.monotonic() - started) * 1000, 1),
        }
        import json

        print(json.dumps(result))
    if outcome.exit_code != 125:  # 125: the sandbox could not run; no daemon would help
        autostart_daemon(say)
    return outcome.exit_code


def run_request(args: argparse.Namespace, command: list[str]) -> RunRequest:
    """The run flags in `args` as a planner request."""
    from pathlib import Path

    from .planner import RunRequest, parse_env
    from .profiles import parse_memory_limit, parse_pids

    return RunRequest(
        argv=command, cwd=Path.cwd(), image=args.image, profile=args.profile,
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
        ro_binds=tuple(getattr(args, "ro_binds", ())),  # run --agent's install
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
    from .daemon.client import spawn_daemon

    try:
        idle = float(os.environ.get("AGENTKERNEL_DAEMON_IDLE_EXIT", "900"))
    except ValueError:
        idle = 900.0
    if spawn_daemon(idle_exit=max(1.0, idle)):
        say(f"started the daemon in the background: it keeps sandboxes warm so the next runs "
            f"start in milliseconds, and stops after {idle:g} s unused "
            "(AGENTKERNEL_DAEMON_AUTOSTART=0 turns this off)")


