"""`agentkernel config [show]`: the effective settings here, and where each one came from;
`agentkernel init`: a commented agentkernel.toml."""

from __future__ import annotations

import json
import os
import sys

# Building the parser imports every command module: no typing or pathlib at the top.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any

    from ..config import EffectiveConfig


def add_config_parser(sub: Any) -> None:
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
    p.set_defaults(handler=main)


def add_init_parser(sub: Any) -> None:
    i = sub.add_parser("init", help="write a commented agentkernel.toml here")
    i.add_argument("-n", "--name", help="sandbox name (default: this directory's name)")
    i.add_argument("-a", "--agent", default="claude", help="preferred agent (default: claude)")
    i.add_argument("-f", "--force", action="store_true", help="overwrite an existing file")
    i.set_defaults(handler=cmd_init)


def flags_of(args: argparse.Namespace) -> dict[str, tuple[Any, str]]:
    """The `run` flags `config` accepts too, as settings (dotted key -> value, flag)."""
    return {"security.profile": (args.profile, "--profile"),
            "sandbox.backend": (args.backend, "--backend")}


def _value(value: Any) -> str:
    if value is None:
        return "(unset)"
    return json.dumps(value, ensure_ascii=False)  # TOML-like: strings quoted, true/false


def settings_of(eff: EffectiveConfig, refused: str | None) -> list[Any]:
    """`eff.settings()`, the project's backend marked where the planner refuses it
    (`refused`: what runs instead)."""
    import dataclasses

    if refused is None:
        return eff.settings()
    return [dataclasses.replace(s, note=f"refused: {refused} is used instead (auto's pick "
                                        "here; a project file may not lower isolation)")
            if s.key == "sandbox.backend" else s for s in eff.settings()]


def render_text(eff: EffectiveConfig, refused: str | None = None) -> str:
    """Files first (as comments), then `ORIGIN  key = value` lines, like git's --show-origin."""
    read = {path for _kind, path in eff.files}
    lines = [f"# user config: {eff.user_path}"
             + ("" if eff.user_path in read else " (not read: absent or ignored)")]
    for kind, path in eff.files:
        if kind != "user":
            lines.append(f"# {'project' if kind == 'project' else '--config'} file: {path}")
    rows = [(str(s.origin), f"{s.key} = {_value(s.value)}"
             + (f"  # {s.note}" if s.note else "")) for s in settings_of(eff, refused)]
    width = min(max((len(origin) for origin, _ in rows), default=0), 48)
    lines += [f"{origin:<{width}}  {text}" for origin, text in rows]
    return "\n".join(lines) + "\n"


def render_json(eff: EffectiveConfig, refused: str | None = None) -> dict[str, Any]:
    read = {path for _kind, path in eff.files}
    settings = settings_of(eff, refused)
    return {
        "user_config": {"path": str(eff.user_path), "read": eff.user_path in read},
        "files": [{"kind": kind, "path": str(path)} for kind, path in eff.files],
        "settings": {s.key: {"value": s.value, "origin": s.origin.kind,
                             "source": s.origin.source or None, "note": s.note or None}
                     for s in settings},
        # The backend runs get (where the project file's is refused: auto's pick).
        "backend_in_effect": refused or eff.config.sandbox.backend,
        "warnings": eff.warnings,
    }


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..config import effective_config

    eff = effective_config(Path.cwd(), os.environ,
                           config_path=Path(args.config) if args.config else None,
                           flags=flags_of(args))
    refused = None
    if eff.config.project_backend is not None:  # (only then: this may probe `auto`)
        from ..planner import project_backend_refusal

        refused = project_backend_refusal(eff.config, os.environ, eff.warnings)
    for warning in eff.warnings:
        print(f"agentkernel: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(render_json(eff, refused), indent=2))
    else:
        sys.stdout.write(render_text(eff, refused))
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..config import render_init
    from ..errors import UsageError
    from ..names import sanitize_sandbox_name, validate_sandbox_name

    target = Path.cwd() / "agentkernel.toml"
    if target.exists() and not args.force:
        raise UsageError("agentkernel.toml already exists in this directory (use --force)")
    name = args.name or sanitize_sandbox_name(Path.cwd().name)
    validate_sandbox_name(name)
    target.write_text(render_init(name, args.agent))
    print(f"Wrote {target}")
    return 0
