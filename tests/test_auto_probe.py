"""`auto` picks the strongest backend that works: a functional probe in a real sandbox, its
verdict cached per backend binary version, re-probed when a binary changes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from sandbox_helpers import SYSTEM_PYTHON, ak, public_pythonpath

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")
needs_runsc = pytest.mark.skipif(shutil.which("runsc") is None, reason="needs runsc")


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    """A data dir of its own: no verdict cached yet."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    return {"AGENTKERNEL_HOME": str(tmp_path / "home"), "AGENTKERNEL_RUNTIME_DIR": str(run),
            "AGENTKERNEL_NO_DAEMON": "1", "XDG_CONFIG_HOME": str(tmp_path / "config")}


@needs_bwrap
def test_namespaces_passes_the_real_probe() -> None:
    from agentkernel.backends import get_backend
    from agentkernel.backends.functional import run_probe

    verdict = run_probe(get_backend("namespaces"))
    assert verdict.ok, verdict.detail


@needs_runsc
def test_gvisor_verdict_matches_what_coreutils_see(tmp_path: Path) -> None:
    """The probe says gVisor fails exactly when coreutils' `ls /` fails inside it (Debian's
    2022-12 runsc: EINVAL for statx with AT_NO_AUTOMOUNT), and names the cause."""
    from agentkernel.backends import get_backend
    from agentkernel.backends.functional import run_probe

    verdict = run_probe(get_backend("gvisor"))
    real = ak("run", "-q", "-i", "host", "-B", "gvisor", "-p", "restrictive", "--", "ls", "/",
              cwd=tmp_path, env={"AGENTKERNEL_NO_DAEMON": "1"})
    assert verdict.ok == (real.returncode == 0 and "usr" in real.stdout.split()), \
        (verdict, real)
    if not verdict.ok and "Invalid argument" in verdict.detail:
        assert "AT_NO_AUTOMOUNT" in verdict.detail and "runsc" in verdict.detail


@needs_bwrap
@needs_runsc
def test_auto_skips_a_failing_backend_and_says_why(tmp_path: Path,
                                                  home: dict[str, str]) -> None:
    from agentkernel.backends import get_backend
    from agentkernel.backends.functional import run_probe

    gvisor_ok = run_probe(get_backend("gvisor")).ok
    run = ak("run", "-v", "-i", "host", "--", "ls", "/", cwd=tmp_path, env=home)
    assert run.returncode == 0 and "usr" in run.stdout.split(), run.stderr
    picked = "gvisor" if gvisor_ok else "namespaces"
    assert f"backend {picked}:" in run.stderr
    if not gvisor_ok:
        assert "gvisor skipped: its functional probe failed:" in run.stderr
        assert "--backend gvisor forces it" in run.stderr
    cached = Path(home["AGENTKERNEL_HOME"], "cache", "probe-gvisor").read_text().split("\n")
    assert cached[1] == ("ok" if gvisor_ok else "fail")

    doctor = ak("doctor", "--json", env=home)
    report = json.loads(doctor.stdout)
    assert report["auto"] == picked
    assert any(s.startswith("gvisor skipped") for s in report["auto_skipped"]) != gvisor_ok

    # Asked for by name, a backend that failed its probe still runs, with one warning.
    forced = ak("run", "-i", "host", "-B", "gvisor", "--", "/bin/true", cwd=tmp_path, env=home)
    assert forced.returncode == 0, forced.stderr
    assert ("failed its functional probe" in forced.stderr) != gvisor_ok


def _fake_runsc(directory: Path) -> Path:
    """A `runsc` that fails with a message of its own: the probe must see it fail."""
    directory.mkdir()
    fake = directory / "runsc"
    fake.write_text('#!/bin/sh\necho "fake runsc: refusing" >&2\nexit 1\n')
    fake.chmod(0o755)
    return fake


@needs_bwrap
def test_verdict_is_cached_and_a_changed_binary_is_probed_again(
        tmp_path: Path, home: dict[str, str]) -> None:
    fake = _fake_runsc(tmp_path / "bin")
    env = {**home, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    cache = Path(home["AGENTKERNEL_HOME"], "cache", "probe-gvisor")

    def run() -> os.stat_result:
        result = ak("run", "-v", "-i", "host", "--", "/bin/true", cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr
        assert "backend namespaces:" in result.stderr
        # The probe really tried to start a sandbox with the (fake) runsc. (As root, the
        # user namespace runsc runs in may not even reach it under pytest's 0700 tmp dir.)
        assert "gvisor skipped: its functional probe failed: a sandbox did not start: " \
            "runsc failed to start the sandbox: " in result.stderr, result.stderr
        return cache.stat()

    first = run()
    # Every probe stores its verdict anew (a new file, renamed into place): the same inode
    # means no sandbox was started for the second run.
    assert run().st_ino == first.st_ino, "a cached verdict must not be probed again"
    st = fake.stat()
    os.utime(fake, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # "upgraded"
    assert run().st_ino != first.st_ino, "a changed runsc was not probed again"
    key = cache.read_text().split("\n")[0]
    assert f"{fake}:{st.st_size}:{st.st_mtime_ns + 1_000_000_000}" in key


@needs_bwrap
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root (to become nobody) and setpriv")
def test_auto_as_an_ordinary_user_picks_a_backend_that_works() -> None:
    """The probe runs as the user who runs: as nobody, with a data dir of its own, `auto`
    still ends on a backend where coreutils' `ls /` works."""
    import subprocess
    import tempfile

    nobody = 65534
    root = Path(tempfile.mkdtemp(prefix="ak-auto-user-", dir="/tmp"))
    try:
        root.chmod(0o755)
        for sub in ("run", "data"):
            (root / sub).mkdir(mode=0o700)
            os.chown(root / sub, nobody, nobody)
        os.chown(root, nobody, nobody)
        env = {k: os.environ[k] for k in ("PATH", "LANG") if k in os.environ}
        env.update(HOME=str(root), AGENTKERNEL_HOME=str(root / "data"),
                   AGENTKERNEL_RUNTIME_DIR=str(root / "run"), AGENTKERNEL_NO_DAEMON="1",
                   PYTHONPATH=public_pythonpath())  # nobody cannot read the suite's own
        setpriv = ["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups", "--"]
        for _ in range(2):  # the first run probes, the second reads the verdicts
            r = subprocess.run([*setpriv, SYSTEM_PYTHON, "-m", "agentkernel", "run", "-v",
                                "--no-network", "-i", "host", "--", "ls", "/"], cwd=root, env=env,
                               capture_output=True, text=True, timeout=120, check=False)
            assert r.returncode == 0 and "usr" in r.stdout.split(), r.stderr
        verdicts = sorted((root / "data" / "cache").glob("probe-*"))
        assert verdicts and all(v.stat().st_uid == nobody for v in verdicts)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@needs_bwrap
def test_a_sandbox_that_did_not_start_is_retried_soon(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A start failure may be passing (a bad runtime dir, a full disk): its verdict is kept
    a minute, not until the binaries change; what the probe command showed is kept."""
    import time

    from agentkernel.backends import functional as f
    from agentkernel.backends import get_backend

    monkeypatch.setenv("AGENTKERNEL_HOME", str(tmp_path))
    backend = get_backend("namespaces")
    key = f.version_key(backend)
    f.store(backend, f.Verdict(False, "a sandbox did not start: x", conclusive=False), key)
    assert f.cached(backend) == f.Verdict(False, "a sandbox did not start: x", False)
    later = time.time() + f.RETRY_AFTER + 1
    monkeypatch.setattr(time, "time", lambda: later)
    assert f.cached(backend) is None
    f.store(backend, f.Verdict(False, "ls: failed"), key)
    assert f.cached(backend) == f.Verdict(False, "ls: failed")
