"""Wheel build hook: the native agent (`make -C agent`) goes into every wheel.

The binaries are static (musl), so the wheel is tagged for the platform only, not for a
Python version. Building needs the agent's toolchain (musl-tools, libseccomp-dev, make):
scripts/install.sh installs it on Debian and Ubuntu.
"""

from __future__ import annotations

import subprocess
import sysconfig
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface  # type: ignore[import-not-found]


class AgentBuildHook(BuildHookInterface):  # type: ignore[misc]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        agent = Path(self.root) / "agent"
        try:
            subprocess.run(["make", "-s", "-C", str(agent)], check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise RuntimeError(
                f"building the native agent failed ({exc}): it needs make, musl-tools and "
                "libseccomp-dev (scripts/install.sh installs them)") from None
        if self.target_name == "wheel" and version != "editable":
            build_data["artifacts"].append("/src/agentkernel/_bin/")  # git-ignored output
            build_data["pure_python"] = False
            platform = sysconfig.get_platform().replace("-", "_").replace(".", "_")
            build_data["tag"] = f"py3-none-{platform}"
