"""One planner for every front door: the same requests, in-process, through the daemon's
socket, and planned as the HTTP API plans (the serving daemon's own context), decide the
same plan and end with the same result."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import Daemon

# Requests whose result does not depend on where they ran (no sandbox name, no timing).
REQUESTS = [
    ["-i", "host", "--", "sh", "-c", "echo out; echo err >&2; exit 3"],
    ["-i", "host", "-p", "restrictive", "--", "sh", "-c", "cat /workspace/marker.txt"],
    ["-i", "host", "-e", "FOO=bar", "-w", "/tmp", "--", "sh", "-c", 'echo "$FOO"; pwd'],
    ["-i", "host", "-t", "1", "--", "sleep", "30"],
    ["-i", "host", "--", "sh", "-c", "kill -TERM $$"],
    ["-i", "host", "-p", "permissive", "--no-network", "--", "sh", "-c", 'echo "$TERM"'],
]
VOLATILE = ("sandbox", "duration_ms", "pooled")


def _result(d: Daemon, args: list[str], project: Path, *, daemon: bool) -> dict[str, object]:
    env = {"TERM": "xterm-test", "AGENTKERNEL_NO_DAEMON": "0" if daemon else "1"}
    r = d.ak("run", "--json", *args, cwd=project, env=env)
    assert r.stdout, r.stderr
    out = json.loads(r.stdout)
    assert r.returncode == out["exit_code"], r.stderr
    if daemon:
        assert out["pooled"] is not None, out  # it did go through the daemon
    return {k: v for k, v in out.items() if k not in VOLATILE}


def test_in_process_and_through_the_daemon_agree(daemon: Daemon, tmp_path: Path) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    (project / "marker.txt").write_text("from the project\n")
    for args in REQUESTS:
        here = _result(daemon, args, project, daemon=False)
        there = _result(daemon, args, project, daemon=True)
        assert here == there, args
    # And they are the results a shell would give.
    first = _result(daemon, REQUESTS[0], project, daemon=True)
    assert (first["exit_code"], first["stdout"], first["stderr"]) == (3, "out\n", "err\n")
    timed = _result(daemon, REQUESTS[3], project, daemon=True)
    assert timed["exit_code"] == 124 and timed["timed_out"] is True
    assert _result(daemon, REQUESTS[4], project, daemon=True)["exit_code"] == 143
    assert _result(daemon, REQUESTS[5], project, daemon=True)["stdout"] == "xterm-test\n"


def test_the_daemon_plans_as_the_caller_would(daemon: Daemon, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The manager's plan of a socket request (the caller's context sent along) and of an
    HTTP request (the daemon's own context) equal the in-process plan of the same caller."""
    from agentkernel.context import caller_env
    from agentkernel.daemon.api import RunRequest as WireRequest
    from agentkernel.daemon.manager import SandboxManager
    from agentkernel.planner import CallerContext, RunRequest, plan

    project = tmp_path / "proj"
    project.mkdir()
    (project / "agentkernel.toml").write_text('[security]\nprofile = "restrictive"\n')
    monkeypatch.setenv("AGENTKERNEL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AGENTKERNEL_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("AGENTKERNEL_REGISTRY_MIRROR", "127.0.0.1:9")  # nothing listens
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    (tmp_path / "run").mkdir(mode=0o700)
    manager = SandboxManager(None, start_threads=False)
    try:
        for argv, image in ((["python3", "-c", "pass"], "host"), (["true"], "host"),
                            (["sh", "-c", "echo $X"], "host")):
            local = plan(RunRequest(argv=argv, cwd=project, image=image, env={"X": "1"}),
                         CallerContext.here(), quiet=True)
            wire = WireRequest(argv=argv, image=image, env={"X": "1"}, cwd=str(project),
                               caller_env=caller_env(), user_config=None)
            _key, via_socket = manager._plan_run(wire)
            wire.caller_env = None  # as HTTP sends it: the daemon's own context
            _key, via_http = manager._plan_run(wire)
            assert local.summary() == via_socket.summary() == via_http.summary(), argv
            assert local.registry is not None and via_socket.registry is not None
            assert local.registry.fingerprint() == via_socket.registry.fingerprint()
            assert local.profile.name == "restrictive"
        # A caller with other settings than the daemon gets its own, not the daemon's.
        other = WireRequest(argv=["true"], image="host", caller_env={
            "AGENTKERNEL_REGISTRY_MIRROR": "127.0.0.1:10", "HOME": os.environ["HOME"]})
        _key, theirs = manager._plan_run(other)
        assert theirs.registry is not None and theirs.registry.mirrors == ["127.0.0.1:10"]
        # Callers whose microVM settings differ never share warm sandboxes (a pooled VM was
        # started with its key's settings); the same settings from elsewhere do.
        base = {"HOME": os.environ["HOME"], "AGENTKERNEL_MICROVM_SNAPSHOT": "0"}
        keys = [manager._plan_run(WireRequest(argv=["true"], image="host", caller_env=env))[0]
                for env in (base, dict(base), {**base, "AGENTKERNEL_MICROVM_SNAPSHOT": "1"})]
        assert keys[0] == keys[1] and hash(keys[0]) == hash(keys[1])
        assert keys[0] != keys[2] and keys[2].microvm.snapshot
    finally:
        manager.close()
