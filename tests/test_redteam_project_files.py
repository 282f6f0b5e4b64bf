"""Outside review: a project's files are read by the host as regular files only.

The attacker is a repository (a tarball keeps FIFOs; git keeps symlinks, e.g. a
`Procfile` pointing at `/proc/kmsg`, whose read blocks for root, or at `/dev/watchdog`,
which arms a reboot when opened). Image detection read `./Procfile` with a plain open:
a FIFO there hung the run for good, in the CLI and in the daemon that plans it (as the
daemon's user: root for root's).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_helpers import ak, backend_available


def _detect_in_child(directory: Path) -> str:
    """detect_image in a child process, so that a hang fails the test instead of the suite."""
    code = ("import sys; from agentkernel.detect import detect_image; "
            "print(detect_image(['./build'], sys.argv[1]))")
    r = subprocess.run([sys.executable, "-P", "-c", code, str(directory)], capture_output=True,
                       text=True, timeout=30, check=True)
    return r.stdout.strip()


def test_a_fifo_procfile_is_not_read(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "Procfile")
    assert _detect_in_child(tmp_path) == "alpine:3.20"


def test_a_procfile_linked_to_a_fifo_or_device_is_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "elsewhere"
    os.mkfifo(fifo)
    proj = tmp_path / "project"
    proj.mkdir()
    (proj / "Procfile").symlink_to(fifo)
    assert _detect_in_child(proj) == "alpine:3.20"
    (proj / "Procfile").unlink()
    (proj / "Procfile").symlink_to("/dev/zero")
    assert _detect_in_child(proj) == "alpine:3.20"


def test_a_regular_procfile_still_decides(tmp_path: Path) -> None:
    (tmp_path / "Procfile").write_text("web: python3 app.py\n")
    assert _detect_in_child(tmp_path) != "alpine:3.20"


@pytest.mark.skipif(not backend_available("namespaces"), reason="needs bwrap")
def test_a_run_in_a_project_with_a_fifo_procfile_runs(tmp_path: Path) -> None:
    """The real CLI, in-process run: it starts its sandbox instead of hanging."""
    os.mkfifo(tmp_path / "Procfile")
    script = tmp_path / "build"  # a command and a file no table knows: Procfile decides
    script.write_text("#!/bin/sh\necho ran\n")
    script.chmod(0o755)
    env = {**os.environ, "AGENTKERNEL_NO_DAEMON": "1"}
    r = subprocess.run([sys.executable, "-P", "-m", "agentkernel", "run", "-q", "--backend",
                        "namespaces", "--profile", "restrictive", "--", "./build"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL, check=False)
    assert r.returncode == 0 and "ran" in r.stdout, r


# --- copies of a project: a device node's contents are never copied ----------------------

MARKER = b"HOST-DEVICE-CONTENT-7f3a"


@pytest.fixture
def project_with_devices(tmp_path: Path) -> Iterator[Path]:
    """A project holding what a tarball extracted by root keeps: a block device node (of a
    loop device standing for the host's disk, holding MARKER), a char device (/dev/null's
    numbers: one of /dev/zero's filled the disk a copy was made on) and a FIFO, beside an
    ordinary file."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    image = tmp_path / "disk.img"
    image.write_bytes(MARKER + bytes(1 << 20))
    loop = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True,
                          text=True, check=True).stdout.strip()
    try:
        proj = tmp_path / "project"
        proj.mkdir()
        (proj / "hello.txt").write_text("hello\n")
        os.mknod(proj / "disk", 0o666 | stat.S_IFBLK, os.stat(loop).st_rdev)
        os.mknod(proj / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mkfifo(proj / "fifo")
        yield proj
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


def test_a_review_copy_leaves_device_nodes_and_fifos_out(project_with_devices: Path) -> None:
    from agentkernel.agents.review import changes, copy_project

    copy = copy_project(project_with_devices)
    try:
        assert sorted(os.listdir(copy)) == ["hello.txt"]
        assert changes(project_with_devices, copy) == []  # nothing to "delete" on apply
    finally:
        shutil.rmtree(copy.parent)


@pytest.mark.skipif(not backend_available("gvisor"), reason="needs runsc")
def test_a_kept_gvisor_sandbox_gets_no_devices_contents(project_with_devices: Path) -> None:
    """Its copy-on-write project is a copy made by the daemon, as root: the disk's bytes
    were in the sandbox's /workspace/disk (and a /dev/zero node's filled the copy's disk)."""
    name = "redteam-devices"
    (project_with_devices / "fifo").unlink()  # (a FIFO only failed the copy, loudly)
    r = ak("create", name, "--backend", "gvisor", "--dir", str(project_with_devices),
           timeout=120)
    assert r.returncode == 0, r
    try:
        probe = ("import os; print(sorted(os.listdir('/workspace')))\n"
                 "for n in os.listdir('/workspace'):\n"
                 "    p = '/workspace/' + n\n"
                 "    if os.path.isfile(p): print(n, open(p, 'rb').read(64))\n")
        r = ak("exec", name, "--", "python3", "-c", probe, timeout=60)
        assert r.returncode == 0, r
        assert "hello.txt" in r.stdout and MARKER.decode() not in r.stdout, r.stdout
        assert "'disk'" not in r.stdout and "'null'" not in r.stdout, r.stdout
    finally:
        ak("remove", name, timeout=120)

