"""`agents install NAME`: the agent's pinned npm package into agentkernel's data dir.

One npm prefix per agent (`<data>/agents/<id>`), built in a fresh dir beside it and swapped
in only once its binary answers with the pinned version: a failed install leaves the old
one. Package install scripts are not run (`--ignore-scripts`): the four CLIs work without
them, and nothing from the registry runs as this user before the agent itself does. Files
are left readable by everyone and writable by the owner only (umask 022), so a sandbox can
be given the dir read-only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import AgentKernelError, UsageError
from .registry import AgentSpec
from .status import agents_dir, probe_version

NPM_TIMEOUT = 900.0


class AgentInstallError(AgentKernelError):
    """npm failed, or the installed agent does not run."""


def npm_command(spec: AgentSpec, prefix: Path) -> list[str]:
    npm = shutil.which("npm")
    if npm is None:
        raise AgentInstallError("npm is not installed (Debian: apt-get install npm)")
    return [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund",
            "--ignore-scripts", "--omit=dev", "--no-package-lock", spec.npm_spec]


def install(spec: AgentSpec, *, quiet: bool = False) -> Path:
    """Install `spec`'s pinned package; returns the path of its binary."""
    base = agents_dir()
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)  # noqa: S103 - sandboxes get the agent read-only
    final = base / spec.id
    staging = base / f".{spec.id}.new-{os.urandom(4).hex()}"
    staging.mkdir(mode=0o755)
    try:
        (staging / "package.json").write_text('{"private": true}\n')
        old_umask = os.umask(0o022)
        try:
            proc = subprocess.run(npm_command(spec, staging), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL if quiet else sys.stderr,
                                  stderr=subprocess.PIPE, timeout=NPM_TIMEOUT, check=False)
        finally:
            os.umask(old_umask)
        if proc.returncode != 0:
            tail = proc.stderr.decode(errors="replace").strip()[-2000:]
            raise AgentInstallError(f"npm install {spec.npm_spec} failed "
                                    f"(exit {proc.returncode}): {tail}")
        _run_setup(spec, staging)
        binary = staging / "node_modules" / ".bin" / spec.binary
        version = probe_version(spec, str(binary))
        if version != spec.version:
            raise AgentInstallError(f"{spec.binary} from {spec.npm_spec} reports version "
                                    f"{version or 'nothing'}, not {spec.version}")
        _swap(staging, final)
    except subprocess.TimeoutExpired:
        raise AgentInstallError(f"npm install {spec.npm_spec} took over {NPM_TIMEOUT:g} s") \
            from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final / "node_modules" / ".bin" / spec.binary


def _run_setup(spec: AgentSpec, staging: Path) -> None:
    """The package's own install scripts the registry names (npm's postinstall, which
    --ignore-scripts skipped for the whole tree), run with node from the package's dir."""
    if not spec.setup:
        return
    node = shutil.which("node")
    if node is None:
        raise AgentInstallError("node is not installed (Debian: apt-get install nodejs)")
    package = staging / "node_modules" / spec.npm
    for script in spec.setup:
        proc = subprocess.run([node, script], cwd=package, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=NPM_TIMEOUT, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).decode(errors="replace").strip()[-2000:]
            raise AgentInstallError(f"{spec.npm_spec}: {script} failed "
                                    f"(exit {proc.returncode}): {tail}")


def _swap(staging: Path, final: Path) -> None:
    """Put `staging` at `final`, the previous install (if any) removed after the rename."""
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise UsageError(f"{final} exists and is not a directory: remove it first")
    old = final.with_name(f".{final.name}.old-{os.urandom(4).hex()}")
    if final.exists():
        final.rename(old)
    staging.rename(final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
