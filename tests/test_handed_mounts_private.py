"""The mounts the host hands a root-started sandbox (device nodes, the id-mapped project) are
not peers of the host's: on a host whose /dev and / are shared mounts (systemd's default),
what is mounted on them inside a sandbox must not show on the host or in other sandboxes.
The test makes them shared in a mount namespace of its own, so the host is left as it is."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Prints the propagation tags of the sandbox's /dev/null and /workspace mounts.
SHOW = ("for line in open('/proc/self/mountinfo'):\n"
        "    f = line.split()\n"
        "    if f[4] in ('/dev/null', '/workspace'):\n"
        "        tags = [t for t in f[6:f.index('-')] if t.startswith(('shared:', 'master:'))]\n"
        "        print(f[4], ' '.join(tags) or 'private')\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="root-started sandboxes get the handed mounts")
def test_handed_mounts_are_private_even_where_the_host_shares_them(tmp_path: Path) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    project = tmp_path / "p"
    project.mkdir()
    # In a mount namespace of the test's own: / and /dev made shared (a systemd host), then
    # a sandbox run from there with no daemon (the run's own host side hands the mounts).
    script = ("set -e; mount --make-rshared /; mount --make-rshared /dev 2>/dev/null || true; "
              'exec "$@"')
    env = {**os.environ, "AGENTKERNEL_NO_DAEMON": "1", "AGENTKERNEL_HOME": str(tmp_path / "h"),
           "AGENTKERNEL_RUNTIME_DIR": str(tmp_path / "r")}
    (tmp_path / "r").mkdir(mode=0o700)
    r = subprocess.run(["unshare", "--mount", "--propagation", "unchanged", "--", "sh", "-c",
                        script, "sh", sys.executable, "-P", "-m", "agentkernel", "run", "-q",
                        "--backend", "namespaces", "--profile", "moderate", "--no-network",
                        "--", "python3", "-c", SHOW],
                       cwd=project, env=env, capture_output=True, text=True, timeout=180,
                       stdin=subprocess.DEVNULL, check=False)
    assert r.returncode == 0, r
    seen = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert seen.get("/dev/null") == "private", r
    assert seen.get("/workspace", "private") == "private", r
