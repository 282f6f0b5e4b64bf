"""The docker and podman backends' fast paths, against real engines: a daemon's warm pool
never serves the image a tag named before it moved, and a cold run loads no registry
client; the engine's image answers are remembered within their bound (unit tests)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

import test_containers
from engines import CLI
from sandbox_helpers import ak
from test_containers import engine, no_leftovers, ours  # noqa: F401 - the fixture

LAUNCHER = Path(__file__).resolve().parents[1] / "bin" / "agentkernel"
# Which image a sandbox got: the moved tag's second image has this file, the first not.
WHICH = "cat /marker 2>/dev/null || echo first"


def _second_image(eng: str, busybox: Path, tmp: Path) -> str:
    """The test image plus /marker ("second"), imported into the engine by its id."""
    tar = tmp / "second.tar"
    shutil.copy(busybox, tar)
    marker = tmp / "marker"
    marker.write_text("second\n")
    with tarfile.open(tar, "a") as t:
        t.add(str(marker), arcname="marker")
    out = subprocess.run([CLI[eng], "import", str(tar)], capture_output=True, text=True,
                         timeout=120, check=True, cwd="/")
    return out.stdout.strip().splitlines()[-1].removeprefix("sha256:")


def _tag(eng: str, image: str, ref: str) -> None:
    subprocess.run([CLI[eng], "tag", image, ref], capture_output=True, timeout=60,
                   check=True, cwd="/")


def _run(ref: str, eng: str, tmp: Path, env: dict[str, str]) -> dict[str, Any]:
    r = ak("run", "--json", "-B", eng, "-i", ref, "-p", "restrictive", "-w", "/tmp", "--",
           "sh", "-c", WHICH, cwd=tmp, env=env)
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def test_warm_pool_follows_a_moved_tag(engine: str, tmp_path: Path,  # noqa: F811
                                       busybox_tar: tuple[Path, str]) -> None:
    """A daemon's runs of a tag, warm; the tag is moved to another image (as `docker tag`,
    a pull or a build would): once the engine's answer is older than its bound, a run gets
    the new image, never a warm sandbox of the old one (the pool key names the image's
    id, not the tag)."""
    from agentkernel.backends.container_engine import IMAGE_CACHE_SECONDS

    before = set(ours(engine))
    ref = f"agentkernel-test/moved:{os.urandom(4).hex()}"
    second = _second_image(engine, busybox_tar[0], tmp_path)
    env: dict[str, str] = {}  # the suite's dirs: its daemon, podman's API service
    _tag(engine, test_containers.IMAGE, ref)
    try:
        assert ak("daemon", "start", cwd=tmp_path, env=env).returncode == 0
        runs = [_run(ref, engine, tmp_path, env)]
        while not runs[-1]["pooled"] and len(runs) < 10:  # the key's pool fills
            time.sleep(1)
            runs.append(_run(ref, engine, tmp_path, env))
        assert {r["stdout"] for r in runs} == {"first\n"}
        assert runs[-1]["pooled"], runs  # the case this test is about: a warm sandbox
        _tag(engine, second, ref)
        time.sleep(IMAGE_CACHE_SECONDS + 0.5)
        assert _run(ref, engine, tmp_path, env)["stdout"] == "second\n"
    finally:
        ak("daemon", "stop", cwd=tmp_path, env=env)
        for image in (ref, second):
            subprocess.run([CLI[engine], "rmi", "-f", image], capture_output=True, timeout=60,
                           check=False, cwd="/")
    no_leftovers(engine, before)


def test_cold_run_loads_no_registry_client(engine: str,  # noqa: F811
                                           tmp_path: Path) -> None:
    """A one-off CLI run on an image of the engine's store asks the engine, not a registry:
    neither the registry client nor OpenSSL's hashlib (~10 ms of a cold run) load."""
    (tmp_path / "run").mkdir(mode=0o700)
    env = {**os.environ, "AGENTKERNEL_HOME": str(tmp_path / "home"),
           "AGENTKERNEL_RUNTIME_DIR": str(tmp_path / "run"), "AGENTKERNEL_NO_DAEMON": "1"}
    out = subprocess.run([sys.executable, "-X", "importtime", str(LAUNCHER), "run", "-q",
                          "-B", engine, "-i", test_containers.IMAGE, "-p", "restrictive",
                          "-w", "/tmp", "--", "echo", "ran"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert (out.returncode, out.stdout) == (0, "ran\n"), out.stderr[-2000:]
    loaded = {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines()
              if line.startswith("import time:")}
    assert "agentkernel.backends.container_engine" in loaded
    unwanted = {"hashlib", "_hashlib", "agentkernel.images.registry"}
    assert not loaded & unwanted, sorted(loaded & unwanted)


# --- the engine's image answers (no engine: `_engine_image` is counted, time is set) ------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> Any:
    from agentkernel.backends import container_engine as ce
    from agentkernel.backends.podman import PodmanBackend

    clock = _Clock()
    calls: list[str] = []
    monkeypatch.setattr(ce.time, "monotonic", clock)
    monkeypatch.setattr(ce, "_IMAGE_CACHE", {})
    monkeypatch.setattr(ce.ContainerBackend, "_refresh_ahead", False)

    def fake(self: Any, image: str) -> Any:
        calls.append(image)
        return ("rootfs", None, f"{image} #{len(calls)}")

    monkeypatch.setattr(ce.ContainerBackend, "_engine_image", fake)
    return PodmanBackend(), clock, calls


def _settle() -> None:
    from agentkernel.backends import container_engine as ce

    deadline = time.time() + 10
    while ce._IMAGE_REFRESHING and time.time() < deadline:
        time.sleep(0.01)


def test_image_answer_kept_within_its_bound(asked: Any) -> None:
    from agentkernel.backends.container_engine import IMAGE_CACHE_SECONDS

    backend, clock, calls = asked
    assert backend.engine_image("a")[2] == "a #1"
    clock.now += IMAGE_CACHE_SECONDS - 0.1
    assert backend.engine_image("a")[2] == "a #1"  # a CLI: no refresh ahead
    _settle()
    assert calls == ["a"]
    clock.now += 0.2  # older than the bound: asked again, on the caller's path
    assert backend.engine_image("a")[2] == "a #2"
    assert calls == ["a", "a"]


def test_daemon_refreshes_image_answer_ahead(asked: Any) -> None:
    """In a daemon, an answer past IMAGE_REFRESH_AFTER is served while it is asked again in
    the background; one past IMAGE_CACHE_SECONDS is never served."""
    from agentkernel.backends.container_engine import IMAGE_CACHE_SECONDS, IMAGE_REFRESH_AFTER

    backend, clock, calls = asked
    backend.pooled()
    assert backend.engine_image("a")[2] == "a #1"
    clock.now += IMAGE_REFRESH_AFTER + 0.1
    assert backend.engine_image("a")[2] == "a #1"  # served, and asked again behind it
    _settle()
    assert calls == ["a", "a"]
    clock.now += IMAGE_CACHE_SECONDS - IMAGE_REFRESH_AFTER  # past the bound of the first
    assert backend.engine_image("a")[2] == "a #2"  # the refreshed answer
    _settle()
    clock.now += IMAGE_CACHE_SECONDS + 1  # none fresh enough: the caller asks
    assert backend.engine_image("a")[2] == f"a #{len(calls)}"
    assert calls[-1] == "a" and len(calls) >= 3


def test_image_answers_bounded(asked: Any) -> None:
    from agentkernel.backends import container_engine as ce

    backend, clock, _ = asked
    for i in range(ce.IMAGE_CACHE_MAX + 20):
        clock.now += 0.001
        backend.engine_image(f"img{i}")
    assert len(ce._IMAGE_CACHE) == ce.IMAGE_CACHE_MAX
    assert ("podman", "img0") not in ce._IMAGE_CACHE  # the oldest went first
