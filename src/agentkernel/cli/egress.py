"""`agentkernel egress NAME allow|deny|show|log` (a running sandbox's policy and its log) and
`agentkernel secret set|list|rm`; the egress flags of `run` and `create`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ..errors import UsageError


def add_egress_flags(p: Any) -> None:
    """--allow-host/--deny-host/--add-host/--secret, for `run` and `create`."""
    p.add_argument("--allow-host", action="append", default=[], metavar="HOST",
                   help="egress allow-list entry (host, *.domain, host:port, CIDR); "
                        "any makes the policy default-deny")
    p.add_argument("--deny-host", action="append", default=[], metavar="HOST",
                   help="egress deny entry (wins over allow)")
    p.add_argument("--add-host", action="append", default=[], metavar="NAME:ADDRESS",
                   help="what the sandbox's resolver answers for NAME (still policed)")
    p.add_argument("--secret", action="append", default=[], metavar="NAME",
                   help="a stored secret: the sandbox sees a placeholder, its hosts the value")


def add_parsers(sub: Any) -> None:
    eg = sub.add_parser("egress", help="a running sandbox's egress policy and log")
    eg.add_argument("name")
    eg.add_argument("action", choices=["allow", "deny", "log", "show"])
    eg.add_argument("entry", nargs="?", help="host, *.domain, host:port or CIDR")
    eg.add_argument("-f", "--follow", action="store_true", help="log: keep printing")
    eg.add_argument("--json", action="store_true", help="log: raw JSON lines")
    eg.add_argument("--audit", action="store_true",
                    help="log: from the host's audit log (kept after the sandbox is gone)")
    eg.set_defaults(handler=cmd_egress)
    sc = sub.add_parser("secret", help="secrets kept on the host, used by sandboxes' egress")
    ss = sc.add_subparsers(dest="action", required=True)
    st = ss.add_parser("set", help="store a secret (the value from stdin or --from-env)")
    st.add_argument("name")
    st.add_argument("--host", action="append", required=True, help="a host that gets it")
    st.add_argument("--header", required=True,
                    help="the header it goes in (* for any credential header: "
                         "Authorization, Cookie, X-Api-Key and the like)")
    st.add_argument("--env", help="the sandbox's variable for its placeholder "
                                  "(default: NAME upper-cased)")
    st.add_argument("--from-env", metavar="VAR", help="read the value from this variable")
    st.add_argument("--projects", action="store_true",
                    help="a project's agentkernel.toml may ask for it ([secrets.NAME]); "
                         "otherwise only --secret and your own config give it")
    ss.add_parser("list", help="names, hosts and headers (never values)")
    rm = ss.add_parser("rm", help="forget a secret")
    rm.add_argument("name")
    sc.set_defaults(handler=cmd_secret)


def cmd_egress(args: argparse.Namespace) -> int:
    from ..egress_gate import control, format_entry, read_log, scratch_of

    if args.action in ("allow", "deny"):
        if not args.entry:
            raise UsageError(f"egress {args.name} {args.action}: which host?")
        reply = control(args.name, {"op": args.action, "entry": args.entry})
        print(f"{args.action} {args.entry}: applied to {args.name}")
        policy = reply.get("policy")
        if isinstance(policy, dict) and not policy.get("default_allow"):
            print("  (the policy is now default-deny: only allowed hosts are reachable)")
        return 0
    if args.action == "show":
        print(json.dumps(control(args.name, {"op": "show"}).get("policy"), indent=2))
        return 0
    if args.audit:
        for entry in _audit_entries(args.name):
            print(json.dumps(entry) if args.json else format_entry(entry))
        return 0
    scratch = scratch_of(args.name)
    offset = 0
    while True:
        entries, offset = read_log(scratch, offset)
        for entry in entries:
            print(json.dumps(entry) if args.json else format_entry(entry))
        sys.stdout.flush()
        if not args.follow:
            return 0
        if not scratch.exists():
            return 0  # the sandbox is gone
        time.sleep(0.5)


def _audit_entries(name: str) -> list[dict[str, object]]:
    """The audit log's entries of the sandbox called `name`: a kept one's (the daemon
    knows its instance), a running one-shot's (its scratch dir says), else those of the
    last sandbox that had the name. Never an earlier namesake's."""
    from ..egress_audit import latest_audit, read_audit
    from ..egress_gate import INSTANCE_NAME
    from ..ipc.client import DaemonError, call
    from ..names import validate_sandbox_name
    from ..paths import runtime_dir

    validate_sandbox_name(name)
    try:
        entries = call("egress_log", {"name": name}, auto_start=False)
        return list(entries) if isinstance(entries, list) else []
    except DaemonError as exc:
        if exc.kind not in ("NotFound", "DaemonError"):  # DaemonError: none runs
            raise
    try:
        instance = (runtime_dir() / "sandboxes" / name / INSTANCE_NAME).read_text().strip()
    except OSError:
        return latest_audit(name)
    return read_audit(name, instance=instance)


def cmd_secret(args: argparse.Namespace) -> int:
    import os

    from .. import secrets_store

    if args.action == "set":
        if args.from_env:
            if args.from_env not in os.environ:
                raise UsageError(f"--from-env {args.from_env}: not set")
            value = os.environ[args.from_env]
        else:
            if sys.stdin.isatty():
                print("value (one line): ", end="", file=sys.stderr, flush=True)
            value = sys.stdin.read(secrets_store.MAX_VALUE + 2)
        env = args.env or args.name.upper().replace("-", "_")
        secret = secrets_store.save(args.name, list(args.host), args.header, env, value,
                                    projects=args.projects)
        print(f"secret {secret.name}: {secret.env} in sandboxes, sent only to "
              f"{', '.join(secret.hosts)} in {secret.header}" +
              ("; projects may ask for it" if secret.projects else ""))
        return 0
    if args.action == "list":
        for name in secrets_store.names():
            s = secrets_store.load(name)
            print(f"{s.name}\t{s.env}\t{','.join(s.hosts)}\t{s.header}" +
                  ("\tprojects" if s.projects else ""))
        return 0
    secrets_store.remove(args.name)
    return 0
