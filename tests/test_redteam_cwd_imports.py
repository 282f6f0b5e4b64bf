"""Outside review: a project dir's own Python files never run on the host.

The attacker is a repository: `agentkernel run` is started in it, so it is the current
directory of every host process the run starts. A Python started with `-c CODE` or
`-m MODULE` puts that directory on `sys.path`, and any module the interpreter finds nowhere
else is then loaded from it: subprocess's `import msvcrt` (a Windows module, looked for on
every import of subprocess) was enough for the one-shot run's egress gate, which starts as
host root before it drops its ids, to run the repository's `msvcrt.py` as host root at the
sandbox's first DNS query. Real sandboxes, each way a gate starts, as root and as host
`nobody`; and the native launcher's `$AGENTKERNEL_PYTHON` fallback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sandbox_helpers import ak_as_user, backend_available

# Modules the interpreter looks for and does not find on Linux (subprocess, asyncio, ssl,
# shutil ask for them), and our own package's name: each planted one leaves a mark.
PLANTED = ("msvcrt", "_winapi", "nt", "_overlapped", "winreg", "_scproxy", "uvloop")
MARK = ("import os\n"
        "open(os.path.join({dir!r}, 'ran-' + __name__ + '-' + str(os.getuid())), 'w').close()\n"
        "raise ImportError('planted')\n")


def _hostile_project(root: Path) -> tuple[Path, Path]:
    """A project with the planted modules, and the (world-writable) dir they mark in."""
    marks = root / "marks"
    marks.mkdir()
    marks.chmod(0o777)
    proj = root / "project"
    proj.mkdir()
    for name in PLANTED:
        (proj / f"{name}.py").write_text(MARK.format(dir=str(marks)))
    pkg = proj / "agentkernel"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(MARK.format(dir=str(marks)))
    (pkg / "__main__.py").write_text(MARK.format(dir=str(marks)))
    for p in (root, proj, pkg, *proj.rglob("*")):
        p.chmod(p.stat().st_mode | 0o755)
    return proj, marks


# The sandbox's first DNS query starts its gate (a one-shot run's is started then).
NET = ["sh", "-c", "getent hosts example.com >/dev/null; echo done"]


@pytest.mark.skipif(os.geteuid() != 0 or not backend_available("namespaces"),
                    reason="root starts the gates that drop their ids")
@pytest.mark.parametrize("forkserver", ["", "1", "0"],
                         ids=["on-demand", "fork-server", "with-sandbox"])
def test_a_projects_modules_do_not_run_in_the_gate(tmp_path: Path, forkserver: str) -> None:
    proj, marks = _hostile_project(tmp_path)
    env = {**os.environ, "AGENTKERNEL_NO_DAEMON": "1",
           "AGENTKERNEL_GATE_FORKSERVER": forkserver}
    # Our own CLI as installed (its script's dir on sys.path, not the project's): -P.
    r = subprocess.run([sys.executable, "-P", "-m", "agentkernel", "run", "-q",
                        "--backend", "namespaces", "--", *NET],
                       cwd=proj, env=env, capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL, check=False)
    assert "done" in r.stdout, r
    assert sorted(os.listdir(marks)) == [], "the project's code ran on the host"


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv")
                    or not backend_available("namespaces"),
                    reason="needs root (to become nobody), setpriv and bwrap")
def test_a_projects_modules_do_not_run_in_nobodys_gate() -> None:
    root = Path(tempfile.mkdtemp(prefix="ak-redteam-", dir="/tmp"))  # nobody can enter
    try:
        root.chmod(0o755)
        proj, marks = _hostile_project(root)
        home = root / "home"
        home.mkdir()
        os.chown(home, 65534, 65534)
        proc = ak_as_user(65534, home, "run", "-q", "--backend", "namespaces", "--", *NET,
                          cwd=proj, env={"AGENTKERNEL_NO_DAEMON": "1"})
        out, err = proc.communicate(timeout=150)
        assert "done" in out, (out, err)
        assert sorted(os.listdir(marks)) == [], "the project's code ran on the host"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_the_native_launchers_python_fallback_ignores_the_project(tmp_path: Path) -> None:
    """`$AGENTKERNEL_PYTHON -m agentkernel` in a project holding `agentkernel/`: ours runs."""
    from native_cli_helpers import clean_env, native_binary

    native = native_binary()
    proj, marks = _hostile_project(tmp_path)
    env = clean_env(AGENTKERNEL_PYTHON=sys.executable,
                    PYTHONPATH=str(Path(__file__).resolve().parent.parent / "src"))
    r = subprocess.run([str(native), "--version"], cwd=proj, env=env, capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 0 and "agentkernel" in r.stdout, r
    assert sorted(os.listdir(marks)) == [], "the project's package ran instead of ours"


def test_every_interpreter_we_start_ignores_the_current_dir(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The argv of each Python we start keeps the current directory off sys.path."""
    from agentkernel import egress_gate
    from agentkernel.plugins import install

    argv = egress_gate._proxy_argv(3)
    assert argv[0] == sys.executable and "-P" in argv[1:argv.index("-c")], argv
    monkeypatch.setattr(shutil, "which", lambda *_a, **_k: None)
    monkeypatch.setattr(sys, "argv", ["python"])
    monkeypatch.delenv("AGENTKERNEL_EXE", raising=False)
    assert install.our_argv()[:2] == [sys.executable, "-P"]
