"""The `agentkernel` command line: parse arguments, call the engine, map errors to exit codes."""

from __future__ import annotations

import sys

from . import __version__
from .errors import AgentKernelError, UsageError

# The hot path (`run`/`exec` through the daemon) must not pay for argparse, typing or json.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any


def _add_run_parser(sub: Any) -> None:
    import argparse

    p = sub.add_parser("run", help="run a command in a fresh sandbox",
                       description="Run COMMAND in a fresh isolated sandbox and remove it after.")
    p.add_argument("-i", "--image", help="image for the sandbox (default: auto-detected)")
    p.add_argument("-p", "--profile", help="security profile: permissive, moderate, restrictive")
    p.add_argument("-B", "--backend",
                   help="isolation backend: auto, namespaces, gvisor, microvm, docker, podman, "
                        "wasm, hyperlight")
    p.add_argument("--no-network", action="store_true", help="no network at all")
    _add_egress_flags(p)
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
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")


def _add_egress_flags(p: Any) -> None:
    p.add_argument("--allow-host", action="append", default=[], metavar="HOST",
                   help="egress allow-list entry (host, *.domain, host:port, CIDR); "
                        "any makes the policy default-deny")
    p.add_argument("--deny-host", action="append", default=[], metavar="HOST",
                   help="egress deny entry (wins over allow)")
    p.add_argument("--add-host", action="append", default=[], metavar="NAME:ADDRESS",
                   help="what the sandbox's resolver answers for NAME (still policed)")
    p.add_argument("--secret", action="append", default=[], metavar="NAME",
                   help="a stored secret: the sandbox sees a placeholder, its hosts the value")


def _add_secret_parser(sub: Any) -> None:
    sc = sub.add_parser("secret", help="secrets kept on the host, used by sandboxes' egress")
    ss = sc.add_subparsers(dest="action", required=True)
    st = ss.add_parser("set", help="store a secret (the value from stdin or --from-env)")
    st.add_argument("name")
    st.add_argument("--host", action="append", required=True, help="a host that gets it")
    st.add_argument("--header", required=True, help="the header it goes in (* for any)")
    st.add_argument("--env", help="the sandbox's variable for its placeholder "
                                  "(default: NAME upper-cased)")
    st.add_argument("--from-env", metavar="VAR", help="read the value from this variable")
    ss.add_parser("list", help="names, hosts and headers (never values)")
    rm = ss.add_parser("rm", help="forget a secret")
    rm.add_argument("name")


def _add_egress_parser(sub: Any) -> None:
    eg = sub.add_parser("egress", help="a running sandbox's egress policy and log")
    eg.add_argument("name")
    eg.add_argument("action", choices=["allow", "deny", "log", "show"])
    eg.add_argument("entry", nargs="?", help="host, *.domain, host:port or CIDR")
    eg.add_argument("-f", "--follow", action="store_true", help="log: keep printing")
    eg.add_argument("--json", action="store_true", help="log: raw JSON lines")


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


def _add_config_parser(sub: Any) -> None:
    p = sub.add_parser("config", help="show the effective settings and where each came from",
                       description="Print the settings a run here gets: built-in defaults, "
                       "the user config ($XDG_CONFIG_HOME/agentkernel/config.toml), "
                       "./agentkernel.toml (or --config), the environment and flags, each "
                       "with its origin. See docs/config.md.")
    p.add_argument("action", nargs="?", choices=["show"], default="show",
                   help="show (the default; the only action)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("-c", "--config", help="agentkernel.toml to use instead of ./agentkernel.toml")
    p.add_argument("-p", "--profile", help="as `run --profile`")
    p.add_argument("-B", "--backend", help="as `run --backend`")


def build_parser() -> argparse.ArgumentParser:
    import argparse

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
    _add_config_parser(sub)
    _add_sandbox_parsers(sub)
    _add_egress_parser(sub)
    _add_secret_parser(sub)

    sv = sub.add_parser("serve", help="serve the HTTP API of the agentkernel SDKs (runs the "
                                      "daemon in the foreground)")
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
    _add_agent_parsers(sub)
    st = sub.add_parser("setup", help="prepare optional backends (the microVM guest kernel)")
    st.add_argument("--microvm", action="store_true", required=True,
                    help="fetch and prepare the guest kernel and initramfs for `microvm`")
    st.add_argument("--kernel-deb", metavar="DEB",
                    help="use this linux-image-*.deb instead of downloading Debian's "
                         "cloud kernel with apt-get download")
    st.add_argument("--vmlinux", metavar="FILE",
                    help="use this ELF vmlinux with everything built in (e.g. the "
                         "minimal kernel) instead of Debian's cloud kernel")
    st.add_argument("--force", action="store_true",
                    help="fetch and unpack the kernel again even if it is cached")
    st.add_argument("--no-kvm-probe", action="store_true",
                    help="skip the test boot under KVM (the accelerator is probed later)")
    return parser


def _add_agent_parsers(sub: Any) -> None:
    """AI coding agents: the registry, the MCP server, plugins (see docs/agents.md)."""
    ag = sub.add_parser("agents", help="AI coding agents: installed, signed in, wired to "
                                       "agentkernel")
    ag.add_argument("--json", action="store_true")
    agsub = ag.add_subparsers(dest="agents_cmd", metavar="SUBCOMMAND")
    agl = agsub.add_parser("list", help="the table (the default)")
    agl.add_argument("--json", action="store_true")
    agi = agsub.add_parser("install", help="install an agent's pinned npm package into "
                                           "agentkernel's data dir")
    agi.add_argument("names", nargs="+", metavar="AGENT", help="an agent id, or all")
    ms = sub.add_parser("mcp-server", help="serve agentkernel's MCP tools on stdin/stdout")
    ms.add_argument("--project", metavar="DIR",
                    help="the project dir sandboxes see at /workspace (default: here)")
    pl = sub.add_parser("plugin", help="wire agentkernel into Claude Code, Codex, Gemini "
                                       "CLI, OpenCode")
    psub = pl.add_subparsers(dest="plugin_cmd", metavar="SUBCOMMAND", required=True)
    for name, what in (("install", "add agentkernel's MCP server (and Claude Code plugin)"),
                       ("uninstall", "take it out again")):
        p = psub.add_parser(name, help=what)
        p.add_argument("target", metavar="TARGET", help="claude, codex, gemini, opencode "
                                                        "or all")
        p.add_argument("--scope", choices=("user", "project"), default="user",
                       help="user (default): your home's config; project: this dir's")
        p.add_argument("--dry-run", action="store_true", help="show the change, make none")
        if name == "install":
            p.add_argument("--force", action="store_true",
                           help="replace an existing, different agentkernel entry")
    pls = psub.add_parser("list", help="where agentkernel is wired in")
    pls.add_argument("--json", action="store_true")


def _add_sandbox_parsers(sub: Any) -> None:
    """Persistent sandboxes and the daemon that owns them (see docs/daemon.md)."""
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
    _add_egress_flags(c)
    e = sub.add_parser("exec", help="run a command in a persistent sandbox",
                       description="Run COMMAND in sandbox NAME; its exit code is ours.")
    e.add_argument("name")
    e.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VAL")
    e.add_argument("-w", "--workdir", help="working directory inside the sandbox")
    e.add_argument("-t", "--tty", action="store_true", help="allocate a pseudo-terminal")
    e.add_argument("-i", "--interactive", action="store_true", help="forward stdin")
    e.add_argument("--timeout", type=float, help="kill the command after SECONDS")
    e.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")
    a = sub.add_parser("attach", help="interactive shell in a persistent sandbox")
    a.add_argument("name")
    a.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VAL")
    cp = sub.add_parser("cp", help="copy a file into or out of a sandbox (NAME:/path)")
    cp.add_argument("src")
    cp.add_argument("dst")
    ls = sub.add_parser("list", aliases=["ls"], help="list persistent sandboxes")
    ls.add_argument("--json", action="store_true")
    for cmd, what in (("start", "start stopped sandboxes (their files are kept)"),
                      ("stop", "stop sandboxes, keeping their files"),
                      ("remove", "remove sandboxes and everything they stored")):
        p = sub.add_parser(cmd, aliases=["rm"] if cmd == "remove" else [], help=what)
        p.add_argument("names", nargs="+", metavar="NAME")
    d = sub.add_parser("daemon", help="the per-user daemon: start, stop, status")
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


_DAEMON_COMMANDS = {"create": "cmd_create", "exec": "cmd_exec", "attach": "cmd_attach",
                    "cp": "cmd_cp", "list": "cmd_list", "ls": "cmd_list", "start": "cmd_start",
                    "stop": "cmd_stop", "remove": "cmd_remove", "rm": "cmd_remove",
                    "daemon": "cmd_daemon"}


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else list(argv)
    if raw in (["--version"], ["-V"]):  # no parser needed
        print(f"agentkernel {__version__}")
        return 0
    if raw[:1] == ["run"] or raw[:1] == ["exec"]:
        # Plain `run`/`exec` through a running daemon: parsed without argparse.
        from .daemon.fastpath import fast_main

        code = fast_main(raw)
        if code is not None:
            return code
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
            from pathlib import Path

            from .images.cli import main as images_main
            from .planner import CallerContext, RunRequest, load_configs

            config, _, warnings = load_configs(RunRequest(argv=[], cwd=Path.cwd()),
                                               CallerContext.here())
            for warning in warnings:
                print(f"agentkernel: warning: {warning}", file=sys.stderr)
            return images_main(args, config)
        if args.cmd == "config":
            from .config_cli import main as config_main

            return config_main(args)
        if args.cmd == "serve":
            from .daemon.commands import cmd_serve

            return cmd_serve(args)
        if args.cmd == "egress":
            from .egress_cli import cmd_egress

            return cmd_egress(args)
        if args.cmd == "secret":
            from .egress_cli import cmd_secret

            return cmd_secret(args)
        if args.cmd == "setup":
            from .vm.setup import main as setup_main

            return setup_main(args)
        if args.cmd in ("agents", "plugin"):
            from .plugins.cli import main as agents_main

            return agents_main(args)
        if args.cmd == "mcp-server":
            from .mcpserver.stdio import main as mcp_main

            return mcp_main(args.project)
        if args.cmd in _DAEMON_COMMANDS:
            from .daemon import commands

            return int(getattr(commands, _DAEMON_COMMANDS[args.cmd])(args))
        build_parser().print_help()
        return 2
    except AgentKernelError as exc:
        print(f"agentkernel: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def cmd_run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if args.agent:
        from .agents.launch import cmd_run_agent

        return cmd_run_agent(args, command)
    if not command and not args.image:  # only an image can supply a command (its Cmd)
        raise UsageError("no command given: agentkernel run [OPTIONS] -- COMMAND [ARGS...]")
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError("--timeout must be a positive number of seconds")
    from .runcmd import daemon_wanted, run_in_process

    egress_flags = bool(args.allow_host or args.deny_host or args.add_host or args.secret)
    if args.keep or (daemon_wanted() and not egress_flags):  # pools keep the default policy
        # Through the daemon when one is up (warm pool); --keep starts one if needed.
        from .daemon.commands import run_via_daemon

        code = run_via_daemon(args, command, keep=args.keep)
        if code is not None:
            return code
    return run_in_process(args, command)


def cmd_init(args: argparse.Namespace) -> int:
    from pathlib import Path

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
