"""`agentkernel run` on images pulled from a real local registry, on both backends."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import LayerBuilder, Proxy, Pusher, Registry, busybox_layer

from agentkernel.images.store import Store

BACKENDS = [b for b in ("namespaces", "gvisor")
            if subprocess.run(["which", {"namespaces": "bwrap", "gvisor": "runsc"}[b]],
                              capture_output=True, check=False).returncode == 0]
NODE = shutil.which("node")
PY_EXCLUDE = {"test", "__pycache__", "idlelib", "tkinter", "ensurepip", "lib2to3",
              "pydoc_data", "dist-packages", "config-3.11-x86_64-linux-gnu", "turtledemo"}


def program_layer(program: str, trees: tuple[Path, ...] = ()) -> bytes:
    """A host program (e.g. Debian's python3) with the libraries it links, as one layer."""
    real = Path(os.path.realpath(program))
    b = LayerBuilder().dir("usr").dir("usr/bin").dir("usr/lib").dir("lib64")
    b.file(f"usr/bin/{real.name}", real.read_bytes(), mode=0o755)
    if Path(program).name != real.name:
        b.symlink(f"usr/bin/{Path(program).name}", real.name)
    ldd = subprocess.run(["ldd", str(real)], capture_output=True, text=True, check=True).stdout
    made = {"usr", "usr/bin", "usr/lib", "lib64"}
    for line in ldd.splitlines():
        path = line.split("=>")[-1].split("(")[0].strip()
        if not path.startswith("/"):
            continue
        dest = path.lstrip("/")
        for parent in reversed(Path(dest).parents[:-1]):
            if str(parent) not in made:
                made.add(str(parent))
                b.dir(str(parent))
        b.file(dest, Path(os.path.realpath(path)).read_bytes(), mode=0o755)
    for tree in trees:
        for root, dirs, files in os.walk(tree):
            dirs[:] = sorted(d for d in dirs if d not in PY_EXCLUDE)
            rel = Path(root).relative_to("/")
            b.dir(str(rel))
            for name in sorted(files):
                path = Path(root, name)
                if path.is_file() and not path.is_symlink():
                    b.file(str(rel / name), path.read_bytes())
    return b.bytes()


def python_layer() -> bytes:
    real = Path(os.path.realpath("/usr/bin/python3"))
    return program_layer("/usr/bin/python3", (Path("/usr/lib") / real.name,))


def marker(text: str) -> bytes:
    return LayerBuilder().dir("etc").file("etc/ak-image", text.encode() + b"\n").bytes()


@pytest.fixture(scope="module")
def mirror(pusher: Pusher, plain_registry: Registry) -> Registry:
    """The local registry as a Docker Hub mirror holding python, alpine (busybox) images."""
    sh = busybox_layer()
    pusher.image("library/alpine", "3.20", [sh, marker("alpine-image")],
                 config={"Env": ["PATH=/bin:/usr/bin", "IMAGE_VAR=from-image"]})
    pusher.image("library/python", "3.12-alpine", [sh, python_layer(), marker("python-image")],
                 config={"Env": ["PATH=/usr/bin:/bin"]})
    if NODE:  # node:22-alpine from this host's node binary (a 100 MB layer: uncompressed)
        pusher.image("library/node", "22-alpine", [sh, program_layer(NODE), marker("node-image")],
                     compression="none", config={"Env": ["PATH=/usr/bin:/bin"]})
    return plain_registry


def debian_python_tar() -> Path:
    """A Debian 12 userland with python3, built by mmdebstrap (cached: ~10 s to build)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "agentkernel-tests"
    tar = cache / "debian-bookworm-python3.tar"
    if not tar.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = tar.with_suffix(".tmp")
        subprocess.run(["mmdebstrap", "--variant=essential", "--include=python3-minimal",
                        "--mode=root", "--format=tar", "bookworm", str(tmp)],
                       check=True, capture_output=True, timeout=600)
        tmp.rename(tar)
    return tar


@pytest.fixture(scope="module")
def debian_image(pusher: Pusher, plain_registry: Registry) -> str:
    if shutil.which("mmdebstrap") is None or os.geteuid() != 0:
        pytest.skip("needs mmdebstrap and root (scripts/test.sh installs it)")
    layer = debian_python_tar().read_bytes()
    pusher.image("test/debian-python3", "bookworm", [layer], compression="zstd",
                 config={"Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"],
                         "WorkingDir": "/srv"})
    return f"{plain_registry.host}/test/debian-python3:bookworm"


@pytest.mark.parametrize("backend", BACKENDS)
def test_debian_userland_image_runs_python(backend: str, debian_image: str, tmp_path: Path,
                                           mirror: Registry) -> None:
    """A real distribution built by mmdebstrap (device nodes in its tar are skipped)."""
    env = {"AGENTKERNEL_HOME": str(tmp_path / "akhome")}
    cfg = tmp_path / "ak.toml"
    cfg.write_text(f'[images]\ninsecure_registries = ["{mirror.host}"]\n')
    r = ak("run", "-B", backend, "-c", str(cfg), "-i", debian_image, "--", "python3", "-c",
           "import platform, os; print(open('/etc/debian_version').read().strip()[:2],"
           " platform.python_version()[:2], os.getcwd())", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["12", "3.", "/workspace"]


@pytest.fixture
def env(tmp_path: Path, mirror: Registry) -> dict[str, str]:
    """A private image store and the mirror, as a user would configure them. The mirror is
    plain HTTP on 127.0.0.1: no insecure setting is needed for loopback (as in Docker)."""
    return {"AGENTKERNEL_HOME": str(tmp_path / "akhome"),
            "AGENTKERNEL_REGISTRY_MIRROR": mirror.host}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    proj = tmp_path / "proj"
    proj.mkdir()
    return proj


def ak(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentkernel", *args], cwd=cwd,
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=180, stdin=subprocess.DEVNULL, check=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_python_command_pulls_and_runs_python_image(backend: str, project: Path,
                                                    env: dict[str, str]) -> None:
    r = ak("run", "-v", "-B", backend, "--", "python3", "-c",
           "print(open('/etc/ak-image').read().strip())", cwd=project, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "python-image\n"
    assert "image python:3.12-alpine (detected from command 'python3')" in r.stderr
    assert "rootfs: image docker.io/library/python:3.12-alpine" in r.stderr


@pytest.mark.skipif(NODE is None, reason="no node binary on this host to build a node image")
def test_node_command_pulls_and_runs_node_image(project: Path, env: dict[str, str]) -> None:
    r = ak("run", "-v", "-B", "namespaces", "--", "node", "-e",
           "console.log(require('fs').readFileSync('/etc/ak-image', 'utf8').trim())",
           cwd=project, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "node-image\n"
    assert "image node:22-alpine (detected from command 'node')" in r.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_sh_runs_default_image_with_its_env(backend: str, project: Path,
                                            env: dict[str, str]) -> None:
    r = ak("run", "-B", backend, "--", "sh", "-c", 'cat /etc/ak-image; echo "$IMAGE_VAR"; pwd',
           cwd=project, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "alpine-image\nfrom-image\n/workspace\n"


@pytest.mark.parametrize("backend", BACKENDS)
def test_writes_stay_in_the_sandbox(backend: str, project: Path, env: dict[str, str]) -> None:
    script = "echo changed > /etc/ak-image && cat /etc/ak-image && echo new > /bin/new"
    r = ak("run", "-B", backend, "--", "sh", "-c", script, cwd=project, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "changed\n"
    r = ak("run", "-B", backend, "--", "sh", "-c", "cat /etc/ak-image; ls /bin/new 2>&1; true",
           cwd=project, env=env)
    assert r.stdout.startswith("alpine-image\n")  # a fresh sandbox sees the pristine image
    store = Store(Path(env["AGENTKERNEL_HOME"]) / "images")
    for tree in (store.root / "rootfs").iterdir():
        assert (tree / "etc/ak-image").read_text() == "alpine-image\n"
        assert not (tree / "bin/new").exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_restrictive_keeps_image_read_only(backend: str, project: Path,
                                           env: dict[str, str]) -> None:
    r = ak("run", "-B", backend, "-p", "restrictive", "--", "sh", "-c",
           "echo x > /etc/ak-image 2>/dev/null && echo wrote; echo x > /tmp/ok && echo tmp-ok",
           cwd=project, env=env)
    assert r.stdout == "tmp-ok\n", r.stderr


def test_second_run_transfers_no_blob(project: Path, env: dict[str, str],
                                      mirror: Registry) -> None:
    assert ak("run", "-B", "namespaces", "--", "sh", "-c", ":", cwd=project,
              env=env).returncode == 0
    before = mirror.blob_gets()
    r = ak("run", "-B", "namespaces", "--", "sh", "-c", "cat /etc/ak-image", cwd=project, env=env)
    assert r.stdout == "alpine-image\n"
    assert mirror.blob_gets() == before


def test_unavailable_image_falls_back_to_host_and_says_so(project: Path,
                                                          env: dict[str, str]) -> None:
    r = ak("run", "-B", "namespaces", "-i", "nosuch/image:1", "--", "sh", "-c",
           "test -e /etc/ak-image || echo host-rootfs", cwd=project, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "host-rootfs\n"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "nosuch/image:1" in lines[0]
    assert 'offline_fallback = "host"' in lines[0]


def test_unavailable_image_without_fallback_is_exit_125(project: Path, env: dict[str, str],
                                                        mirror: Registry) -> None:
    (project / "agentkernel.toml").write_text('[images]\noffline_fallback = "none"\n')
    r = ak("run", "-B", "namespaces", "-i", "nosuch/image:1", "--", "sh", "-c", ":",
           cwd=project, env=env)
    assert r.returncode == 125
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "nosuch/image:1" in lines[0] and mirror.host in lines[0]


def test_no_command_runs_the_images_cmd(project: Path, env: dict[str, str]) -> None:
    """`run --image X` alone runs the image's Cmd (here /bin/sh, fed from stdin)."""
    r = subprocess.run([sys.executable, "-m", "agentkernel", "run", "-B", "namespaces",
                        "-i", "alpine:3.20"], cwd=project, env={**os.environ, **env},
                       input="cat /etc/ak-image\n", capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "alpine-image\n"
    r = subprocess.run([sys.executable, "-m", "agentkernel", "run", "-i", "host"],
                       cwd=project, env={**os.environ, **env}, capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL, check=False)
    assert r.returncode == 2 and "no command given" in r.stderr


def _user_config(root: Path, text: str) -> dict[str, str]:
    """A user config file ($XDG_CONFIG_HOME/agentkernel/config.toml) and a private store."""
    (root / "xdg" / "agentkernel").mkdir(parents=True)
    (root / "xdg" / "agentkernel" / "config.toml").write_text(text)
    return {"AGENTKERNEL_HOME": str(root / "akhome"), "XDG_CONFIG_HOME": str(root / "xdg")}


def test_user_config_mirror_serves_runs_and_pulls(tmp_path: Path, project: Path,
                                                   mirror: Registry) -> None:
    """The mirror in the user's config.toml (no variable, no insecure setting) is used by
    `run` and by `images pull`, from any directory."""
    env = _user_config(tmp_path, f'[images]\nmirrors = ["{mirror.host}"]\n')
    env["AGENTKERNEL_REGISTRY_MIRROR"] = ""
    r = ak("run", "-B", "namespaces", "--", "sh", "-c", "cat /etc/ak-image", cwd=project,
           env=env)
    assert (r.returncode, r.stdout) == (0, "alpine-image\n"), r.stderr
    assert "warning" not in r.stderr
    r = ak("images", "pull", "-q", "python:3.12-alpine", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    r = ak("config", "--json", cwd=project, env=env)
    assert '"origin": "user"' in r.stdout and mirror.host in r.stdout


def test_project_file_cannot_redirect_pulls(tmp_path: Path, project: Path, mirror: Registry,
                                            proxy: Proxy) -> None:
    """A cloned project's agentkernel.toml names its own registry and mirror for the user's
    images (they would land in the shared store under Docker Hub's names): ignored."""
    env = _user_config(tmp_path, f'[images]\nmirrors = ["{mirror.host}"]\n')
    env["AGENTKERNEL_REGISTRY_MIRROR"] = ""
    (project / "agentkernel.toml").write_text(
        f'[images]\nregistry = "{proxy.host}"\nmirrors = ["{proxy.host}"]\n'
        f'insecure_registries = ["{proxy.host}"]\n')
    r = ak("run", "-q", "-B", "namespaces", "-i", "alpine:3.20", "--", "cat", "/etc/ak-image",
           cwd=project, env=env)
    assert (r.returncode, r.stdout, r.stderr) == (0, "alpine-image\n", "")
    assert proxy.requests == []  # not one request reached the project's registry
    r = ak("config", cwd=project, env=env)
    warnings = r.stderr.strip().splitlines()
    assert len(warnings) == 3 and all("only your own config sets it" in w for w in warnings)
    # Vouched for with -c, the same file is the user's choice: its mirror is used.
    r = ak("run", "-B", "namespaces", "-c", str(project / "agentkernel.toml"), "-i",
           "alpine:3.20", "--", "true", cwd=project,
           env={**env, "AGENTKERNEL_HOME": str(tmp_path / "other-store")})
    assert r.returncode == 0, r.stderr
    assert proxy.requests


def test_warm_pool_follows_a_moved_tag(tmp_path: Path, project: Path, env: dict[str, str],
                                       pusher: Pusher, mirror: Registry) -> None:
    """Runs through a daemon whose pool holds warm sandboxes of an image: after its tag
    moved to another image and was pulled again, no run gets the old image."""
    sh = busybox_layer()
    pusher.image("library/alpine", "moving", [sh, marker("first-image")],
                  config={"Env": ["PATH=/bin:/usr/bin"]})
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    denv = {**env, "AGENTKERNEL_RUNTIME_DIR": str(run_dir)}
    argv = ("run", "-B", "namespaces", "-i", "alpine:moving", "--", "cat", "/etc/ak-image")
    assert ak("daemon", "start", cwd=project, env=denv).returncode == 0
    try:
        for _ in range(3):  # the first one makes the key warm
            r = ak(*argv, cwd=project, env=denv)
            assert (r.returncode, r.stdout) == (0, "first-image\n"), r.stderr
        pusher.image("library/alpine", "moving", [sh, marker("second-image")],
                     config={"Env": ["PATH=/bin:/usr/bin"]})
        assert ak("images", "pull", "alpine:moving", cwd=project, env=denv).returncode == 0
        time.sleep(2.5)  # the daemon's resolve of a stored image is kept 2 s
        for _ in range(3):
            r = ak(*argv, cwd=project, env=denv)
            assert (r.returncode, r.stdout) == (0, "second-image\n"), r.stderr
    finally:
        ak("daemon", "stop", cwd=project, env=denv)
