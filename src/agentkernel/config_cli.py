"""`agentkernel config [show]`: the effective settings here, and where each one came from."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse

    from .config import EffectiveConfig


def flags_of(args: argparse.Namespace) -> dict[str, tuple[Any, str]]:
    """The `run` flags `config` accepts too, as settings (dotted key -> value, flag)."""
    return {"security.profile": (args.profile, "--profile"),
            "sandbox.backend": (args.backend, "--backend")}


def _value(value: Any) -> str:
    if value is None:
        return "(unset)"
    return json.dumps(value, ensure_ascii=False)  # TOML-like: strings quoted, true/false


def render_text(eff: EffectiveConfig) -> str:
    """Files first (as comments), then `ORIGIN  key = value` lines, like git's --show-origin."""
    read = {path for _kind, path in eff.files}
    lines = [f"# user config: {eff.user_path}"
             + ("" if eff.user_path in read else " (not read: absent or ignored)")]
    for kind, path in eff.files:
        if kind != "user":
            lines.append(f"# {'project' if kind == 'project' else '--config'} file: {path}")
    rows = [(str(s.origin), f"{s.key} = {_value(s.value)}"
             + (f"  # {s.note}" if s.note else "")) for s in eff.settings()]
    width = min(max((len(origin) for origin, _ in rows), default=0), 48)
    lines += [f"{origin:<{width}}  {text}" for origin, text in rows]
    return "\n".join(lines) + "\n"


def render_json(eff: EffectiveConfig) -> dict[str, Any]:
    read = {path for _kind, path in eff.files}
    return {
        "user_config": {"path": str(eff.user_path), "read": eff.user_path in read},
        "files": [{"kind": kind, "path": str(path)} for kind, path in eff.files],
        "settings": {s.key: {"value": s.value, "origin": s.origin.kind,
                             "source": s.origin.source or None, "note": s.note or None}
                     for s in eff.settings()},
        "warnings": eff.warnings,
    }


def main(args: argparse.Namespace) -> int:
    from .config import effective_config

    eff = effective_config(Path.cwd(), os.environ,
                           config_path=Path(args.config) if args.config else None,
                           flags=flags_of(args))
    for warning in eff.warnings:
        print(f"agentkernel: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(render_json(eff), indent=2))
    else:
        sys.stdout.write(render_text(eff))
    return 0
