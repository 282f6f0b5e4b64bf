"""The planner with fake backends and root filesystems: no root, no sandbox, no registry.

What is decided from the caller's context (never from the process that plans), the
order of configs, profiles and images, the environment of the command, and the caches'
keys (a caller's registry settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agentkernel.backends import Backend, CallerOptions, Choice, Probe
from agentkernel.errors import ConfigError, UsageError
from agentkernel.planner import (
    CallerContext,
    Plan,
    Resolvers,
    RunRequest,
    parse_env,
    plan,
    sandbox_env,
)
from agentkernel.profiles import get_profile
from agentkernel.rootfs import host_rootfs


class FakeBackend(Backend):
    name = "fake"
    isolation = "nothing (a test double)"
    strength = 1

    def __init__(self, options: CallerOptions | None = None) -> None:
        self.options = options

    def probe(self, deep: bool = False) -> Probe:
        return Probe(True, "always")

    def start(self, spec: Any) -> Any:
        raise AssertionError("a plan starts nothing")

    def for_caller(self, options: CallerOptions) -> Backend:
        return FakeBackend(options)


class Recorder:
    """Fake resolvers that remember what they were asked."""

    def __init__(self) -> None:
        self.chosen: list[tuple[str, CallerOptions]] = []
        self.resolved: list[tuple[str, str]] = []

    def choose(self, name: str, options: CallerOptions) -> Choice:
        self.chosen.append((name, options))
        return Choice(FakeBackend().for_caller(options), ("stronger skipped: test",))

    def rootfs(self, image: str, config: Any, registry: Any, quiet: bool) -> Any:
        self.resolved.append((image, registry.fingerprint()))
        return host_rootfs(), None, "host userland, read-only (test)", None

    def resolvers(self) -> Resolvers:
        return Resolvers(choose=self.choose, rootfs=self.rootfs)


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture(autouse=True)
def quiet_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planning process's own settings must never leak into a caller's plan."""
    monkeypatch.setenv("AGENTKERNEL_REGISTRY_MIRROR", "http://planner-process-mirror.invalid")
    monkeypatch.setenv("AGENTKERNEL_MICROVM_VMM", "firecracker")


def _plan(rec: Recorder, req: RunRequest, ctx: CallerContext | None = None) -> Plan:
    return plan(req, ctx or CallerContext(), resolvers=rec.resolvers())


def test_the_callers_registry_settings_decide_not_the_planners(rec: Recorder) -> None:
    ctx = CallerContext(env={"AGENTKERNEL_REGISTRY_MIRROR": "http://127.0.0.1:5999"})
    p = _plan(rec, RunRequest(argv=["true"], cwd=None, image="busybox:latest"), ctx)
    assert p.registry is not None
    assert p.registry.mirrors == ["http://127.0.0.1:5999"]
    other = _plan(rec, RunRequest(argv=["true"], cwd=None, image="busybox:latest"))
    assert other.registry is not None and other.registry.mirrors == []
    # The rootfs resolver (the daemon's cache) is asked under each caller's own key.
    assert rec.resolved[0][1] != rec.resolved[1][1]


def test_the_callers_microvm_settings_reach_the_backend(rec: Recorder) -> None:
    ctx = CallerContext(env={"AGENTKERNEL_MICROVM_ALLOW_EMULATION": "1"})
    p = _plan(rec, RunRequest(argv=["true"], cwd=None, image="host"), ctx)
    assert p.microvm is not None and p.microvm.allow_emulation
    assert p.microvm.vmm == "auto"  # not the planning process's AGENTKERNEL_MICROVM_VMM
    assert isinstance(p.backend, FakeBackend) and p.backend.options is not None
    assert p.backend.options.microvm == p.microvm


def test_backend_order_request_then_config_then_auto(rec: Recorder, tmp_path: Path) -> None:
    _plan(rec, RunRequest(argv=["true"], cwd=tmp_path, image="host"))
    (tmp_path / "agentkernel.toml").write_text('[sandbox]\nbackend = "gvisor"\n')
    _plan(rec, RunRequest(argv=["true"], cwd=tmp_path, image="host"))
    _plan(rec, RunRequest(argv=["true"], cwd=tmp_path, image="host", backend="namespaces"))
    # (A project's backend, with none of the user's: auto's pick first, to compare.)
    assert [name for name, _ in rec.chosen] == ["auto", "auto", "gvisor", "namespaces"]


class AutoPicks(Recorder):
    """`auto` picks a backend as strong as namespaces (10); a named one is a fake."""

    class Auto(FakeBackend):
        name = "auto-pick"
        strength = 10

    def choose(self, name: str, options: CallerOptions) -> Choice:
        self.chosen.append((name, options))
        backend = self.Auto(options) if name == "auto" else FakeBackend(options)
        return Choice(backend, ())


@pytest.mark.parametrize(("project", "user", "flag", "config_flag", "expect"), [
    ("docker", None, None, False, "auto"),  # weaker than auto's pick: refused
    ("podman", 'backend = "auto"', None, False, "auto"),  # "auto" in your config names none
    ("gvisor", None, None, False, "gvisor"),  # stronger: the project may choose it
    ("wasm", None, None, False, "wasm"),  # as strong (10): may too
    ("docker", 'backend = "docker"', None, False, "docker"),  # yours named it
    ("docker", None, "docker", False, "docker"),  # -B docker
    ("docker", None, None, True, "docker"),  # -c agentkernel.toml: the file is trusted
])
def test_a_project_may_not_pick_a_backend_weaker_than_auto(
        tmp_path: Path, project: str, user: str | None, flag: str | None, config_flag: bool,
        expect: str) -> None:
    rec = AutoPicks()
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "agentkernel.toml").write_text(f'[sandbox]\nbackend = "{project}"\n')
    user_file = tmp_path / "user.toml"
    user_file.write_text(f"[sandbox]\n{user}\n" if user else "")
    req = RunRequest(argv=["true"], cwd=proj, image="host", backend=flag,
                     config_path=proj / "agentkernel.toml" if config_flag else None)
    got = _plan(rec, req, CallerContext(user_config=str(user_file)))
    refused = [w for w in got.warnings if "[sandbox] backend" in w]
    if expect == "auto":
        assert got.backend.name == "auto-pick"
        assert [name for name, _ in rec.chosen] == ["auto"]  # the project's never probed
        assert len(refused) == 1 and f'backend "{project}" ignored' in refused[0], refused
        assert "weaker than auto-pick" in refused[0] and f"-B {project}" in refused[0]
    else:
        assert rec.chosen[-1][0] == expect and not refused, (rec.chosen, refused)


def test_config_order_flag_then_project_then_user(rec: Recorder, tmp_path: Path) -> None:
    """Layers: the user's file, then the project's (which may tighten it, not loosen it),
    or --config instead of the project's (trusted as the user's), then the request."""
    user = tmp_path / "user.toml"
    user.write_text('[security]\nprofile = "moderate"\n')
    proj = tmp_path / "proj"
    proj.mkdir()
    ctx = CallerContext(user_config=str(user))
    req = RunRequest(argv=["true"], cwd=proj, image="host")
    assert _plan(rec, req, ctx).profile.name == "moderate"  # the user's
    (proj / "agentkernel.toml").write_text('[security]\nprofile = "restrictive"\n')
    assert _plan(rec, req, ctx).profile.name == "restrictive"  # the project tightens
    (proj / "agentkernel.toml").write_text('[security]\nprofile = "permissive"\n')
    loosened = _plan(rec, req, ctx)
    assert loosened.profile.name == "moderate"  # ... and may not loosen
    assert any("may not loosen" in w for w in loosened.warnings)
    flag = tmp_path / "flag.toml"
    flag.write_text('[security]\nprofile = "permissive"\n')
    got = _plan(rec, req._replace(config_path=flag), ctx)
    assert got.profile.name == "permissive"  # --config is the user's word
    assert _plan(rec, req._replace(profile="restrictive"), ctx).profile.name == "restrictive"
    with pytest.raises(ConfigError):
        _plan(rec, req._replace(config_path=tmp_path / "missing.toml"), ctx)


def test_no_project_dir_means_no_workspace_and_the_default_image(rec: Recorder) -> None:
    p = _plan(rec, RunRequest(argv=["true"], cwd=None))
    assert p.workspace is None and p.cwd == "/root"
    assert p.image_reason == "default image"


def test_project_dir_is_the_workspace(rec: Recorder, tmp_path: Path) -> None:
    p = _plan(rec, RunRequest(argv=["true"], cwd=tmp_path, image="host"))
    assert p.workspace == tmp_path and p.cwd == "/workspace"
    p = _plan(rec, RunRequest(argv=["true"], cwd=tmp_path, image="host", workdir="/tmp"))
    assert p.cwd == "/tmp"
    with pytest.raises(UsageError):
        _plan(rec, RunRequest(argv=["true"], cwd=tmp_path, image="host", workdir="rel"))


def test_environment_of_the_command(rec: Recorder, tmp_path: Path) -> None:
    ctx = CallerContext(env={"PATH": "/caller/bin", "HOME": str(tmp_path), "TERM": "xterm"})
    moderate = _plan(rec, RunRequest(argv=["true"], cwd=None, image="host",
                                     env={"FOO": "bar"}), ctx)
    env = moderate.env("sb-1")
    assert env["AGENTKERNEL_SANDBOX"] == "sb-1" and env["FOO"] == "bar"
    assert env["PATH"].startswith("/usr/local/sbin") and "TERM" not in env  # no pass_env
    permissive = _plan(rec, RunRequest(argv=["true"], cwd=None, image="host",
                                       profile="permissive"), ctx)
    env = permissive.env("sb-2")
    assert env["PATH"] == "/caller/bin" and env["TERM"] == "xterm"  # the caller's
    assert permissive.home == tmp_path and env["HOME"] == "/home/user"
    # The one assembly the persistent sandboxes use too.
    assert sandbox_env("sb-2", None, permissive.profile, permissive.home,
                       permissive.pass_env) | permissive.user_env == env


def test_bad_environment_names_are_refused(rec: Recorder) -> None:
    for bad in ({"1X": "v"}, {"A-B": "v"}, {"K": "a\0b"}, {"": "v"}):
        with pytest.raises(UsageError):
            _plan(rec, RunRequest(argv=["true"], cwd=None, image="host", env=bad))


def test_parse_env_reads_the_given_environment_only() -> None:
    assert parse_env(["A=1", "B"], {"B": "from-caller"}) == {"A": "1", "B": "from-caller"}
    with pytest.raises(UsageError):
        parse_env(["NOT_THERE"], {})


def test_a_persistent_sandbox_needs_no_command(rec: Recorder) -> None:
    p = plan(RunRequest(argv=[], cwd=None, image="host"), CallerContext(),
             resolvers=rec.resolvers(), persistent=True)
    assert p.argv == []
    with pytest.raises(UsageError):
        _plan(rec, RunRequest(argv=[], cwd=None, image="host"))


def test_limits_flags_override_the_profile(rec: Recorder) -> None:
    p = _plan(rec, RunRequest(argv=["true"], cwd=None, image="host", memory_mb=64, pids=32,
                              cpus=0.5, no_network=True))
    assert (p.profile.memory_mb, p.profile.pids, p.profile.cpus) == (64, 32, 0.5)
    assert p.profile.network == "none"
    assert p.profile.name == get_profile("moderate").name


def test_summary_is_what_front_doors_compare(rec: Recorder) -> None:
    p = _plan(rec, RunRequest(argv=["echo", "hi"], cwd=None, image="host"))
    s = p.summary()
    assert s["backend"] == "fake" and s["image"] == "host" and s["argv"] == ["echo", "hi"]
    assert s["skipped"] == ["stronger skipped: test"]


def test_context_from_the_wire_is_checked() -> None:
    ok = CallerContext.from_wire({"AGENTKERNEL_REGISTRY_MIRROR": "http://m"}, "/etc/x.toml")
    assert ok.env == {"AGENTKERNEL_REGISTRY_MIRROR": "http://m"}
    for env, path in (({"LD_PRELOAD": "/x"}, None), ({"HOME": 3}, None),
                      ({"HOME": "a\0b"}, None), ({}, "relative.toml"), ({}, 7)):
        with pytest.raises(UsageError):
            CallerContext.from_wire(env, path)


def test_failed_pull_memo_is_keyed_by_the_callers_settings(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed resolve with one mirror does not answer a caller with another."""
    from agentkernel.images.offline import recent_failure, remember_failure
    from agentkernel.images.registry import RegistryOptions

    monkeypatch.setenv("AGENTKERNEL_HOME", str(tmp_path))
    bad = RegistryOptions.from_config(None, env={"AGENTKERNEL_REGISTRY_MIRROR": "http://bad"})
    good = RegistryOptions.from_config(None, env={"AGENTKERNEL_REGISTRY_MIRROR": "http://ok"})
    remember_failure("busybox:latest", bad, "bad unreachable")
    assert recent_failure("busybox:latest", bad) == "bad unreachable"
    assert recent_failure("busybox:latest", good) is None
    assert recent_failure("busybox:latest", RegistryOptions.from_config(None, env={})) is None
