"""`agentkernel egress NAME allow|deny|show|log`: a running sandbox's policy and its log."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import UsageError


def cmd_egress(args: argparse.Namespace) -> int:
    from .egress_gate import control, format_entry, read_log, scratch_of

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


def cmd_secret(args: argparse.Namespace) -> int:
    import os

    from . import secrets_store

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
        secret = secrets_store.save(args.name, list(args.host), args.header, env, value)
        print(f"secret {secret.name}: {secret.env} in sandboxes, sent only to "
              f"{', '.join(secret.hosts)} in {secret.header}")
        return 0
    if args.action == "list":
        for name in secrets_store.names():
            s = secrets_store.load(name)
            print(f"{s.name}\t{s.env}\t{','.join(s.hosts)}\t{s.header}")
        return 0
    secrets_store.remove(args.name)
    return 0
