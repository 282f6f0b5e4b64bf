"""A private /etc entry that vanishes, or comes back, between the walk for /etc's private
entries and the engine's mounts (docker and podman, real engines): the start neither fails
(the engine cannot bind a mask onto a missing target in a read-only root) nor shows an
entry unmasked that exists when the container starts (a dropped mask is checked in the
started container, which is made again if its entry came back)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox_helpers import backend_available, container_ready, host_runner

SECRET = "SECRET-OF-THE-HOST-ETC"


@pytest.fixture(params=["docker", "podman"])
def engine(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if os.geteuid() != 0 or not backend_available(name):
        pytest.skip(f"needs root and {name}")
    container_ready(request, name)
    return name


@pytest.fixture
def secret() -> Iterator[Path]:
    from agentkernel import rootfs_watch

    rootfs_watch.forget()
    path = Path("/etc") / f"ak-mask-race-{os.urandom(4).hex()}"
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
        rootfs_watch.forget()


def _plant(path: Path, engine: str, plan: Any) -> None:
    """A private file the sandbox's root could read if it were not masked (docker: the
    remapped root's own; podman's ranges are per sandbox: root's, hidden by its mode too)."""
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    if engine == "docker":
        uid = int(plan.backend.root_uid())
        os.chown(path, uid, uid)


def _run(engine: str, tmp_path: Path, path: Path) -> tuple[Any, Callable[[], str]]:
    return host_runner(engine, tmp_path, f"cat {path} 2>&1; stat -c %F {path} 2>&1; echo done")


def test_vanished_private_entry_starts(engine: str, tmp_path: Path, secret: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from agentkernel.backends import container_engine

    plan, run = _run(engine, tmp_path, secret)
    _plant(secret, engine, plan)
    walk = container_engine._host_masks

    def walk_then_vanish(rootfs: Any) -> tuple[Any, ...]:
        masks = walk(rootfs)
        assert any(m.path == str(secret) for m in masks)  # (walked while it was there)
        secret.unlink(missing_ok=True)
        return masks

    monkeypatch.setattr(container_engine, "_host_masks", walk_then_vanish)
    out = run()
    assert "done" in out and SECRET not in out, out


def test_private_entry_gone_before_the_mounts_starts(
        engine: str, tmp_path: Path, secret: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gone after its mask went into the create request: the engine cannot bind it (read-only
    root), and the container is made again without it."""
    plan, run = _run(engine, tmp_path, secret)
    _plant(secret, engine, plan)
    create = type(plan.backend).create_container

    def vanish_before_create(self: Any, *args: Any) -> str:
        secret.unlink(missing_ok=True)
        return str(create(self, *args))

    monkeypatch.setattr(type(plan.backend), "create_container", vanish_before_create)
    out = run()
    assert "done" in out and SECRET not in out, out


def test_private_entry_back_before_the_mounts_stays_hidden(
        engine: str, tmp_path: Path, secret: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agentkernel.backends import container_engine

    plan, run = _run(engine, tmp_path, secret)
    _plant(secret, engine, plan)
    walk = container_engine._host_masks
    create = type(plan.backend).create_container
    events: list[str] = []

    def walk_then_vanish(rootfs: Any) -> tuple[Any, ...]:
        masks = walk(rootfs)
        if not events:  # the first start only: gone after the walk ...
            secret.unlink(missing_ok=True)
            events.append("gone")
        return masks

    def back_before_create(self: Any, *args: Any) -> str:
        if events == ["gone"]:  # ... and back after its mask was dropped
            _plant(secret, engine, plan)
            events.append("back")
        return str(create(self, *args))

    monkeypatch.setattr(container_engine, "_host_masks", walk_then_vanish)
    monkeypatch.setattr(type(plan.backend), "create_container", back_before_create)
    out = run()
    assert events == ["gone", "back"]
    assert SECRET not in out and "character special file" in out and "done" in out, out
