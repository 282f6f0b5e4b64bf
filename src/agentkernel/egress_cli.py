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
        if not (scratch / "egress.sock").exists():
            return 0  # the sandbox is gone
        time.sleep(0.5)
