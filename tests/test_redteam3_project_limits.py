"""Outside review: a cloned repository's agentkernel.toml may not lift a resource cap.

docs/config.md: a project file may set `[resources] memory/pids/disk` to a number but not
lift the cap ("unlimited"). The guard compared the raw TOML value with the exact strings
"unlimited"/"max", while the parser lowercases and strips: `pids = "MAX"` or
`memory = "Unlimited"` lifted the cap. And a size under 1 MiB (`memory = "1k"`) truncated
to 0, which is how the caps spell unlimited, for flags and files alike.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from agentkernel.config import effective_config
from agentkernel.errors import ConfigError, UsageError
from agentkernel.profiles import UNLIMITED, parse_memory, parse_memory_limit
from sandbox_helpers import ak, ak_as_user, backend_available, nobody_home

LIFTS = ['memory = "Unlimited"', 'memory = " max "', 'pids = "MAX"', 'pids = "Unlimited"',
         'disk = "UNLIMITED"']


def _project(tmp_path: Path, body: str) -> tuple[Path, dict[str, str]]:
    project = tmp_path / "repo"
    project.mkdir(exist_ok=True)
    (project / "agentkernel.toml").write_text(f"[resources]\n{body}\n")
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return project, {"HOME": str(home)}


@pytest.mark.parametrize("line", LIFTS)
def test_a_project_cannot_lift_a_cap_by_spelling_unlimited_differently(
        tmp_path: Path, line: str) -> None:
    project, env = _project(tmp_path, line)
    eff = effective_config(project, env)
    res = eff.config.resources
    assert UNLIMITED not in (res.memory, res.pids, res.disk), line
    assert any("lifts a limit" in w for w in eff.warnings), eff.warnings


@pytest.mark.parametrize("size", ["1k", "0.5k", "1023k", "inf", "-inf", "nan"])
def test_a_size_below_one_mib_is_refused_not_unlimited(tmp_path: Path, size: str) -> None:
    with pytest.raises(UsageError):
        parse_memory(size)
    with pytest.raises(UsageError):
        parse_memory_limit(size)
    project, env = _project(tmp_path, f'memory = "{size}"')
    with pytest.raises(ConfigError):
        effective_config(project, env)
    assert parse_memory("1024k") == 1


def _max_processes(text: str) -> str:
    m = re.search(r"^Max processes\s+(\S+)", text, re.M)
    assert m, text
    return m.group(1)


SHOW = ["run", "-B", "namespaces", "-i", "host", "--", "cat", "/proc/self/limits"]


@pytest.fixture
def namespaces() -> None:
    if not backend_available("namespaces"):
        pytest.skip("bwrap is not installed")


@pytest.mark.usefixtures("namespaces")
def test_a_project_pids_max_keeps_the_cap_in_a_real_sandbox(tmp_path: Path) -> None:
    env = {"AGENTKERNEL_NO_DAEMON": "1", "HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    plain = tmp_path / "plain"
    plain.mkdir()
    base = ak(*SHOW, cwd=plain, env=env)
    assert base.returncode == 0, base.stderr
    project, _ = _project(tmp_path, 'pids = "MAX"')
    attacked = ak(*SHOW, cwd=project, env=env)
    assert attacked.returncode == 0, attacked.stderr
    assert _max_processes(attacked.stdout) == _max_processes(base.stdout) != "unlimited"
    assert "lifts a limit" in attacked.stderr


@pytest.mark.usefixtures("namespaces")
def test_a_project_pids_max_keeps_the_cap_as_nobody(tmp_path: Path) -> None:
    toml = tmp_path / "agentkernel.toml"
    toml.write_text('[resources]\npids = "MAX"\n')
    with nobody_home({"agentkernel.toml": toml}) as home:
        plain = home / "plain"
        plain.mkdir()
        os.chown(plain, 65534, 65534)
        outs = []
        for cwd in (plain, home / "project"):
            proc = ak_as_user(65534, home, *SHOW, cwd=cwd)
            out, err = proc.communicate(timeout=150)
            assert proc.returncode == 0, err
            outs.append(_max_processes(out))
        assert outs[1] == outs[0], outs
        shutil.rmtree(plain)
