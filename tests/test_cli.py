"""CLI commands around `run`: doctor, init, config files, --keep / list / remove."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from sandbox_helpers import ak


def test_version() -> None:
    r = ak("--version")
    assert r.returncode == 0 and r.stdout.startswith("agentkernel ")


def test_doctor_is_truthful_about_this_host() -> None:
    r = ak("doctor", "--json")
    report = json.loads(r.stdout)
    by_name = {b["name"]: b for b in report["backends"]}
    assert set(by_name) == {"namespaces", "gvisor", "microvm", "docker", "podman", "wasm"}
    assert report["auto"] in ("gvisor", "namespaces", "microvm")
    kvm = next(c for c in report["checks"] if c["name"] == "kvm")
    if Path("/sys/module/kvm_pvm").is_dir():  # these build machines: no standard guest boots
        assert kvm["ok"] is False and "PVM" in kvm["detail"]
    text = ak("doctor").stdout
    assert "Backends:" in text and "`--backend auto` picks:" in text


def test_init_writes_a_config_that_loads_clean(tmp_path: Path) -> None:
    proj = tmp_path / "My Project"
    proj.mkdir()
    r = ak("init", cwd=proj)
    assert r.returncode == 0, r.stderr
    text = (proj / "agentkernel.toml").read_text()
    assert tomllib.loads(text)["sandbox"]["name"] == "My-Project"
    assert ak("init", cwd=proj).returncode != 0  # never overwrites silently
    r = ak("run", "-i", "host", "-B", "namespaces", "--", "true", cwd=proj)
    assert r.returncode == 0 and "warning" not in r.stderr


def test_config_profile_and_unknown_key_warning(tmp_path: Path) -> None:
    (tmp_path / "agentkernel.toml").write_text(
        '[security]\nprofile = "restrictive"\nnetwrk = false\n')
    r = ak("run", "-i", "host", "-B", "namespaces", "--json", "--", "sh", "-c",
           "touch /workspace/x 2>/dev/null || echo ro", cwd=tmp_path)
    result = json.loads(r.stdout)
    assert result["profile"] == "restrictive"
    assert result["stdout"] == "ro\n"
    assert "unknown key 'security.netwrk'" in r.stderr


def test_bad_config_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "agentkernel.toml").write_text('[security]\nprofile = "paranoid"\n')
    r = ak("run", "-i", "host", "--", "true", cwd=tmp_path)
    assert r.returncode == 125
    assert len(r.stderr.strip().splitlines()) == 1 and "security.profile" in r.stderr


def test_cli_overrides_beat_config(tmp_path: Path) -> None:
    (tmp_path / "agentkernel.toml").write_text('[security]\nprofile = "permissive"\n')
    r = ak("run", "-i", "host", "-B", "namespaces", "-p", "restrictive", "--json", "--", "true",
           cwd=tmp_path)
    assert json.loads(r.stdout)["profile"] == "restrictive"


def test_memory_flag_is_enforced(tmp_path: Path) -> None:
    r = ak("run", "-i", "host", "-B", "namespaces", "-p", "permissive", "--memory", "64m",
           "--", "python3", "-c", "b = bytearray(256 * 1024 * 1024)", cwd=tmp_path)
    assert r.returncode == 137 and "out of memory (limit 64 MiB)" in r.stderr


def test_keep_then_list_and_remove(tmp_path: Path) -> None:
    r = ak("run", "-i", "host", "-B", "namespaces", "--keep", "--", "sh", "-c",
           "echo kept > /tmp/state", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    name = next(w for w in r.stderr.split() if w.strip("'").startswith("run-")).strip("'")
    assert name in ak("list").stdout
    r = ak("remove", name)
    assert r.returncode == 0, r.stderr
    assert name not in ak("list").stdout
    assert ak("remove", name).returncode != 0  # unknown now
    assert ak("remove", "../../etc").returncode == 2  # validated before any path is built
    # --keep started the daemon that owns kept sandboxes; later tests run without it.
    assert ak("daemon", "stop").returncode == 0


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path: Path) -> None:
    """`agentkernel config --json | head -c 10`: the pipe closes under a long answer; the
    CLI ends quietly (141, as a shell tool killed by SIGPIPE), with no traceback."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        proc = subprocess.run([sys.executable, "-m", "agentkernel", "config", "--json"],
                              cwd=tmp_path, stdout=write, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, timeout=60, check=False)
    finally:
        os.close(write)
    assert b"Traceback" not in proc.stderr, proc.stderr.decode()
    assert proc.returncode == 141, proc.stderr.decode()
