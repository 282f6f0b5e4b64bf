"""A kept microVM from an OCI image pulled from a real (local) registry, through the CLI:
`create vm --backend microvm --image python:3.12-alpine` then `exec vm -- python3 -V`."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "images"))
from harness import REGISTRY_BIN, Pusher, Registry, busybox_layer
from test_run_images import marker, python_layer

from sandbox_helpers import ak


@pytest.fixture(scope="module")
def mirror(microvm_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not Path(REGISTRY_BIN).exists():
        pytest.skip("docker-registry is not installed")
    reg = Registry(tmp_path_factory.mktemp("vmreg")).start()
    try:
        Pusher(reg.url).image("library/python", "3.12-alpine",
                              [busybox_layer(), python_layer(), marker("python-image")],
                              config={"Env": ["PATH=/usr/bin:/bin"]})
        yield reg.host
    finally:
        reg.stop()


def test_kept_vm_from_a_pulled_image_runs_its_python(mirror: str, tmp_path: Path) -> None:
    root = tmp_path
    (root / "run").mkdir(mode=0o700)
    # The kernel `setup --microvm` prepared for the session, reused by this daemon.
    from agentkernel.vm.kernel import current_kernel

    kernel = current_kernel(None)
    assert kernel is not None
    (root / "daemon.toml").write_text(
        f'[daemon]\npools = []\n[images]\ninsecure_registries = ["{mirror}"]\n'
        f'[microvm]\nallow_emulation = true\nkernel = "{kernel.directory}"\n')
    env = {"AGENTKERNEL_HOME": str(root / "home"), "AGENTKERNEL_RUNTIME_DIR": str(root / "run"),
           "AGENTKERNEL_DAEMON_CONFIG": str(root / "daemon.toml"),
           "AGENTKERNEL_REGISTRY_MIRROR": mirror,
           "AGENTKERNEL_MICROVM_ALLOW_EMULATION": "1"}
    try:
        made = ak("create", "pyvm", "--backend", "microvm", "--image", "python:3.12-alpine",
                  "-p", "moderate", cwd=root, env=env, timeout=300)
        assert made.returncode == 0, made.stderr
        # The daemon's own [images] settings reach the registry; no fallback to pretend with.
        assert "Rootfs:  image docker.io/library/python:3.12-alpine" in made.stdout, made
        assert "warning" not in made.stderr
        out = ak("exec", "pyvm", "--", "python3", "-c",
                 "import platform, sys; print(platform.release(), sys.version_info[0]); "
                 "print(open('/etc/ak-image').read().strip())", cwd=root, env=env,
                 timeout=180)
        assert out.returncode == 0, out.stderr
        release, major = out.stdout.split("\n")[0].split()
        assert release != os.uname().release and major == "3"  # the guest's kernel
        assert out.stdout.split("\n")[1] == "python-image"  # the pulled image's root
        listed = ak("list", cwd=root, env=env)
        assert "pyvm" in listed.stdout and "microvm" in listed.stdout
    finally:
        ak("remove", "pyvm", cwd=root, env=env, timeout=120)
        ak("daemon", "stop", cwd=root, env=env, timeout=60)
