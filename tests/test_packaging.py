"""A wheel built from this checkout is a working install: the native agent and our launcher;
scripts/install.sh puts the native `agentkernel` command in front of that launcher."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_carries_the_agent_and_the_launcher(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("agentkernel-*.whl")
    platform = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    assert wheel.name.endswith(f"-py3-none-{platform}.whl"), wheel.name  # static binaries
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for binary in ("ak-agent", "ak-seccomp", "ak-enter", "ak-logcap"):
            info = zf.getinfo(f"agentkernel/_bin/{binary}")
            assert info.file_size > 0 and (info.external_attr >> 16) & 0o111, binary
        (script,) = [n for n in names if n.endswith(".data/scripts/agentkernel")]
        text = zf.read(script).decode()
    # Our launcher, not a generated entry-point wrapper (whose `import re` costs every call).
    assert text.startswith("#!python") and "import re" not in text.splitlines(), text
    assert "from agentkernel.cli import exit_with, main" in text
    assert "exit_with(main())" in text  # the fast exit (cli.exit_with)


def test_install_puts_the_native_command_in_front_of_the_python_launcher() -> None:
    """scripts/install.sh: `agentkernel` is the native client (launcher/), `agentkernel-py`
    beside it the Python launcher it execs for everything it does not handle itself."""
    venv = ROOT / ".venv" / "bin"
    if not (venv / "agentkernel-py").exists():
        import pytest

        pytest.skip("installed before the native command existed")
    launcher = (venv / "agentkernel-py").read_text()
    assert launcher.startswith(f"#!{venv / 'python'}\n") and "exit_with(main())" in launcher
    native = (venv / "agentkernel").read_bytes()
    assert native[:4] == b"\x7fELF" or native == launcher.encode()  # (no compiler: Python)
    env = {k: v for k, v in os.environ.items() if k != "AGENTKERNEL_PYTHON"}
    r = subprocess.run([str(venv / "agentkernel"), "--version"], capture_output=True,
                       text=True, check=False, env=env, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("agentkernel "), r
