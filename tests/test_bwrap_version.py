"""bubblewrap older than 0.8.0 knows no --bind-fd / --ro-bind-fd, which binds pinned by
their descriptor need (an ordinary user's agent runs: the project's .git and the agent's
install). Doctor's probe says so, and such a run is refused with that reason (nothing runs:
bwrap fails before the sandbox exists). Debian ships 0.8.0 only, so the older one here is
bwrap itself behind a shim that answers as 0.7.0 does: its version, and "Unknown option"
for the two options (bwrap's own message); everything else goes to the real bwrap."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_helpers import SYSTEM_PYTHON, public_pythonpath

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bwrap")

SHIM = """#!/bin/sh
for a in "$@"; do
  case "$a" in
    --version) echo "bubblewrap 0.7.0"; exit 0 ;;
    --bind-fd|--ro-bind-fd) echo "bwrap: Unknown option $a" >&2; exit 1 ;;
  esac
done
exec {bwrap} "$@"
"""

AS_USER = """
import io, sys
from pathlib import Path
from agentkernel import planner
from agentkernel.engine import execute
from agentkernel.errors import AgentKernelError
src = sys.argv[1]
plan = planner.plan(planner.RunRequest(argv=["cat", "/pinned/f"], cwd=Path.cwd(),
    image="host", backend="namespaces", profile="restrictive", workdir="/tmp",
    ro_binds=((src, "/pinned"),)), planner.CallerContext.here(), quiet=True)
try:
    out = io.BytesIO()
    sandbox, result = execute(plan, timeout=60, stdout=out, stderr=io.BytesIO())
    sandbox.destroy()
    print("ran", result.exit_code, out.getvalue().decode().strip())
except AgentKernelError as exc:
    print("refused:", type(exc).__name__, exc)
"""


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="ak-oldbwrap-", dir="/tmp"))
    top.chmod(0o755)
    try:
        (top / "bin").mkdir(mode=0o755)
        shim = top / "bin" / "bwrap"
        shim.write_text(SHIM.format(bwrap=shutil.which("bwrap")))
        shim.chmod(0o755)
        (top / "src").mkdir(mode=0o755)
        (top / "src" / "f").write_text("pinned\n")
        (top / "src" / "f").chmod(0o644)
        for d in ("proj", "data", "run"):
            (top / d).mkdir(mode=0o700)
            if os.geteuid() == 0:
                os.chown(top / d, 65534, 65534)
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_version_parsed() -> None:
    from agentkernel.backends.namespaces import BWRAP_MIN, bwrap_version

    version = bwrap_version(str(shutil.which("bwrap")))
    assert version is not None and version >= BWRAP_MIN  # (what this project needs here)


def test_doctor_names_an_old_bwrap(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agentkernel.backends import namespaces

    found = namespaces.NamespacesBackend().probe(deep=True)
    assert found.ok and "older than" not in found.detail, found.detail
    monkeypatch.setattr(namespaces, "_bwrap", lambda: str(base / "bin" / "bwrap"))
    found = namespaces.NamespacesBackend().probe(deep=True)
    assert found.ok, found.detail  # (runs that bind by path still work)
    assert "bubblewrap 0.7.0" in found.detail and "older than 0.8.0" in found.detail
    assert "install bubblewrap 0.8.0 or newer" in found.detail


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root (to become nobody) and setpriv")
@pytest.mark.parametrize("old", [True, False])
def test_an_ordinary_users_pinned_bind_needs_a_new_bwrap(base: Path, old: bool) -> None:
    """As nobody: a run with a bind pinned by its descriptor is refused, said why, under
    the old bwrap; runs under the real one."""
    path = f"{base / 'bin'}:/usr/bin:/bin" if old else "/usr/bin:/bin"
    env = {"PATH": path, "HOME": str(base / "data"), "PYTHONPATH": public_pythonpath(),
           "AGENTKERNEL_HOME": str(base / "data"), "AGENTKERNEL_RUNTIME_DIR": str(base / "run"),
           "AGENTKERNEL_NO_DAEMON": "1"}
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
                        SYSTEM_PYTHON, "-c", AS_USER, str(base / "src")], env=env,
                       cwd=base / "proj", capture_output=True, text=True, timeout=120,
                       check=False)
    if old:
        assert r.stdout.startswith("refused: BackendUnavailable"), (r.stdout, r.stderr)
        assert "bubblewrap 0.7.0" in r.stdout and "older than 0.8.0" in r.stdout, r.stdout
        assert "Unknown option --ro-bind-fd" in r.stdout, r.stdout
    else:
        assert r.stdout.strip() == "ran 0 pinned", (r.stdout, r.stderr)
