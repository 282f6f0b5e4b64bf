"""`plugin install|uninstall`: our MCP server (and Claude Code plugin) into each agent.

With the agent's CLI on PATH its own commands write the entry (`claude plugin marketplace
add` + `claude plugin install`, `codex mcp add`, `gemini mcp add`); otherwise the config
file is merged (formats.py). Either way: an existing entry that runs something else is
refused unless `force`, `dry_run` only shows the change as a diff, and the entry runs our
executable by its absolute path (an agent launched from an IDE often has another PATH).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..agents.registry import AgentSpec
from ..errors import AgentKernelError, Conflict
from ..paths import data_dir
from . import formats
from .formats import SERVER, ConfigFileError

CLI_TIMEOUT = 120.0
PLUGIN_TEMPLATE = Path(__file__).with_name("claude")
SKILL_DIR = "agentkernel-sandbox"  # the skill written where Claude Code has no CLI


class AgentCliError(AgentKernelError):
    """The agent's own CLI failed to change its config."""

    exit_code = 1


@dataclass
class Report:
    """What one install or uninstall did (or, dry, would do)."""

    target: str
    scope: str
    changed: bool = False
    lines: list[str] = field(default_factory=list)
    diff: str = ""


def our_argv() -> list[str]:
    """How an agent starts our MCP server: this executable, by absolute path."""
    exe = os.environ.get("AGENTKERNEL_EXE")  # an explicit choice (packagers, tests)
    if exe:
        return [os.path.abspath(exe), "mcp-server"]
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "agentkernel" and os.path.isfile(argv0):
        return [os.path.abspath(argv0), "mcp-server"]
    found = shutil.which("agentkernel")
    if found:
        return [os.path.abspath(found), "mcp-server"]
    # -P: an agent starts it in its project, which `-m` would put first on sys.path
    return [sys.executable, "-P", "-m", "agentkernel", "mcp-server"]


def _diff(path: Path, old: str | None, new: str) -> str:
    return "".join(difflib.unified_diff(
        (old or "").splitlines(keepends=True), new.splitlines(keepends=True),
        fromfile=f"{path}" if old is not None else "/dev/null", tofile=f"{path}"))


def _run_cli(spec: AgentSpec, args: list[str], cwd: Path) -> str:
    binary = shutil.which(spec.binary)
    if binary is None:
        raise AgentCliError(f"{spec.binary} is not on PATH")
    env = {**os.environ, **dict(spec.cli_env), "NO_COLOR": "1", "DISABLE_AUTOUPDATER": "1",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
    try:
        proc = subprocess.run([binary, *args], cwd=cwd, env=env, capture_output=True,
                              stdin=subprocess.DEVNULL, timeout=CLI_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AgentCliError(f"{spec.binary} {' '.join(args)}: {exc}") from None
    out = (proc.stdout + proc.stderr).decode(errors="replace").strip()
    if proc.returncode != 0:
        raise AgentCliError(f"{spec.binary} {' '.join(args)} failed (exit {proc.returncode})"
                            f": {out[-2000:]}")
    return out


def _fill(args: tuple[str, ...], argv: list[str], scope: str) -> list[str]:
    """The registry's CLI template: `{exe}` is our argv but its final `mcp-server` (which
    the template spells out), `{scope}` the scope."""
    out: list[str] = []
    for a in args:
        if a == "{exe}":
            out.extend(argv[:-1])
        else:
            out.append(a.replace("{scope}", scope))
    return out


def _uses_cli(spec: AgentSpec, scope: str) -> bool:
    return bool(spec.cli_add) and scope in spec.cli_scopes and shutil.which(spec.binary) \
        is not None


# ---------------------------------------------------------------- config-file agents


def install(spec: AgentSpec, scope: str, project: Path, *, force: bool = False,
            dry_run: bool = False, argv: list[str] | None = None) -> Report:
    argv = argv or our_argv()
    if spec.mcp_format == "claude-plugin" and shutil.which(spec.binary):
        return _install_claude_plugin(spec, scope, project, force=force, dry_run=dry_run,
                                      argv=argv)
    report = _install_entry(spec, scope, project, force=force, dry_run=dry_run, argv=argv)
    if spec.mcp_format == "claude-plugin":
        _claude_skill(scope, project, report, dry_run=dry_run)
    return report


def _install_entry(spec: AgentSpec, scope: str, project: Path, *, force: bool,
                   dry_run: bool, argv: list[str]) -> Report:
    report = Report(spec.id, scope)
    path = formats.config_path(spec, scope, project)
    text = formats.read_text(path)
    found = formats.servers_table(spec, formats.parse(spec, path, text)).get(SERVER)
    wanted = formats.entry(spec, argv)
    if found is not None and formats.same_entry(spec, found, wanted):
        report.lines.append(f"= {path} (already has the {SERVER} MCP server)")
        return report
    if found is not None and not force:
        raise Conflict(f"{path} already has an MCP server `{SERVER}` that runs something "
                       f"else ({json.dumps(found)[:300]}); --force replaces it")
    new_text = formats.with_entry(spec, path, text, wanted)
    report.diff = _diff(path, text, new_text)
    report.changed = True
    cli = _uses_cli(spec, scope)
    if cli:
        cmds = ([_fill(spec.cli_remove, argv, scope)] if found is not None else []) \
            + [_fill(spec.cli_add, argv, scope)]
        report.lines += [f"$ {spec.binary} {' '.join(c)}" for c in cmds]
    else:
        report.lines.append(f"{'~' if text is not None else '+'} {path}")
    if dry_run:
        return report
    if cli:
        for c in cmds:
            _run_cli(spec, c, project)
        if not formats.same_entry(spec, formats.current(spec, path), wanted):
            raise AgentCliError(f"`{spec.binary} {' '.join(cmds[-1])}` ran, but {path} does "
                                f"not show the {SERVER} entry afterwards")
    else:
        formats.write_atomic(path, new_text)
    return report


def uninstall(spec: AgentSpec, scope: str, project: Path, *, dry_run: bool = False) -> Report:
    report = Report(spec.id, scope)
    if spec.mcp_format == "claude-plugin" and shutil.which(spec.binary):
        _uninstall_claude_plugin(spec, scope, project, report, dry_run=dry_run)
    path = formats.config_path(spec, scope, project)
    text = formats.read_text(path)
    if formats.servers_table(spec, formats.parse(spec, path, text)).get(SERVER) is not None:
        new_text = formats.with_entry(spec, path, text, None)
        report.diff += _diff(path, text, new_text)
        report.changed = True
        cli = _uses_cli(spec, scope)
        report.lines.append(f"$ {spec.binary} {' '.join(_fill(spec.cli_remove, [], scope))}"
                            if cli else f"~ {path}")
        if not dry_run:
            if cli:
                _run_cli(spec, _fill(spec.cli_remove, [], scope), project)
            if formats.current(spec, path) is not None:  # the CLI left it: take it out
                formats.write_atomic(path, new_text)
    if spec.mcp_format == "claude-plugin":
        skill = _skill_path(scope, project)
        if skill.exists():
            report.changed = True
            report.lines.append(f"- {skill}")
            if not dry_run:
                skill.unlink()
                with contextlib.suppress(OSError):
                    skill.parent.rmdir()
    if not report.lines:
        report.lines.append(f"= nothing of {SERVER} in {spec.name}'s {scope} config")
    return report


# ---------------------------------------------------------------- Claude Code


def marketplace_dir() -> Path:
    return data_dir() / "claude-marketplace"


def render_marketplace(argv: list[str], dest: Path | None = None) -> Path:
    """The plugin as a one-plugin marketplace whose `.mcp.json` runs our absolute path.

    Rendered anew in a fresh dir and swapped in, so Claude Code never reads a half-written
    one; the repository's own marketplace (.claude-plugin/) runs `agentkernel` from PATH.
    """
    dest = dest or marketplace_dir()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.new-{os.urandom(4).hex()}")
    plugin = tmp / "plugins" / "agentkernel"
    shutil.copytree(PLUGIN_TEMPLATE, plugin, ignore=shutil.ignore_patterns("__pycache__"))
    mcp = {"mcpServers": {SERVER: {"command": argv[0], "args": argv[1:]}}}
    (plugin / ".mcp.json").write_text(json.dumps(mcp, indent=2) + "\n")
    (tmp / ".claude-plugin").mkdir()
    market = {"name": "agentkernel", "owner": {"name": "agentkernel"},
              "plugins": [{"name": "agentkernel", "source": "./plugins/agentkernel",
                           "description": "Sandbox tools (MCP), a sandbox skill and "
                                          "/agentkernel:run.", "category": "security"}]}
    (tmp / ".claude-plugin" / "marketplace.json").write_text(json.dumps(market, indent=2)
                                                             + "\n")
    old = dest.with_name(f".{dest.name}.old-{os.urandom(4).hex()}")
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def _known_marketplace() -> str | None:
    """Where Claude Code's `agentkernel` marketplace comes from, if it knows one."""
    path = formats.home() / ".claude" / "plugins" / "known_marketplaces.json"
    try:
        text = formats.read_text(path)
        data = json.loads(text) if text else {}
    except (ConfigFileError, json.JSONDecodeError):
        return None
    source = (data.get("agentkernel") or {}).get("source") if isinstance(data, dict) else None
    if not isinstance(source, dict):
        return None
    return str(source.get("path") or source.get("repo") or source.get("url") or "")


def _rendered_mcp(dest: Path) -> object:
    try:
        return json.loads((dest / "plugins" / "agentkernel" / ".mcp.json").read_text())
    except (OSError, ValueError):
        return None


def _install_claude_plugin(spec: AgentSpec, scope: str, project: Path, *, force: bool,
                           dry_run: bool, argv: list[str]) -> Report:
    report = Report(spec.id, scope)
    dest = marketplace_dir()
    known = _known_marketplace()
    if known is not None and known != str(dest) and not force:
        raise Conflict(f"Claude Code already has a marketplace `agentkernel` from {known}; "
                       "--force replaces it with agentkernel's own")
    wanted_mcp = {"mcpServers": {SERVER: {"command": argv[0], "args": argv[1:]}}}
    enabled = scope in formats.plugin_scopes(spec, project)
    if enabled and known == str(dest) and _rendered_mcp(dest) == wanted_mcp:
        report.lines.append(f"= Claude Code plugin {formats.PLUGIN_ID} ({scope}) is installed")
        return report
    cmds: list[list[str]] = []
    if known is not None and known != str(dest):
        cmds.append(["plugin", "marketplace", "remove", "agentkernel"])
    if enabled:
        cmds.append(["plugin", "uninstall", formats.PLUGIN_ID, "--scope", scope])
    if known != str(dest):
        cmds.append(["plugin", "marketplace", "add", str(dest), "--scope", scope])
    else:
        cmds.append(["plugin", "marketplace", "update", "agentkernel"])
    cmds.append(["plugin", "install", formats.PLUGIN_ID, "--scope", scope])
    report.changed = True
    report.lines.append(f"+ {dest} (the plugin, as a marketplace; MCP server: "
                        f"{' '.join(argv)})")
    report.lines += [f"$ claude {' '.join(c)}" for c in cmds]
    if dry_run:
        return report
    render_marketplace(argv, dest)
    for c in cmds:
        _run_cli(spec, c, project)
    return report


def _uninstall_claude_plugin(spec: AgentSpec, scope: str, project: Path, report: Report, *,
                             dry_run: bool) -> None:
    cmds: list[list[str]] = []
    if scope in formats.plugin_scopes(spec, project):
        cmds.append(["plugin", "uninstall", formats.PLUGIN_ID, "--scope", scope])
    others = [s for s in formats.plugin_scopes(spec, project) if s != scope]
    if _known_marketplace() == str(marketplace_dir()) and not others:
        cmds.append(["plugin", "marketplace", "remove", "agentkernel"])
    if not cmds:
        return
    report.changed = True
    report.lines += [f"$ claude {' '.join(c)}" for c in cmds]
    if not dry_run:
        for c in cmds:
            _run_cli(spec, c, project)


def _skill_path(scope: str, project: Path) -> Path:
    relative = f".claude/skills/{SKILL_DIR}/SKILL.md"
    if scope == "user":
        return formats.home() / relative
    return formats.in_project(project, relative)


def _claude_skill(scope: str, project: Path, report: Report, *, dry_run: bool) -> None:
    """Without the `claude` CLI: the sandbox skill beside the merged MCP entry."""
    path = _skill_path(scope, project)
    text = (PLUGIN_TEMPLATE / "skills" / "sandbox" / "SKILL.md").read_text()
    text = text.replace("name: sandbox\n", f"name: {SKILL_DIR}\n", 1)
    old = formats.read_text(path)
    if old == text:
        return
    report.changed = True
    report.diff += _diff(path, old, text)
    report.lines.append(f"{'~' if old is not None else '+'} {path}")
    report.lines.append("  Claude Code asks to approve a project's .mcp.json servers the "
                        "first time (or set enableAllProjectMcpServers)")
    if not dry_run:
        formats.write_atomic(path, text)
