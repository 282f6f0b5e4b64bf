"""The `agents` and `plugin` commands: tables, installs, and what they print."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..agents import registry
from ..errors import UsageError


def main(args: Any) -> int:
    if args.cmd == "agents":
        if getattr(args, "agents_cmd", None) == "install":
            return cmd_agents_install(args.names)
        return cmd_agents(as_json=bool(args.json))
    if args.plugin_cmd == "list":
        return cmd_plugin_list(as_json=bool(args.json))
    return cmd_plugin(args.plugin_cmd, args.target, args.scope, dry_run=args.dry_run,
                      force=bool(getattr(args, "force", False)))


def _targets(target: str) -> list[registry.AgentSpec]:
    if target == "all":
        return list(registry.agents())
    return [registry.get(target)]


def cmd_agents(*, as_json: bool) -> int:
    from ..agents.status import all_status

    rows = all_status(Path.cwd())
    if as_json:
        print(json.dumps([r.as_json() for r in rows], indent=2))
        return 0
    print(f"{'AGENT':<10} {'INSTALLED':<28} {'AUTH':<34} {'MCP':<14} PLUGIN")
    for r in rows:
        if r.path is None:
            installed = "no"
        else:
            installed = f"{r.version or '?'}" + (" (agentkernel)" if r.origin == "agentkernel"
                                                  else "")
        print(f"{r.id:<10} {installed:<28} {r.auth:<34} {r.mcp:<14} {r.plugin}")
    missing = [r.id for r in rows if r.path is None]
    if missing:
        print(f"\nInstall with: agentkernel agents install {' '.join(missing)}")
    return 0


def cmd_agents_install(names: list[str]) -> int:
    from ..agents.install import install

    specs = list(registry.agents()) if names == ["all"] else [registry.get(n) for n in names]
    for spec in specs:
        print(f"Installing {spec.name} ({spec.npm_spec})...", file=sys.stderr)
        path = install(spec)
        print(f"{spec.id}: {spec.version} at {path}")
    return 0


def cmd_plugin(op: str, target: str, scope: str, *, dry_run: bool, force: bool) -> int:
    from .install import install, uninstall

    project = Path.cwd()
    specs = _targets(target)
    failed = 0
    for spec in specs:
        try:
            if op == "install":
                report = install(spec, scope, project, force=force, dry_run=dry_run)
            else:
                report = uninstall(spec, scope, project, dry_run=dry_run)
        except UsageError:
            raise
        except Exception as exc:  # one agent's failure must not hide the others' results
            from ..errors import AgentKernelError

            if not isinstance(exc, AgentKernelError) or len(specs) == 1:
                raise
            print(f"{spec.id}: error: {exc.message}", file=sys.stderr)
            failed += 1
            continue
        verb = {"install": "installed", "uninstall": "removed"}[op]
        state = (f"would be {verb}" if dry_run else verb) if report.changed else "unchanged"
        print(f"{spec.name} ({scope}): {state}")
        for line in report.lines:
            print(f"  {line}")
        if dry_run and report.diff:
            sys.stdout.write(report.diff if report.diff.endswith("\n") else report.diff + "\n")
    return 1 if failed else 0


def cmd_plugin_list(*, as_json: bool) -> int:
    from .formats import config_path, configured_scopes, plugin_scopes

    project = Path.cwd()
    rows: list[dict[str, Any]] = []
    for spec in registry.agents():
        rows.append({
            "target": spec.id, "name": spec.name,
            "mcp": configured_scopes(spec, project),
            "plugin": plugin_scopes(spec, project) if spec.mcp_format == "claude-plugin"
            else None,
            "user_config": str(config_path(spec, "user", project)),
            "project_config": str(config_path(spec, "project", project)),
        })
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'TARGET':<10} {'MCP SERVER':<16} {'PLUGIN':<14} CONFIG (user; project)")
    for r in rows:
        mcp = ",".join(r["mcp"]) or "no"
        plugin = "-" if r["plugin"] is None else (",".join(r["plugin"]) or "no")
        print(f"{r['target']:<10} {mcp:<16} {plugin:<14} {r['user_config']}; "
              f"{r['project_config']}")
    return 0
