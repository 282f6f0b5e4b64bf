"""CLI commands the daemon serves: create, exec, attach, cp, list, start, stop, remove, daemon."""

from __future__ import annotations

import os
import sys
import time

from ..names import validate_sandbox_name, validate_sandbox_path
from ..paths import data_dir_str
from . import client
from .client import DaemonError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any


def _say(msg: str) -> None:
    print(f"agentkernel: {msg}", file=sys.stderr)


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


def env_pairs(pairs: list[str]) -> dict[str, str]:
    """`-e KEY=VALUE`, or `-e KEY` to pass the host's value (the daemon validates names)."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            if key not in os.environ:
                raise DaemonError(f"-e {key}: not set on the host (use KEY=VALUE)", 2)
            value = os.environ[key]
        env[key] = value
    return env


def _command(args_command: list[str]) -> list[str]:
    command = list(args_command)
    if command and command[0] == "--":
        command = command[1:]
    return command


# ---------------------------------------------------------------- create / lifecycle


def _limits(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """--memory and --pids as request fields (profiles.UNLIMITED for `unlimited`)."""
    pids_arg = getattr(args, "pids", None)
    if not args.memory and not pids_arg:
        return None, None  # the run hot path: profiles (typing, re, enum) costs ~10 ms
    from ..profiles import parse_memory_limit, parse_pids

    memory = parse_memory_limit(args.memory) if args.memory else None
    return memory, parse_pids(pids_arg) if pids_arg else None


def cmd_create(args: argparse.Namespace) -> int:
    validate_sandbox_name(args.name)
    if getattr(args, "secret", None):
        from ..errors import UsageError

        raise UsageError("--secret is for `agentkernel run` only for now (a kept sandbox's "
                         "gate would need the value across daemon restarts)")
    memory, pids = _limits(args)
    req: dict[str, Any] = {
        "name": args.name, "image": args.image, "profile": args.profile,
        "backend": args.backend, "memory_mb": memory, "pids": pids, "cpus": args.cpus,
        "workdir_source": os.path.abspath(args.dir) if args.dir else None,
        "env": env_pairs(args.env),
        "ttl_seconds": parse_duration(args.ttl) if args.ttl else None, **_caller(),
        "allow_hosts": list(args.allow_host), "deny_hosts": list(args.deny_host),
        "add_hosts": list(args.add_host),
    }
    print(f"Creating sandbox '{args.name}'" + (f" with image '{args.image}'" if args.image
                                               else "") + "...")
    info = client.call("create", req)
    print(f"  Image:   {info['image']}")
    if info.get("rootfs"):
        print(f"  Rootfs:  {info['rootfs']}")
    from ..planner import UNAVAILABLE_ROOTFS, fallback_warning

    if info.get("rootfs") == UNAVAILABLE_ROOTFS:
        _say(f"warning: {fallback_warning(info['image'])}")
    print(f"  Backend: {info['backend']} ({info['isolation']})")
    print(f"  Profile: {info['profile']}")
    print(f"  vCPUs:   {info['vcpus'] or 'unlimited'}")
    print(f"  Memory:  {info['memory_mb'] or 'unlimited'} MB")
    if info.get("expires_at"):
        print(f"  Expires: {info['expires_at']}")
    print(f"\nSandbox '{args.name}' created.\n\nNext steps:\n"
          f"  agentkernel exec {args.name} -- COMMAND\n  agentkernel attach {args.name}")
    return 0


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


def _late_options(args: argparse.Namespace) -> list[str]:
    """`exec NAME -e K=V -w DIR -- CMD`: options after NAME land in the command; take them."""
    command = list(args.command)
    if "--" not in command or command[0] == "--":
        return _command(command)
    cut = command.index("--")
    import argparse

    p = argparse.ArgumentParser(prog="agentkernel exec", add_help=False)
    p.add_argument("-e", "--env", action="append", default=[])
    p.add_argument("-w", "--workdir")
    p.add_argument("-t", "--tty", action="store_true")
    p.add_argument("-i", "--interactive", action="store_true")
    p.add_argument("--timeout", type=float)
    try:
        late, rest = p.parse_known_args(command[:cut])
    except SystemExit:
        raise DaemonError("invalid options before --", 2) from None
    if rest:
        raise DaemonError(f"unexpected argument(s) before --: {' '.join(rest)}", 2)
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
    return _interactive("exec", req, stdin=bool(args.interactive), tty=tty)


def cmd_attach(args: argparse.Namespace) -> int:
    validate_sandbox_name(args.name)
    env = env_pairs(args.env)
    env.setdefault("TERM", os.environ.get("TERM", "xterm"))
    shell = "command -v bash >/dev/null 2>&1 && exec bash -i || exec sh -i"
    req: dict[str, Any] = {"name": args.name, "argv": ["/bin/sh", "-c", shell], "env": env,
                           "stdin_open": True, "tty": list(client.terminal_size())}
    return _interactive("exec", req, stdin=True, tty=True)


def _interactive(op: str, req: dict[str, Any], *, stdin: bool, tty: bool) -> int:
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
        _say(str(result["message"]))
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


def cmd_cp(args: argparse.Namespace) -> int:
    src_name, src = _split(args.src)
    dst_name, dst = _split(args.dst)
    if (src_name is None) == (dst_name is None):
        raise DaemonError("cp needs exactly one side of the form SANDBOX:/path", 2)
    chunk = 256 * 1024
    if dst_name is not None:
        if os.path.isdir(src):
            raise DaemonError(f"{src} is a directory (cp copies single files)", 2)
        try:
            f = open(src, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise DaemonError(f"cannot read {src}: {exc.strerror}") from None
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
                    out.write(str(msg["d"]).encode("latin-1"))
                    continue
                if not msg.get("ok"):
                    client._raise(msg)
                size = int(msg["data"])
                break
        os.replace(tmp, target)
    finally:
        lines.sock.close()
        if os.path.lexists(tmp):
            os.unlink(tmp)
    print(f"Copied {size} bytes from {args.src} to {args.dst}")
    return 0


# ---------------------------------------------------------------- run through the daemon


def _caller() -> dict[str, Any]:
    """This CLI's context for the daemon's planner (context.py): the daemon plans our run
    from our environment and user config, never from its own."""
    from ..context import caller_env, user_config_path

    return {"caller_env": caller_env(), "user_config": user_config_path()}


def run_via_daemon(args: argparse.Namespace, command: list[str], *, keep: bool) -> int | None:
    """`agentkernel run` through the daemon's warm pool; None if no daemon is up.

    With --keep the daemon is started if needed, and the sandbox stays as a persistent one.
    """
    if keep:
        return _run_keep(args, command)
    memory, pids = _limits(args)
    forward_stdin = not sys.stdin.isatty() if sys.stdin else False
    req: dict[str, Any] = {
        "argv": command, "image": args.image, "profile": args.profile,
        "backend": args.backend, "env": env_pairs(args.env), "workdir": args.workdir,
        "timeout": args.timeout, "cwd": os.getcwd(), "no_network": bool(args.no_network),
        "memory_mb": memory, "pids": pids, "cpus": args.cpus,
        "config_path": os.path.abspath(args.config) if args.config else None,
        **_caller(), "stdin_open": forward_stdin and not args.json,
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
            _say(f"warning: {warning}")
        if args.verbose:
            how = "warm pool" if data.get("pooled") else "cold start, the pool was empty"
            _say(f"via daemon ({how}): sandbox {data.get('sandbox')}")
            _say(f"backend {data.get('backend')}: {data.get('isolation')}")
            for line in data.get("skipped") or []:
                _say(str(line))
            _say(f"image {data.get('image')} ({data.get('image_reason')}); "
                 f"rootfs: {data.get('rootfs')}")
            _say(f"profile {data.get('profile')}: network={data.get('network')} "
                 f"workspace={data.get('workspace')} "
                 f"memory={data.get('memory_mb') or 'unlimited'}MiB "
                 f"pids={data.get('pids') or 'unlimited'} cpus={data.get('cpus') or 'unlimited'}")
        for note in data.get("notes") or []:
            _say(f"note: {note}")

    sink = (lambda stream, data: captured[stream].append(data)) if args.json else None
    try:
        result = client.pump(lines, stdin_fd=0 if req["stdin_open"] else None, sink=sink,
                             on_started=on_started)
    except DaemonError as exc:
        if exc.kind == "WrongDaemon":
            return None  # a daemon of another data dir (AGENTKERNEL_HOME): run in-process
        raise
    if result.get("message") and not args.quiet:
        _say(str(result["message"]))
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


def _run_keep(args: argparse.Namespace, command: list[str]) -> int:
    """`run --keep`: a persistent sandbox `run-<hex>` owned by the daemon, command run in it."""
    import secrets

    if args.json:
        raise DaemonError("--json cannot be combined with --keep", 2)
    name = f"run-{secrets.token_hex(4)}"
    memory, pids = _limits(args)
    profile = args.profile
    client.call("create", {
        "name": name, "image": args.image, "profile": profile, "backend": args.backend,
        "memory_mb": memory, "pids": pids, "cpus": args.cpus, "workdir_source": os.getcwd(),
        "env": env_pairs(args.env), **_caller()})
    forward_stdin = not sys.stdin.isatty() if sys.stdin else False
    req: dict[str, Any] = {"name": name, "argv": command, "env": {}, "workdir": args.workdir,
                           "timeout": args.timeout, "stdin_open": forward_stdin}
    code = _interactive("exec", req, stdin=forward_stdin, tty=False)
    if not args.quiet:
        _say(f"sandbox '{name}' kept. Remove with: agentkernel remove {name}")
    return code


# ---------------------------------------------------------------- daemon


def cmd_daemon(args: argparse.Namespace) -> int:
    if args.daemon_cmd == "start":
        if args.foreground:
            from .server import run_daemon

            return run_daemon(args.config, idle_exit=args.idle_exit)
        sock = client.connect()
        if sock is not None:
            sock.close()
            print(f"Daemon is already running at {client.socket_path()}")
            return 0
        pid = client.start_daemon(args.config)
        print(f"Daemon started (pid {pid}), socket {client.socket_path()}")
        return 0
    if args.daemon_cmd == "stop":
        sock = client.connect()
        if sock is None:
            raise DaemonError("Daemon is not running")
        status = client._request(sock, "status", {})
        pid = int(status.get("pid", 0))
        client.call("shutdown", auto_start=False)
        deadline = time.monotonic() + 60
        while pid and time.monotonic() < deadline and _pid_alive(pid):
            time.sleep(0.02)
        print("Daemon stopped.")
        return 0
    # status
    sock = client.connect()
    if sock is None:
        print(f"Daemon: not running\nSocket: {client.socket_path()}")
        return 0
    data = client._request(sock, "status", {})
    if args.json:
        import json  # only for --json output

        print(json.dumps(data))
        return 0
    print(f"Daemon: running (pid {data['pid']}, up {data['uptime_s']}s)")
    print(f"Socket: {data['socket']}")
    for url in data.get("http") or []:
        print(f"HTTP API: {url}")
    print(f"Sandboxes: {data['sandboxes']} ({data['running']} running)")
    pools = data.get("pools") or []
    print("Pool:" if pools else "Pool: no keys yet")
    for p in pools:
        where = f" workspace={p['workspace']}" if p.get("workspace") else ""
        print(f"  {p['image']}/{p['profile']}/{p['backend']}{where}")
        print(f"    Warm:    {p['warm']}" + (f" (+{p['starting']} starting)"
                                               if p.get("starting") else ""))
        print(f"    In use:  {p['in_use']}")
        print(f"    Min/Max: {p['min']}/{p['max']}" + (
            f" (aiming for {p['target']}: {p.get('rate', 0)} runs/s, a start takes "
            f"{p.get('start_ms', 0)} ms)" if "target" in p else ""))
        if "hits" in p:
            print(f"    Served:  {p['hits']} warm ({p.get('waited', 0)} waited for a start), "
                  f"{p['misses']} cold")
        if p.get("last_error"):
            print(f"    Error:   {p['last_error']}")
    return 0


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rfind(b")") + 2 :][:1] not in (b"Z", b"X")


# ---------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace) -> int:
    """`agentkernel serve`: the HTTP API of the SDKs, served by the one daemon.

    No daemon running: this process becomes the daemon, with the HTTP listener. One running
    (e.g. started by an earlier `run`): it is asked to serve the HTTP API too, for as long
    as this command runs, so the CLI and the SDKs see the same sandboxes and pools.
    """
    from ..http.serve import ServeOptions
    from .server import DaemonRunning, run_daemon

    options = ServeOptions(args.host, args.port, insecure_no_key=args.insecure_no_key,
                           allowed_hosts=tuple(args.allowed_host))
    deadline = time.monotonic() + 30.0
    while True:
        sock = client.connect()
        if sock is not None:
            return _serve_attached(sock, args, options)
        try:
            return run_daemon(args.config, http=options)
        except DaemonRunning:
            # Another daemon is just starting (an autostart racing us): attach once it
            # listens.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _serve_attached(sock: Any, args: argparse.Namespace, options: Any) -> int:
    import signal

    from ..http.serve import describe
    from .server import attach_args, daemon_config_path, load_daemon_config

    status = client._request(sock, "status", {})
    mine = daemon_config_path(args.config)
    if status.get("config") != mine:
        theirs = status.get("config") or "no config file"
        raise DaemonError(
            f"a daemon (pid {status.get('pid')}) already runs with {theirs}; `serve` would "
            f"use {mine or 'no config file'}. Stop it first (agentkernel daemon stop) to "
            "serve with these settings", 1)
    config = load_daemon_config(args.config)
    options = options.with_config(config.api if config is not None else None)
    sock = client.connect()
    if sock is None:
        raise DaemonError("the daemon stopped while `serve` was attaching to it", 1)
    lines = client.Lines(sock)

    def stop(_signo: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        client._send_request(lines, "http_attach", attach_args(options))
        reply = lines.recv()
        if reply is None or not reply.get("ok"):
            client._raise(reply)
        assert reply is not None
        data = reply["data"]
        _say(describe(str(data["url"]), options))
        _say(f"served by the running daemon (pid {data['pid']}): the CLI and the SDKs share "
             "its sandboxes; Ctrl-C stops serving HTTP, not the daemon")
        while lines.recv() is not None:
            pass
        _say("the daemon stopped, and the HTTP API with it")
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        sock.close()
