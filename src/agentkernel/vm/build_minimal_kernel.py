"""Opt-in: build the minimal guest kernel (everything built in) from Debian's linux-source-6.1.

Takes about half an hour on 2 cores, so nothing runs it automatically. The result is cached
in the data dir keyed by the source package version and the config's digest, then selected
with the same code as `agentkernel setup --microvm --vmlinux FILE`.

Usage: python -m agentkernel.vm.build_minimal_kernel --base-config FILE [--jobs N]
       [--install-deps]

FILE is a guest kernel config for 6.1 with everything needed built in; Firecracker's
published `microvm-kernel-ci-x86_64-6.1.config` is the one this was written against (it is
not shipped here: fetch it from the Firecracker repository).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..paths import data_dir

SOURCE_PACKAGE = "linux-source-6.1"
BUILD_DEPS = ("linux-source-6.1", "build-essential", "flex", "bison", "bc", "libelf-dev",
              "libssl-dev", "dwarves", "xz-utils")


def _run(argv: list[str], cwd: Path | None = None) -> None:
    print("+", " ".join(argv), flush=True)
    subprocess.run(argv, cwd=cwd, check=True)


def source_version() -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0 or not out.stdout:
        raise SystemExit(f"{SOURCE_PACKAGE} is not installed (use --install-deps)")
    return out.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-config", type=Path, required=True, metavar="FILE",
                        help="the kernel config to build (see the module docstring)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--install-deps", action="store_true",
                        help=f"apt-get install {' '.join(BUILD_DEPS)}")
    args = parser.parse_args(argv)
    if args.install_deps:
        _run(["apt-get", "install", "-y", "--no-install-recommends", *BUILD_DEPS])
    version = source_version()
    config = args.base_config
    digest = hashlib.sha256(config.read_bytes()).hexdigest()[:12]
    out_dir = data_dir() / "microvm" / "minimal" / f"{version}-{digest}"
    vmlinux = out_dir / "vmlinux"
    if not vmlinux.is_file():
        tarballs = sorted(Path("/usr/src").glob("linux-source-6.1*.tar.*"))
        if not tarballs:
            raise SystemExit("no /usr/src/linux-source-6.1*.tar.* found")
        with tempfile.TemporaryDirectory(prefix="ak-kbuild-") as tmp:
            work = Path(tmp)
            print(f"unpacking {tarballs[-1]}", flush=True)
            with tarfile.open(tarballs[-1]) as tar:
                tar.extractall(work, filter="data")
            src = next(p for p in work.iterdir() if p.is_dir())
            shutil.copyfile(config, src / ".config")
            _run(["make", "olddefconfig"], cwd=src)
            _run(["make", f"-j{args.jobs}", "vmlinux"], cwd=src)
            out_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / "vmlinux", vmlinux)
    print(f"minimal kernel: {vmlinux}", flush=True)
    from .setup import main as setup_main

    return setup_main(argparse.Namespace(vmlinux=vmlinux, kernel_deb=None, force=False,
                                         no_kvm_probe=False))


if __name__ == "__main__":
    sys.exit(main())
