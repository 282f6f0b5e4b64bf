"""Red team, round 7: a sandbox never reads the HTTP API's key from the user's config.

`serve` (and a daemon's HTTP listener) takes its bearer key from `[api] api_key` of the
user's config file (`~/.config/agentkernel/config.toml`, docs/http-api.md) when one is
set there. `permissive` shows the home dir read-only at /home/user, with the host's
network: its command read the key and drove the user's API on 127.0.0.1 (every sandbox
of the user, their files and commands; agent sandboxes that use the user's stored AI
keys; egress policies). The data dir with the generated key (`api.key`) and the runtime
dir were masked as the control plane; the config dir was not. Now it is, like them (an
empty read-only dir in its place), on every backend; the rest of `~/.config` still shows.
Attacked on namespaces as root and as `nobody`, and on gVisor as root.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_helpers import backend_available, shared_top, top_run

NOBODY = 65534
KEY = "rt7-config-api-key-0123456789abcdef"

READ = r"""
for name in ("agentkernel/config.toml", "other-tool/settings.ini"):
    try:
        print(name, repr(open("/home/user/.config/" + name).read()), flush=True)
    except OSError as e:
        print(name, "unreadable", e.errno, flush=True)
"""


@pytest.fixture
def top() -> Iterator[Path]:
    with shared_top("ak-rt7-cfgkey-") as path:
        config = path / ".config"
        (config / "agentkernel").mkdir(parents=True)
        (config / "agentkernel" / "config.toml").write_text(f'[api]\napi_key = "{KEY}"\n')
        (config / "other-tool").mkdir()
        (config / "other-tool" / "settings.ini").write_text("visible\n")
        for p in (config, config / "agentkernel", config / "other-tool"):
            p.chmod(0o755)
        yield path


@pytest.mark.parametrize(("backend", "user"), [("namespaces", 0), ("namespaces", NOBODY),
                                               ("gvisor", 0)],
                         ids=["ns-root", "ns-nobody", "gvisor-root"])
def test_a_permissive_sandbox_cannot_read_the_api_key_in_the_users_config(
        top: Path, backend: str, user: int) -> None:
    if os.geteuid() != 0 or not backend_available(backend):
        pytest.skip(f"needs root and {backend}")
    if user != 0:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv")
        for p in (top, *top.iterdir(), *(top / ".config").rglob("*")):
            os.chown(p, user, user)
    r = top_run(top, user, backend, "permissive", READ)
    lines = dict(x.split(" ", 1) for x in r.stdout.splitlines() if " " in x)
    assert lines.get("other-tool/settings.ini") == "'visible\\n'", (r.stdout, r.stderr)
    assert KEY not in r.stdout, "the sandbox read the API key from the user's config"
    assert lines.get("agentkernel/config.toml", "").startswith("unreadable"), r.stdout


LATE = r"""
import os, time
open("/workspace/started", "w").close()
for _ in range(1200):
    if os.path.exists("/workspace/go"):
        break
    time.sleep(0.05)
try:
    print("late", repr(open("/home/user/.config/agentkernel/config.toml").read()), flush=True)
except OSError as e:
    print("late unreadable", e.errno, flush=True)
"""


@pytest.mark.parametrize("user", [0, NOBODY], ids=["ns-root", "ns-nobody"])
def test_a_config_written_while_a_sandbox_runs_stays_hidden(user: int) -> None:
    """The review of round 7: the mask landed only on a config dir that existed when the
    sandbox started, so a config the user set up during a long run showed through."""
    import subprocess
    import time

    from sandbox_helpers import top_argv, top_env

    if os.geteuid() != 0 or not backend_available("namespaces"):
        pytest.skip("needs root and namespaces")
    if user != 0 and shutil.which("setpriv") is None:
        pytest.skip("needs setpriv")
    with shared_top("ak-rt7-latecfg-") as top:
        (top / "project").chmod(0o777)
        if user != 0:
            for p in (top, *top.iterdir()):
                os.chown(p, user, user)
        proc = subprocess.Popen(top_argv(user, "namespaces", "permissive", LATE),
                                cwd=top / "project", env=top_env(top), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
        try:
            for _ in range(2400):  # the sandbox is up: its marker is there
                if (top / "project" / "started").exists() or proc.poll() is not None:
                    break
                time.sleep(0.05)
            config = top / ".config" / "agentkernel"
            config.mkdir(parents=True, exist_ok=True)
            (config / "config.toml").write_text(f'[api]\napi_key = "{KEY}"\n')
            for p in (top / ".config", config, config / "config.toml"):
                p.chmod(0o755 if p.is_dir() else 0o644)
            (top / "project" / "go").write_text("")
            out, err = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "late" in out, (out, err)
    assert KEY not in out, "the sandbox read a config written after it started"
