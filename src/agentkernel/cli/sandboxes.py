"""`create`, `exec`, `attach`, `cp`, `list`, `start`, `stop`, `remove`: persistent sandboxes,
through the daemon's socket (`ipc.client`)."""

from __future__ import annotations

import os

from ..ipc import client
from ..ipc.client import DaemonError
from ..names import validate_sandbox_name, validate_sandbox_path
from ..sparse import finish, write_sparse
from .common import caller, env_pairs, limits, say, strip_dashes

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any, BinaryIO


def add_parsers(sub: Any) -> None:
    """Persistent sandboxes (see docs/daemon.md)."""
    import argparse

    c = sub.add_parser("create", help="create and start a persistent sandbox",
                       description="Create a named sandbox that lives until removed.")
    c.add_argument("name")
    c.add_argument("-i", "--image", help="image (default: detected from --dir, else alpine)")
    c.add_argument("-p", "--profile", help="security profile: permissive, moderate, restrictive")
    c.add_argument("-B", "--backend", help="as `run --backend` (not wasm: it keeps nothing)")
    c.add_argument("-d", "--dir", help="host project dir shown at /workspace")
    c.add_argument("-m", "--memory", help="memory limit, e.g. 512m, 2g or unlimited")
    c.add_argument("--pids", help="process limit, e.g. 256 or unlimited")
    c.add_argument("--cpus", type=float, help="CPU limit in cores, e.g. 0.5")
    c.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VAL",
                   help="environment variable for every command in it (repeatable)")
    c.add_argument("--ttl", help="remove it automatically after this long (30m, 1h, 2d)")
    c.add_argument("--agent", metavar="AGENT",
                   help="a sandbox for an AI coding agent (claude, codex, gemini, opencode): "
                        "its install, its API hosts, its stored key; `attach` starts it")
    c.add_argument("--settings", action="store_true",
                   help="with --agent: copy your agent instructions and skills (e.g. "
                        "~/.claude/CLAUDE.md, ~/.claude/skills) into its HOME")
    from .egress import add_egress_flags

    add_egress_flags(c)
    c.set_defaults(handler=cmd_create)
    e = sub.add_parser("exec", help="run a command in a persistent sandbox", usage=EXEC_USAGE,
                       description="Run COMMAND in sandbox NAME; its exit code is ours.")
    e.add_argument("name")
    e.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VAL")
    e.add_argument("-w", "--workdir", help="working directory inside the sandbox")
    e.add_argument("-t", "--tty", action="store_true", help="allocate a pseudo-terminal")
    e.add_argument("-i", "--interactive", action="store_true", help="forward stdin")
    e.add_argument("--timeout", type=float, help="kill the command after SECONDS")
    e.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")
    e.set_defaults(handler=cmd_exec)
    a = sub.add_parser("attach", help="interactive shell in a persistent sandbox")
    a.add_argument("name")
    a.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VAL")
    a.add_argument("--shell", action="store_true",
                   help="a shell, not the agent of a sandbox made with --agent")
    a.add_argument("command", nargs="*", help="arguments for the agent (after --)")
    a.set_defaults(handler=cmd_attach)
    cp = sub.add_parser("cp", help="copy a file into or out of a sandbox (NAME:/path)")
    cp.add_argument("src")
    cp.add_argument("dst")
    cp.set_defaults(handler=cmd_cp)
    ls = sub.add_parser("list", aliases=["ls"], help="list persistent sandboxes")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(handler=cmd_list)
    for cmd, what, handler in (
            ("start", "start stopped sandboxes (their files are kept)", cmd_start),
            ("stop", "stop sandboxes, keeping their files", cmd_stop),
            ("remove", "remove sandboxes and everything they stored", cmd_remove)):
        p = sub.add_parser(cmd, aliases=["rm"] if cmd == "remove" else [], help=what)
        p.add_argument("names", nargs="+", metavar="NAME")
        p.set_defaults(handler=handler)


# ---------------------------------------------------------------- create / lifecycle


def parse_duration(text: str) -> float:
    """Seconds from `90`, `90s`, `30m`, `1h` or `2d`."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    factor = 1
    if t and t[-1] in units:
        factor = units[t[-1]]
        t = t[:-1]
    try:
        value = float(t) * factor
    except ValueError:
        raise DaemonError(f"invalid duration {text!r} (examples: 90s, 30m, 1h, 2d)", 2) from None
    if not value > 0:
        raise DaemonError(f"duration must be positive, got {text!r}", 2)
    return value


def cmd_create(args: argparse.Namespace) -> int:
    validate_sandbox_name(args.name)
    memory, pids = limits(args)
    if args.settings and not args.agent:
        from ..errors import UsageError

        raise UsageError("--settings is for --agent sandboxes")
    if args.agent:
        _check_agent_key(args.agent)
        args.dir = args.dir or "."  # an agent's sandbox is for the project it is made in
    req: dict[str, Any] = {
        "name": args.name, "image": args.image, "profile": args.profile,
        "backend": args.backend, "memory_mb": memory, "pids": pids, "cpus": args.cpus,
        "workdir_source": os.path.abspath(args.dir) if args.dir else None,
        "env": env_pairs(args.env),
        "ttl_seconds": parse_duration(args.ttl) if args.ttl else None, **caller(),
        "allow_hosts": list(args.allow_host), "deny_hosts": list(args.deny_host),
        "add_hosts": list(args.add_host), "secrets": list(args.secret), "agent": args.agent,
    }
    print(f"Creating sandbox '{args.name}'" + (f" with image '{args.image}'" if args.image
                                               else "") + "...")
    info = client.call("create", req)
    for warning in info.get("warnings") or []:  # (the plan's: as a run in-process says them)
        say(f"warning: {warning}")
    print(f"  Image:   {info['image']}")
    if info.get("rootfs"):
        print(f"  Rootfs:  {info['rootfs']}")
    from ..planner import UNAVAILABLE_ROOTFS, fallback_warning

    said = f"image {info['image']} unavailable"  # (the plan's warning, with its reason)
    if info.get("rootfs") == UNAVAILABLE_ROOTFS and \
            not any(w.startswith(said) for w in info.get("warnings") or []):
        say(f"warning: {fallback_warning(info['image'])}")
    print(f"  Backend: {info['backend']} ({info['isolation']})")
    print(f"  Profile: {info['profile']}")
    print(f"  vCPUs:   {info['vcpus'] or 'unlimited'}")
    print(f"  Memory:  {info['memory_mb'] or 'unlimited'} MB")
    if info.get("agent"):
        print(f"  Agent:   {info['agent']} (`agentkernel attach {args.name}` starts it)")
    if args.settings:
        _copy_settings(args.name, str(info["agent"]), str(info.get("backend")))
    if info.get("expires_at"):
        print(f"  Expires: {info['expires_at']}")
    print(f"\nSandbox '{args.name}' created.\n\nNext steps:\n"
          f"  agentkernel exec {args.name} -- COMMAND\n  agentkernel attach {args.name}")
    return 0


def _check_agent_key(agent_id: str) -> None:
    """A kept agent sandbox gets its key from the store (the daemon's gate reads it again
    at each start): a key only in this shell's environment is refused, with the command
    that stores it; no key at all is a warning (the agent may sign in another way)."""
    from ..agents.launch import missing_key_note
    from ..agents.registry import get
    from ..agents.status import covering_secret
    from ..errors import UsageError

    spec = get(agent_id)
    if covering_secret(spec) is not None:
        return
    note = missing_key_note(spec)
    if any(os.environ.get(k.env, "").strip() for k in spec.keys):
        raise UsageError("a kept agent sandbox takes its key from agentkernel's secret store, "
                         "not from this shell: " + note.split(": ", 1)[1])
    say(f"warning: {note}")


def _copy_settings(name: str, agent_id: str, backend: str) -> None:
    """The host's agent instructions and skills into the sandbox's HOME (agents/settings),
    written by the in-sandbox agent: as the agent's user where it has one."""
    from pathlib import Path

    from ..agents.registry import get
    from ..agents.request import agent_home
    from ..agents.settings import collect

    home = agent_home(backend)
    found, skipped = collect(get(agent_id), Path.home())
    for f in found:
        client.call("write_file", {"name": name, "path": f"{home}/{f.path}",
                                   "data": f.data.decode("latin-1"), "mode": f.mode})
    for line in skipped:
        say(f"settings: skipped {line}")
    print(f"  Settings: {len(found)} file(s) copied into {home}")


def _each(names: list[str], op: str, doing: str, done: str, after: str = "") -> int:
    """Validate every name first (nothing happens on a bad one), then `op` each in turn."""
    for name in names:
        validate_sandbox_name(name)
    for name in names:
        print(f"{doing} sandbox '{name}'...")
        client.call(op, {"name": name})
        print(f"Sandbox '{name}' {done}." + (after.format(name=name) if after else ""))
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    return _each(args.names, "start", "Starting", "started",
                 "\nTo attach: agentkernel attach {name}")


def cmd_stop(args: argparse.Namespace) -> int:
    return _each(args.names, "stop", "Stopping", "stopped")


def cmd_remove(args: argparse.Namespace) -> int:
    return _each(args.names, "remove", "Removing", "removed")


def cmd_list(args: argparse.Namespace) -> int:
    rows = client.call("list_sandboxes")
    if getattr(args, "json", False):
        import json  # only for --json output

        print(json.dumps(rows))
        return 0
    if not rows:
        print("No sandboxes found.\n\nCreate one with: agentkernel create <name>")
        return 0
    print(f"{'NAME':<20} {'STATUS':<10} {'BACKEND':<12} {'IMAGE':<24} EXPIRES")
    for r in rows:
        print(f"{r['name']:<20} {r['status']:<10} {r['backend']:<12} {r['image']:<24} "
              f"{r.get('expires_at') or '-'}")
    return 0


# ---------------------------------------------------------------- exec / attach


# exec's usage, shown alike for an unknown option before NAME (its parser) and after it
# (_late_options, whose parser the fast path reaches without the full one).
EXEC_USAGE = ("%(prog)s [-h] [-e KEY=VAL] [-w WORKDIR] [-t] [-i] [--timeout SECONDS] NAME "
              "[--] COMMAND [ARG...]")


def _late_options(args: argparse.Namespace) -> list[str]:
    """`exec NAME -e K=V -w DIR -- CMD`: options after NAME land in the command; take them."""
    command = list(args.command)
    if "--" not in command or command[0] == "--":
        return strip_dashes(command)
    cut = command.index("--")
    import argparse

    p = argparse.ArgumentParser(prog="agentkernel exec", usage=EXEC_USAGE, add_help=False)
    p.add_argument("-e", "--env", action="append", default=[])
    p.add_argument("-w", "--workdir")
    p.add_argument("-t", "--tty", action="store_true")
    p.add_argument("-i", "--interactive", action="store_true")
    p.add_argument("--timeout", type=float)
    try:
        late, rest = p.parse_known_args(command[:cut])
    except SystemExit:
        raise DaemonError("invalid options before --", 2) from None
    if rest:  # as any unknown option of exec's: its usage, exit code 2
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    args.env = [*args.env, *late.env]
    args.workdir = late.workdir or args.workdir
    args.tty = args.tty or late.tty
    args.interactive = args.interactive or late.interactive
    args.timeout = late.timeout if late.timeout is not None else args.timeout
    return command[cut + 1 :]


def cmd_exec(args: argparse.Namespace) -> int:
    validate_sandbox_name(args.name)
    command = _late_options(args)
    if not command:
        raise DaemonError("no command given: agentkernel exec NAME -- COMMAND [ARGS...]", 2)
    if args.timeout is not None and args.timeout <= 0:
        raise DaemonError("--timeout must be a positive number of seconds", 2)
    tty = bool(args.tty)
    env = env_pairs(args.env)
    if tty and "TERM" in os.environ:
        env.setdefault("TERM", os.environ["TERM"])
    req: dict[str, Any] = {"name": args.name, "argv": command, "env": env,
                           "workdir": args.workdir, "timeout": args.timeout,
                           "stdin_open": bool(args.interactive),
                           "tty": list(client.terminal_size()) if tty else None}
    return interactive("exec", req, stdin=bool(args.interactive), tty=tty)


def cmd_attach(args: argparse.Namespace) -> int:
    """A terminal in the sandbox: its agent (made with --agent), else a shell."""
    validate_sandbox_name(args.name)
    env = env_pairs(args.env)
    env.setdefault("TERM", os.environ.get("TERM", "xterm"))
    shell = "command -v bash >/dev/null 2>&1 && exec bash -i || exec sh -i"
    argv = ["/bin/sh", "-c", shell]
    extra = strip_dashes(list(args.command))
    agent = None if args.shell else client.call("get", {"name": args.name}).get("agent")
    if agent:
        from ..agents.registry import get

        argv = [get(str(agent)).binary, *extra]  # on the PATH the sandbox was given
    elif extra:
        raise DaemonError("arguments after -- are for an agent's sandbox (made with --agent)",
                          2)
    req: dict[str, Any] = {"name": args.name, "argv": argv, "env": env,
                           "stdin_open": True, "tty": list(client.terminal_size())}
    return interactive("exec", req, stdin=True, tty=True)


def interactive(op: str, req: dict[str, Any], *, stdin: bool, tty: bool) -> int:
    lines = client.open_stream(op, req, auto_start=True)
    assert lines is not None
    restore = None
    if tty and os.isatty(0):
        import termios
        import tty as tty_mod

        saved = termios.tcgetattr(0)
        tty_mod.setraw(0)

        def restore_fn() -> None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)

        restore = restore_fn
    try:
        result = client.pump(lines, stdin_fd=0 if stdin else None, tty=tty)
    finally:
        if restore is not None:
            restore()
    if result.get("message"):
        say(str(result["message"]))
    return int(result.get("exit_code", 125))


# ---------------------------------------------------------------- cp


def _split(spec: str) -> tuple[str | None, str]:
    """`name:/path` -> (name, path); anything else is a host path (upstream's rule)."""
    head, sep, tail = spec.partition(":")
    if sep and head and not head.startswith(("/", ".")):
        return validate_sandbox_name(head), validate_sandbox_path(tail)
    return None, spec


def _exclusive_temp(target: str) -> tuple[int, str]:
    """A new file beside `target` under an unguessable name, never through a planted link.

    O_CREAT|O_EXCL fails on anything already there (a symlink included, even a dangling
    one), O_NOFOLLOW on a link, so the copy is written only into a file made here.
    """
    head, tail = os.path.split(target)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        tmp = os.path.join(head, f".{tail}.ak-{_random_token()}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue  # taken (or planted): another name
        except OSError as exc:
            raise DaemonError(f"cannot write {target}: {exc.strerror}") from None
    raise DaemonError(f"cannot create a temporary file beside {target}")


def _random_token() -> str:
    return os.urandom(8).hex()


def _open_source(src: str) -> BinaryIO:
    """The host file `src`, open for reading, if it is a regular file (links followed: the
    user named it). Anything else is refused before it is opened: reading a FIFO waits
    for a writer forever, a device never ends or acts on open. What is opened is checked
    again (fstat), opened without blocking, so a FIFO put in its place meanwhile is
    refused rather than waited on."""
    import stat

    try:
        mode = os.stat(src).st_mode
    except OSError as exc:
        raise DaemonError(f"cannot read {src}: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        raise DaemonError(f"{src} is a directory (cp copies single files)", 2)
    if not stat.S_ISREG(mode):
        raise DaemonError(f"{src} is {_kind(mode)}, not a regular file (cp copies regular "
                          "files only)", 2)
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise DaemonError(f"cannot read {src}: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise DaemonError(f"{src} is {_kind(mode)}, not a regular file (cp copies regular "
                          "files only)", 2)
    os.set_blocking(fd, True)
    return open(fd, "rb")


def _kind(mode: int) -> str:
    import stat

    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "a special file"


def cmd_cp(args: argparse.Namespace) -> int:
    src_name, src = _split(args.src)
    dst_name, dst = _split(args.dst)
    if (src_name is None) == (dst_name is None):
        raise DaemonError("cp needs exactly one side of the form SANDBOX:/path", 2)
    chunk = 256 * 1024
    if dst_name is not None:
        f = _open_source(src)
        with f:
            mode = os.fstat(f.fileno()).st_mode & 0o777
            lines = client.open_stream("cp_in", {"name": dst_name, "path": dst, "mode": mode},
                                       auto_start=True)
            assert lines is not None
            try:
                while data := f.read(chunk):
                    lines.send({"d": data.decode("latin-1")})
                lines.send({"end": True})
            except OSError:
                pass  # the daemon answered early (an error) and hung up: read it below
        reply = lines.recv()
        lines.sock.close()
        if reply is None or not reply.get("ok"):
            client._raise(reply)
        assert reply is not None
        print(f"Copied {reply['data']} bytes from {args.src} to {args.dst}")
        return 0
    assert src_name is not None
    target = dst
    if os.path.isdir(target):
        target = os.path.join(target, os.path.basename(src) or "file")
    fd, tmp = _exclusive_temp(target)
    try:
        lines = client.open_stream("cp_out", {"name": src_name, "path": src}, auto_start=True)
        assert lines is not None
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    try:
        with open(fd, "wb") as out:
            while True:
                msg = lines.recv()
                if msg is None:
                    raise DaemonError("the daemon closed the connection during the copy")
                if "d" in msg:
                    write_sparse(out, str(msg["d"]).encode("latin-1"))
                    continue
                if not msg.get("ok"):
                    client._raise(msg)
                size = int(msg["data"])
                break
            finish(out)  # a hole at the end still counts in the size
        os.replace(tmp, target)
    finally:
        lines.sock.close()
        if os.path.lexists(tmp):
            os.unlink(tmp)
    print(f"Copied {size} bytes from {args.src} to {args.dst}")
    return 0
