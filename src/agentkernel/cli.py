"""The `agentkernel` command line: parse arguments, call the engine, map errors to exit codes."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

from . import __version__
from .errors import AgentKernelError, UsageError


def _add_run_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="run a command in a fresh sandbox",
                       description="Run COMMAND in a fresh isolated sandbox and remove it after.")
    p.add_argument("-i", "--image", help="image for the sandbox (default: auto-detected)")
    p.add_argument("-p", "--profile", help="security profile: permissive, moderate, restrictive")
    p.add_argument("-B", "--backend", help="isolation backend: auto, namespaces, gvisor")
    p.add_argument("--no-network", action="store_true", help="no network at all")
    p.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VAL",
                   help="set an environment variable in the sandbox (repeatable)")
    p.add_argument("-w", "--workdir", help="working directory inside the sandbox")
    p.add_argument("-t", "--timeout", type=float, help="kill the command after SECONDS")
    p.add_argument("-k", "--keep", action="store_true",
                   help="keep the sandbox after the command (remove with `agentkernel remove`)")
    p.add_argument("-m", "--memory", help="memory limit, e.g. 512m or 2g")
    p.add_argument("--cpus", type=float, help="CPU limit in cores, e.g. 0.5")
    p.add_argument("-c", "--config", type=Path, help="agentkernel.toml to use")
    p.add_argument("-q", "--quiet", action="store_true", help="no agentkernel messages")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="say which backend, isolation, image and profile the run got")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with the result instead of streaming")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")


def _add_images_parser(sub: Any) -> None:
    # Defined here, not in images/, so that building the parser imports nothing heavy.
    p = sub.add_parser("images", help="pull, list, inspect and remove OCI images")
    isub = p.add_subparsers(dest="images_cmd", metavar="SUBCOMMAND", required=True)
    pl = isub.add_parser("pull", help="pull an image into the local store")
    pl.add_argument("image")
    pl.add_argument("--platform", help="OS/ARCH[/VARIANT] (default: this host)")
    pl.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    ls = isub.add_parser("list", aliases=["ls"], help="list pulled images")
    ls.add_argument("--json", action="store_true")
    ins = isub.add_parser("inspect", help="show an image's digests, layers and config")
    ins.add_argument("image")
    rm = isub.add_parser("remove", aliases=["rm"], help="forget images (then prune frees space)")
    rm.add_argument("images", nargs="+")
    isub.add_parser("prune", help="free blobs and layers no image uses")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentkernel",
        description="Run AI coding agents and untrusted code in isolated sandboxes.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"agentkernel {__version__}")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    _add_run_parser(sub)
    d = sub.add_parser("doctor", help="what isolation this host offers, and why not the rest")
    d.add_argument("--json", action="store_true")
    i = sub.add_parser("init", help="write a commented agentkernel.toml here")
    i.add_argument("-n", "--name", help="sandbox name (default: this directory's name)")
    i.add_argument("-a", "--agent", default="claude", help="preferred agent (default: claude)")
    i.add_argument("-f", "--force", action="store_true", help="overwrite an existing file")
    _add_images_parser(sub)
    r = sub.add_parser("remove", aliases=["rm"], help="remove a kept sandbox")
    r.add_argument("names", nargs="+")
    sub.add_parser("list", aliases=["ls"], help="list kept sandboxes")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "run":
            return cmd_run(args)
        if args.cmd == "doctor":
            from .doctor import doctor

            return doctor(as_json=args.json)
        if args.cmd == "init":
            return cmd_init(args)
        if args.cmd == "images":
            from .engine import RunRequest, load_configs
            from .images.cli import main as images_main

            config, _, warnings = load_configs(RunRequest(argv=[], cwd=Path.cwd()))
            for warning in warnings:
                print(f"agentkernel: warning: {warning}", file=sys.stderr)
            return images_main(args, config)
        if args.cmd in ("remove", "rm"):
            from .persist import remove_kept

            for name in args.names:
                remove_kept(name)
                print(f"Sandbox '{name}' removed.")
            return 0
        if args.cmd in ("list", "ls"):
            from .persist import list_kept

            rows = list_kept()
            if not rows:
                print("No sandboxes found.")
            for row in rows:
                print(f"{row['name']:<20} {row['status']:<10} {row['backend']:<12} {row['image']}")
            return 0
        build_parser().print_help()
        return 2
    except AgentKernelError as exc:
        print(f"agentkernel: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def cmd_run(args: argparse.Namespace) -> int:
    from .engine import RunRequest, execute, plan
    from .profiles import parse_memory

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("no command given: agentkernel run [OPTIONS] -- COMMAND [ARGS...]")
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError("--timeout must be a positive number of seconds")
    req = RunRequest(
        argv=command, cwd=Path.cwd(), image=args.image, profile=args.profile,
        backend=args.backend, no_network=args.no_network, env=args.env, workdir=args.workdir,
        timeout=args.timeout, keep=args.keep,
        memory_mb=parse_memory(args.memory) if args.memory else None, cpus=args.cpus,
        config_path=args.config, forward_stdin=not sys.stdin.isatty() if sys.stdin else False,
    )
    started = time.monotonic()
    plan_ = plan(req, quiet=args.quiet)

    def say(msg: str) -> None:
        if not args.quiet:
            print(f"agentkernel: {msg}", file=sys.stderr)

    for warning in plan_.warnings:
        say(f"warning: {warning}")
    spec = plan_.spec
    if args.verbose:
        say(f"backend {plan_.backend.name}: {plan_.backend.isolation}")
        say(f"image {spec.image} ({plan_.image_reason}); rootfs: {plan_.rootfs_note}")
        p = spec.profile
        say(f"profile {p.name}: network={p.network} workspace={p.workspace} "
            f"memory={p.memory_mb or 'unlimited'}MiB pids={p.pids or 'unlimited'} "
            f"cpus={p.cpus or 'unlimited'}")
    import io

    captured_out, captured_err = io.BytesIO(), io.BytesIO()
    out: BinaryIO = captured_out if args.json else sys.stdout.buffer
    err: BinaryIO = captured_err if args.json else sys.stderr.buffer
    stdin = sys.stdin.buffer if req.forward_stdin and not args.json else None
    sandbox, outcome = execute(plan_, plan_.argv, timeout=req.timeout, stdout=out, stderr=err,
                               stdin=stdin)
    try:
        for note in sandbox.notes:
            say(f"note: {note}")
        if args.keep:
            from .persist import record_kept

            record_kept(sandbox)
            say(f"sandbox '{spec.name}' kept. Remove with: agentkernel remove {spec.name}")
    finally:
        if not args.keep:
            sandbox.destroy()
    if outcome.message:
        say(outcome.message)
    if args.json:
        result: dict[str, Any] = {
            "exit_code": outcome.exit_code,
            "stdout": captured_out.getvalue().decode(errors="replace"),
            "stderr": captured_err.getvalue().decode(errors="replace"),
            "signal": outcome.status.signal, "timed_out": outcome.status.timed_out,
            "message": outcome.message, "backend": plan_.backend.name,
            "isolation": plan_.backend.isolation, "image": spec.image,
            "rootfs": plan_.rootfs_note,
            "profile": spec.profile.name, "sandbox": spec.name, "kept": args.keep,
            "duration_ms": round((time.monotonic() - started) * 1000, 1),
        }
        print(json.dumps(result))
    return outcome.exit_code


def cmd_init(args: argparse.Namespace) -> int:
    from .config import render_init
    from .names import sanitize_sandbox_name, validate_sandbox_name

    target = Path.cwd() / "agentkernel.toml"
    if target.exists() and not args.force:
        raise UsageError("agentkernel.toml already exists in this directory (use --force)")
    name = args.name or sanitize_sandbox_name(Path.cwd().name)
    validate_sandbox_name(name)
    target.write_text(render_init(name, args.agent))
    print(f"Wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
