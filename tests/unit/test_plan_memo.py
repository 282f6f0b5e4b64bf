"""The daemon's plan memo for warm wasm runs and namespaces runs on the host's userland
(daemon/runs.py _PlanMemo): a request asked again as it was gets the same plan; any
change the plan depends on (the project's agentkernel.toml, the request, the caller's
environment) plans afresh at once; runs with anything per run (secrets, agents, allowed
hosts), on an image or another backend are never remembered; a remembered host plan
has the host's always-masked paths as they are now."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel.daemon import runs
from agentkernel.daemon.api import RunRequest
from agentkernel.daemon.manager import SandboxManager


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SandboxManager]:
    monkeypatch.setenv("AGENTKERNEL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AGENTKERNEL_RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "run").mkdir(mode=0o700)
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "m.wat").write_text('(module (func (export "_start")))')
    m = SandboxManager(None, start_threads=False, configured_pools=False)
    try:
        yield m
    finally:
        m.close()


def _req(tmp_path: Path, **extra: object) -> RunRequest:
    return RunRequest(argv=["m.wat", "a"], cwd=str(tmp_path / "proj"), **extra)  # type: ignore[arg-type]


def test_the_same_request_gets_the_same_plan(manager: SandboxManager, tmp_path: Path) -> None:
    key, plan = manager._plan_run(_req(tmp_path))
    assert plan.backend.name == "wasm"
    assert manager._plan_run(_req(tmp_path)) == (key, plan)
    assert manager._plan_run(_req(tmp_path))[1] is plan


def test_a_changed_project_config_counts_at_once(manager: SandboxManager,
                                                 tmp_path: Path) -> None:
    _key, plan = manager._plan_run(_req(tmp_path))
    assert plan.profile.name == "moderate"
    (tmp_path / "proj" / "agentkernel.toml").write_text('[security]\nprofile = "restrictive"\n')
    _key, tightened = manager._plan_run(_req(tmp_path))
    assert tightened.profile.name == "restrictive"
    assert manager._plan_run(_req(tmp_path))[1] is tightened


def test_another_request_or_caller_plans_afresh(manager: SandboxManager,
                                                tmp_path: Path) -> None:
    _key, plan = manager._plan_run(_req(tmp_path))
    other = manager._plan_run(_req(tmp_path, env={"X": "1"}))[1]
    assert other is not plan and other.user_env == {"X": "1"}
    caller = manager._plan_run(_req(tmp_path, caller_env={"HOME": str(tmp_path)}))[1]
    assert caller is not plan and caller is not other
    assert manager._plan_run(_req(tmp_path, profile="restrictive"))[1].profile.name == \
        "restrictive"


def test_expired_plans_are_made_again(manager: SandboxManager, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    plan = manager._plan_run(_req(tmp_path))[1]
    monkeypatch.setattr(runs, "PLAN_MEMO_SECONDS", 0.0)
    assert manager._plan_run(_req(tmp_path))[1] is not plan


@pytest.mark.parametrize("extra", [{"secrets": ["k"]}, {"allow_hosts": ["example.com"]},
                                   {"agent": "claude"}, {"backend": "gvisor"},
                                   {"agent_settings": True}])
def test_per_run_requests_are_never_remembered(tmp_path: Path, extra: dict[str, object]) -> None:
    assert runs._PlanMemo.key(_req(tmp_path, **extra)) is None
    for other in ({"image": "alpine:3.20"}, {"backend": "gvisor"}, {"backend": "microvm"}):
        req = RunRequest(argv=["true"], cwd=str(tmp_path), **other)  # type: ignore[arg-type]
        assert runs._PlanMemo.key(req) is None


def _host(tmp_path: Path, **extra: object) -> RunRequest:
    return RunRequest(argv=["true"], image="host", backend="namespaces",  # type: ignore[arg-type]
                      cwd=str(tmp_path / "proj"), **extra)


def test_a_host_plan_is_remembered(manager: SandboxManager, tmp_path: Path) -> None:
    key, plan = manager._plan_run(_host(tmp_path))
    assert plan.backend.name == "namespaces" and plan.rootfs.name == "host"
    again_key, again = manager._plan_run(_host(tmp_path))
    assert again_key == key and again.argv == plan.argv and again.profile == plan.profile
    # Remembered, with its rootfs described anew (a copy of the plan, not the plan).
    assert again is not plan and again.rootfs == plan.rootfs
    assert manager._plan_run(_host(tmp_path, env={"X": "1"}))[1].user_env == {"X": "1"}


def test_a_remembered_host_plan_masks_a_credential_that_appeared_since(
        manager: SandboxManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A credential path that appears after a plan was remembered is masked in the next
    run's plan all the same: the memo never serves the masks of its time."""
    from agentkernel import rootfs

    secret = tmp_path / "credstore"
    monkeypatch.setattr(rootfs, "ALWAYS_MASKED", (*rootfs.ALWAYS_MASKED, str(secret)))
    _key, plan = manager._plan_run(_host(tmp_path))
    assert str(secret) not in {m.path for m in plan.rootfs.masks}
    secret.mkdir()
    _key, later = manager._plan_run(_host(tmp_path))
    assert runs._PLAN_MEMO[manager].get(runs._PlanMemo.key(_host(tmp_path)) or "") is not None
    assert str(secret) in {m.path for m in later.rootfs.masks}
    assert later.argv == plan.argv  # the rest came from the memo

