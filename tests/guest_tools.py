"""A microVM guest root with the clients issue 11 names: the busybox base root plus the
host's python3 (stdlib, ssl), requests and pip, curl, git (smart HTTP) and node, each with
the shared libraries it links, at their host paths. The host's userland is not copied into
guests (a `host` run gets busybox only), so the suite builds this tree and boots it as an
image rootfs (`rootfs.tree_rootfs`)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

# Big parts of the stdlib no client here imports (compiled modules are kept: compiling
# them again in the guest takes seconds under emulation).
PY_SKIP = {"test", "tests", "idlelib", "tkinter", "ensurepip", "lib2to3",
           "pydoc_data", "turtledemo", "config-3.11-x86_64-linux-gnu"}
# Debian's requests (patched to trust the system bundle) and its dependencies; pip.
DIST = ("requests", "urllib3", "six.py", "idna", "chardet", "charset_normalizer", "certifi",
        "pip")
DIST_DIR = Path("/usr/lib/python3/dist-packages")
BINARIES = ("/usr/bin/curl", "/usr/bin/git", "/usr/bin/node")


def copy_with_libs(binary: Path, root: Path) -> None:
    """`binary` and the shared libraries it links, at their host paths under `root`."""
    paths = [binary]
    ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    for line in ldd.stdout.splitlines():
        path = line.split("=>")[-1].split("(")[0].strip()
        if path.startswith("/"):
            paths.append(Path(path))
    for path in paths:
        dest = root / str(path).lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            shutil.copy2(os.path.realpath(path), dest)


def missing() -> str | None:
    """What this host lacks to build the tree (None: nothing)."""
    from agentkernel.vm.disk import base_busybox

    if base_busybox() is None:
        return "busybox-static"
    python = Path(os.path.realpath("/usr/bin/python3"))
    if not python.name.startswith("python3") or not (Path("/usr/lib") / python.name).is_dir():
        return "the system's python3"
    for name in (*BINARIES, "/usr/lib/git-core/git-remote-https"):
        if not Path(name).exists():
            return name
    for name in DIST:
        if not (DIST_DIR / name).exists():
            return f"python3-{name.removesuffix('.py')}"
    return None


def _python(root: Path) -> None:
    python = Path(os.path.realpath("/usr/bin/python3"))
    stdlib = Path("/usr/lib") / python.name  # Debian's layout
    copy_with_libs(python, root)
    (root / "usr/bin/python3").unlink(missing_ok=True)
    (root / "usr/bin/python3").symlink_to(python.name)
    skip = lambda _d, names: [n for n in names if n in PY_SKIP]  # noqa: E731
    shutil.copytree(stdlib, root / str(stdlib).lstrip("/"), symlinks=True, ignore=skip)
    for ext in (root / str(stdlib).lstrip("/") / "lib-dynload").glob("*.so"):
        copy_with_libs(Path(str(ext).replace(str(root), "", 1)), root)
    dist = root / str(DIST_DIR).lstrip("/")
    for name in DIST:
        if (DIST_DIR / name).is_file():
            (dist / "__pycache__").mkdir(parents=True, exist_ok=True)
            shutil.copy2(DIST_DIR / name, dist / name)
            for pyc in (DIST_DIR / "__pycache__").glob(name.removesuffix(".py") + ".*.pyc"):
                shutil.copy2(pyc, dist / "__pycache__" / pyc.name)
        else:
            shutil.copytree(DIST_DIR / name, dist / name, symlinks=True, ignore=skip)
    for ext in (root / str(DIST_DIR).lstrip("/")).rglob("*.so"):
        copy_with_libs(Path(str(ext).replace(str(root), "", 1)), root)


def _git(root: Path) -> None:
    """git and the helper that speaks HTTPS; every git-core command is git itself."""
    core = root / "usr/lib/git-core"
    core.mkdir(parents=True)
    copy_with_libs(Path("/usr/lib/git-core/git-remote-https"), root)
    (core / "git-remote-http").symlink_to("git-remote-https")
    for entry in os.scandir("/usr/lib/git-core"):
        if entry.is_symlink() and os.readlink(entry.path) == "git":
            (core / entry.name).symlink_to("/usr/bin/git")
    (core / "git").symlink_to("/usr/bin/git")


def build(root: Path) -> Path:
    """Fill `root` (an empty dir); returns it."""
    from agentkernel.vm.disk import _fill_base_tree, base_busybox

    busybox = base_busybox()
    assert busybox is not None
    _fill_base_tree(root, busybox)
    for binary in BINARIES:
        copy_with_libs(Path(binary), root)
    _python(root)
    _git(root)
    return root
