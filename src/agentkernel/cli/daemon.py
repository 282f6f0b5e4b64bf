"""`daemon start|stop|status` and `serve`: the per-user daemon, and its HTTP API for the SDKs.

The only CLI module that imports the daemon's side (`daemon.server`), and only where this
process becomes the daemon (`daemon start --foreground`, `serve` with none running).
"""

from __future__ import annotations

import time

from ..ipc import client
from ..ipc.client import DaemonError
from .common import say

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any


def add_daemon_parser(sub: Any) -> None:
    d = sub.add_parser("daemon", help="the per-user daemon: start, stop, status")
    d.set_defaults(handler=cmd_daemon)
    dsub = d.add_subparsers(dest="daemon_cmd", metavar="SUBCOMMAND", required=True)
    ds = dsub.add_parser("start", help="start the daemon (in the background)")
    ds.add_argument("--foreground", action="store_true", help="run in this process")
    ds.add_argument("-c", "--config", help="daemon config (default: "
                    "~/.config/agentkernel/config.toml)")
    ds.add_argument("--idle-exit", type=float, default=0.0, metavar="SECONDS",
                    help="stop after SECONDS unused while holding no kept sandbox "
                         "(what `run` gives the daemon it starts; default: never)")
    dsub.add_parser("stop", help="stop the daemon (persistent sandboxes keep running)")
    dst = dsub.add_parser("status", help="is it running, and its warm pools")
    dst.add_argument("--json", action="store_true")


def add_serve_parser(sub: Any) -> None:
    sv = sub.add_parser("serve", help="serve the HTTP API of the agentkernel SDKs (through "
                                      "the running daemon, else as the daemon in the "
                                      "foreground)")
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default 127.0.0.1). A bearer key is always "
                         "required: AGENTKERNEL_API_KEY, [api] api_key, or the one generated "
                         "on the first serve and stored 0600 in the data dir")
    sv.add_argument("--port", type=int, default=18888)
    sv.add_argument("-c", "--config", help="daemon config (agentkernel.toml with [daemon], "
                                          "[api])")
    sv.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                    help="also answer requests whose Host is NAME (repeatable; loopback "
                         "names always are; see [api] allowed_hosts)")
    sv.add_argument("--insecure-no-key", action="store_true",
                    help="DANGEROUS: no API key on a loopback address; every local user "
                         "and program can then use the API as you")
    sv.set_defaults(handler=cmd_serve)


def cmd_daemon(args: argparse.Namespace) -> int:
    if args.daemon_cmd == "start":
        if args.foreground:
            from ..daemon.server import run_daemon

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
        sock = client.connect() or _await_starting()
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


def _await_starting() -> Any:
    """A connection to a daemon that is on its way up (its socket not there yet: `run`
    started it a moment ago, or it is loading), once it listens; None if none is, or
    it ended first. Waits as long as `start_daemon` would."""
    deadline = time.monotonic() + client.START_TIMEOUT
    path = client.socket_path()
    while time.monotonic() < deadline:
        pid = _starting_pid()
        sock = client._try_connect(path)  # (after the look: one that just came up counts)
        if sock is not None or not pid:
            return sock
        time.sleep(0.02)
    return None


def _starting_pid() -> int:
    """The pid of a daemon on its way up, else 0: the holder of the runtime dir's lock
    (taken before the socket is made), or the daemon `run` spawned (its pid in the
    autostart stamp) while it still runs our `daemon start`, before it takes the lock."""
    import os

    from ..paths import read_pid, runtime_dir_str

    rt = runtime_dir_str()
    holder = _lock_holder(os.path.join(rt, "daemon.lock"))
    if holder:
        return holder
    pid = read_pid(os.path.join(rt, "daemon.autostart"))
    return pid if pid and _pid_alive(pid) and _is_daemon_start(pid) else 0


def _lock_holder(path: str) -> int:
    """The pid holding an flock on `path` (from /proc/locks: looked at, never taken, so a
    daemon taking it meanwhile is not turned away), 0 if none."""
    import os

    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            lines = f.read(1 << 20).splitlines()
    except OSError:
        return 0
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF" ("->" marks a waiter)
        if len(fields) >= 6 and fields[1] == "FLOCK" \
                and fields[5] == want and fields[4].isdigit():
            return int(fields[4])
    return 0


def _is_daemon_start(pid: int) -> bool:
    """Whether process `pid` (ours) runs `agentkernel daemon start` (not a reused pid)."""
    import os

    try:
        if os.stat(f"/proc/{pid}").st_uid != os.getuid():
            return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read(4096).split(b"\0")
    except OSError:
        return False
    return b"agentkernel" in argv and b"daemon" in argv and b"start" in argv


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
    from ..daemon.server import DaemonRunning, run_daemon
    from ..http.serve import ServeOptions

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

    from ..daemon.server import attach_args, daemon_config_path, load_daemon_config
    from ..http.serve import describe

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
        say(describe(str(data["url"]), options))
        say(f"served by the running daemon (pid {data['pid']}): the CLI and the SDKs share "
             "its sandboxes; Ctrl-C stops serving HTTP, not the daemon")
        while lines.recv() is not None:
            pass
        say("the daemon stopped, and the HTTP API with it")
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        sock.close()
