"""Outside review: root-only files of the host's userland outside /etc.

A root-started sandbox's root filesystem was the host's userland as an id-mapped mount:
what host root owns showed as the sandbox root's, so its mode alone did not keep the
sandbox out, and only /etc was walked for private entries to hide. Now the userland is
bound without id-mapping (rootfs.HostRootfs.host_owned): no host id is one of the
sandbox's, so the kernel gives its root only what the host gives everyone, anywhere in the
tree. Checked as root and as an ordinary user (whose sandbox never id-mapped it), with a
world-readable file beside the private ones (still read) and the writable parts (/tmp, the
project) still written.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_helpers import backend_available, shared_top, top_argv, top_env

NOBODY = 65534

PROBE = """
import sys
base = sys.argv[1]
for name in ("key", "group-key", "private/key", "public"):
    try:
        with open(f"{base}/{name}") as f:
            print(name, "read", f.read())
    except OSError as exc:
        print(name, "refused", exc.strerror)
for path in ("/tmp/ak-probe", "/workspace/ak-probe"):
    with open(path, "w") as f:
        f.write("x")
print("written")
"""


@pytest.fixture
def top() -> Iterator[Path]:
    with shared_top("ak-rt-userland-") as path:
        yield path


@pytest.fixture
def planted() -> Iterator[tuple[Path, str]]:
    """A dir of /usr/local/share with a root-only file (0600), a file only root's group
    may read (0640: a sandbox's commands run as gid 0), a 0700 dir with a 0644 file in it,
    and a world-readable file; the secret they hold."""
    base = Path("/usr/local/share") / f"ak-redteam-{secrets.token_hex(4)}"
    secret = f"USR-SECRET-{secrets.token_hex(4)}"
    try:
        base.mkdir(mode=0o755)
        for name, mode in (("key", 0o600), ("group-key", 0o640), ("public", 0o644)):
            (base / name).write_text(secret if name != "public" else "public-ok")
            (base / name).chmod(mode)
        (base / "private").mkdir(mode=0o700)
        (base / "private" / "key").write_text(secret)
        (base / "private" / "key").chmod(0o644)  # (the dir alone keeps it)
        yield base, secret
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="plants root-only files in /usr/local")
@pytest.mark.parametrize("user", [0, NOBODY], ids=["root", "nobody"])
@pytest.mark.parametrize("backend_name", ["namespaces", "gvisor"])
def test_root_only_files_in_usr_local_are_hidden(
    backend_name: str, user: int, top: Path, planted: tuple[Path, str]
) -> None:
    if not backend_available(backend_name):
        pytest.skip(f"{backend_name} not installed")
    if user != 0:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv")
        for p in (top, *top.iterdir()):
            os.chown(p, user, user)
    base, secret = planted
    argv = top_argv(user, backend_name, "moderate", PROBE, str(base))
    at = argv.index("--", argv.index("run"))
    argv[at:at] = ["--image", "host"]  # (the host's userland, also where a pull would work)
    r = subprocess.run(argv, cwd=top / "project", env=top_env(top), capture_output=True,
                       text=True, timeout=240, stdin=subprocess.DEVNULL, check=False)
    assert "written" in r.stdout, r
    assert secret not in r.stdout, r.stdout
    lines = set(r.stdout.splitlines())
    assert "public read public-ok" in lines, r.stdout
    for name in ("key", "group-key", "private/key"):
        assert f"{name} refused Permission denied" in lines, r.stdout
