"""A wheel built from this checkout is a working install: the native agent and our launcher."""

from __future__ import annotations

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
        for binary in ("ak-agent", "ak-seccomp", "ak-enter"):
            info = zf.getinfo(f"agentkernel/_bin/{binary}")
            assert info.file_size > 0 and (info.external_attr >> 16) & 0o111, binary
        (script,) = [n for n in names if n.endswith(".data/scripts/agentkernel")]
        text = zf.read(script).decode()
    # Our launcher, not a generated entry-point wrapper (whose `import re` costs every call).
    assert text.startswith("#!python") and "import re" not in text.splitlines(), text
    assert "from agentkernel.cli import exit_with, main" in text
    assert "exit_with(main())" in text  # the fast exit (cli.exit_with)
