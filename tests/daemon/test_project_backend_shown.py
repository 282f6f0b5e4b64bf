"""A project file's `[sandbox] backend` that the planner refuses (weaker than `auto`'s pick
here, with no backend of the user's): `agentkernel config` shows it refused and what runs
instead, and `create -d PROJECT` through the daemon says the project file's warnings as a
run in-process does (they were lost on the daemon's side)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import Daemon


def _project(tmp_path: Path, backend: str) -> tuple[Path, dict[str, str]]:
    proj = tmp_path / "proj"
    proj.mkdir(exist_ok=True)
    (proj / "agentkernel.toml").write_text(f'[sandbox]\nbackend = "{backend}"\n')
    return proj, {"XDG_CONFIG_HOME": str(tmp_path / "config")}  # the user names none


def test_config_shows_a_refused_project_backend(daemon: Daemon, tmp_path: Path) -> None:
    from agentkernel.backends import backend_class, choose

    auto = choose("auto").backend.name
    proj, env = _project(tmp_path, "docker")
    r = daemon.ak("config", cwd=proj, env=env)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if " sandbox.backend = " in ln)
    assert '"docker"' in line and f"refused: {auto} is used instead" in line, line
    assert r.stderr.count('[sandbox] backend "docker" ignored') == 1, r.stderr
    doc = json.loads(daemon.ak("config", "--json", cwd=proj, env=env).stdout)
    assert doc["backend_in_effect"] == auto
    assert doc["settings"]["sandbox.backend"]["note"].startswith(f"refused: {auto}")
    # Yours (a flag here) stands, and so does a project's backend no weaker than auto's.
    r = daemon.ak("config", "-B", "docker", cwd=proj, env=env)
    assert "refused:" not in r.stdout and "ignored" not in r.stderr, (r.stdout, r.stderr)
    if backend_class("gvisor").strength >= backend_class(auto).strength:
        _project(tmp_path, "gvisor")
        doc = json.loads(daemon.ak("config", "--json", cwd=proj, env=env).stdout)
        assert doc["backend_in_effect"] == "gvisor" and doc["warnings"] == []


def test_create_through_the_daemon_says_the_project_files_warnings(
        daemon: Daemon, tmp_path: Path) -> None:
    from agentkernel.backends import choose

    daemon.ensure_up()
    auto = choose("auto").backend.name
    proj, env = _project(tmp_path, "docker")
    ran = daemon.ak("run", "-i", "host", "--", "true", cwd=proj,
                    env={**env, "AGENTKERNEL_NO_DAEMON": "1"})
    said = [ln for ln in ran.stderr.splitlines() if "[sandbox] backend" in ln]
    assert len(said) == 1, ran.stderr
    name = f"floor-{tmp_path.name[-6:].replace('_', '-').strip('-') or 'x'}"
    r = daemon.ak("create", name, "-i", "host", "-d", str(proj), cwd=proj, env=env)
    try:
        assert r.returncode == 0, r.stderr
        assert [ln for ln in r.stderr.splitlines() if "[sandbox] backend" in ln] == said
        assert f"Backend: {auto}" in r.stdout, r.stdout
    finally:
        daemon.ak("remove", name, env=env)
