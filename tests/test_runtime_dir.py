"""Where the runtime dir goes, and another local user planting it (issue 9, S2 and R4).

Root's runtime dir is /run/agentkernel (only root writes /run). A user without
$XDG_RUNTIME_DIR uses /tmp/agentkernel-UID, which any local user can create first: as a
dir of their own, or as a symlink to one. Then every command must still work, in a
private dir of ours (recorded, one warning), never following or using the planted name.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_helpers import SYSTEM_PYTHON, public_pythonpath

NOBODY = 65534
PLANTED = Path(f"/tmp/agentkernel-{NOBODY}")


def _clean_env(**extra: str) -> dict[str, str]:
    keep = {k: os.environ[k] for k in ("PATH", "LANG") if k in os.environ}
    return {**keep, **extra}


def test_root_runtime_dir_is_under_run() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    out = subprocess.run([sys.executable, "-c",
                          "from agentkernel.paths import runtime_dir_str as r; print(r())"],
                         env=_clean_env(HOME="/root"), capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "/run/agentkernel"


def test_runtime_dir_refuses_a_symlink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An explicit runtime dir that is a symlink (to a private dir, even) is refused."""
    from agentkernel.errors import SandboxError
    from agentkernel.paths import runtime_dir

    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    monkeypatch.setenv("AGENTKERNEL_RUNTIME_DIR", str(tmp_path / "link"))
    with pytest.raises(SandboxError, match="not a private directory"):
        runtime_dir()


@pytest.fixture
def as_nobody() -> Iterator[tuple[Path, Path]]:
    """A home for nobody, a dir an attacker controls, and /tmp/agentkernel-65534 free to
    plant (whatever was there is put back afterwards)."""
    if os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("bwrap"):
        pytest.skip("needs root (to become nobody), setpriv and bwrap")
    tmp_path = Path(tempfile.mkdtemp(prefix="ak-rtdir-", dir="/tmp"))  # nobody can enter
    tmp_path.chmod(0o755)
    home = tmp_path / "nobody-home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    attacker = tmp_path / "attacker"
    attacker.mkdir(mode=0o777)
    attacker.chmod(0o777)
    saved = tmp_path / "saved"
    if os.path.lexists(PLANTED):
        os.rename(PLANTED, saved)
    try:
        yield home, attacker
    finally:
        if os.path.lexists(PLANTED):
            if PLANTED.is_symlink() or not PLANTED.is_dir():
                PLANTED.unlink()
            else:
                shutil.rmtree(PLANTED)
        if os.path.lexists(saved):
            os.rename(saved, PLANTED)
        record = home / ".local/share/agentkernel/runtime-dir"
        if record.is_file():  # the fallback dir the test made nobody create
            fallback = record.read_text().strip()
            if fallback.startswith(f"/tmp/agentkernel-{NOBODY}-"):
                shutil.rmtree(fallback, ignore_errors=True)
        shutil.rmtree(tmp_path, ignore_errors=True)


def _nobody(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    setpriv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
    env = _clean_env(HOME=str(home), AGENTKERNEL_DAEMON_AUTOSTART="0")
    env["PYTHONPATH"] = public_pythonpath()  # nobody cannot read the suite's own
    python = SYSTEM_PYTHON
    argv = [python, *args] if args[0] == "-c" else [python, "-m", "agentkernel", *args]
    return subprocess.run([*setpriv, *argv], env=env, cwd=home, capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.mark.parametrize("kind", ["dir", "symlink"])
def test_planted_tmp_runtime_dir(as_nobody: tuple[Path, Path], kind: str) -> None:
    home, attacker = as_nobody
    if kind == "dir":
        PLANTED.mkdir(mode=0o777)  # root's, open to all: "another user" to nobody
        PLANTED.chmod(0o777)
    else:
        PLANTED.symlink_to(attacker)
    before = os.lstat(PLANTED)

    first = _nobody(home, "run", "-q", "-i", "host", "-B", "namespaces", "-p", "restrictive",
                    "--", "echo", "ran")
    assert first.returncode == 0 and "ran" in first.stdout, first.stderr
    assert f"{PLANTED} is not a private dir" in first.stderr
    record = home / ".local/share/agentkernel/runtime-dir"
    fallback = Path(record.read_text().strip())
    st = os.lstat(fallback)
    assert fallback != PLANTED and st.st_uid == NOBODY and st.st_mode & 0o777 == 0o700

    # Later commands use the recorded dir, without a second warning; so would the daemon.
    again = _nobody(home, "run", "-q", "-i", "host", "-B", "namespaces", "-p", "restrictive",
                    "--", "echo", "again")
    assert again.returncode == 0 and "again" in again.stdout, again.stderr
    assert "warning" not in again.stderr, again.stderr
    where = _nobody(home, "-c", "from agentkernel.paths import daemon_socket as d; print(d())")
    assert where.stdout.strip() == str(fallback / "daemon.sock"), where.stderr
    assert (fallback / "sandboxes").is_dir()

    # Nothing went through the planted name.
    after = os.lstat(PLANTED)
    assert (after.st_ino, after.st_mode, after.st_uid) == (before.st_ino, before.st_mode,
                                                          before.st_uid)
    assert not any(attacker.iterdir())
    if kind == "dir":
        assert not any(PLANTED.iterdir())
