"""Drive the HTTP API through the Python SDK API: run by the official SDK's venv and by ours.

Usage: python drive_python_sdk.py SCENARIO PREFIX (AGENTKERNEL_BASE_URL and _API_KEY set).
Only the SDK's public API is used, so the same script checks `agentkernel-sdk` 0.21.0 and
our own `agentkernel` client. Prints `ok SCENARIO` at the end; any failure is a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import sys
import time

import agentkernel
from agentkernel import (
    AgentKernel,
    AgentKernelError,
    AuthError,
    NotFoundError,
    ServerError,
    ValidationError,
)

SCENARIO, PREFIX = sys.argv[1], sys.argv[2]


def raises(cls: type[BaseException], fn, *args, **kwargs) -> BaseException:  # type: ignore[no-untyped-def]
    try:
        fn(*args, **kwargs)
    except cls as exc:
        assert isinstance(exc, AgentKernelError), type(exc).__mro__
        return exc
    except BaseException as exc:
        raise AssertionError(f"expected {cls.__name__}, got {type(exc).__name__}: {exc}") from exc
    raise AssertionError(f"expected {cls.__name__}, nothing was raised")


def health(c: AgentKernel) -> None:
    assert c.health() == "ok"
    with AgentKernel(api_key="wrong-key") as bad:
        assert bad.health() == "ok"  # /health is open
        err = raises(AuthError, bad.list_sandboxes)
        assert err.status == 401 and "Invalid API key" in str(err), str(err)


def run(c: AgentKernel) -> None:
    assert c.run(["echo", "hello-run"]).output == "hello-run\n"
    out = c.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert out.output == "out\n", out  # a failed command is not an HTTP error
    assert c.run(["python3", "-c", "print(1+1)"], image=None, profile="moderate").output == "2\n"
    raises(ValidationError, c.run, [])
    raises(ValidationError, c.run, ["true"], profile="nope")
    raises(ValidationError, c.run, ["true"], image="NOT A REF")
    res = c.batch_run([["echo", "batch-a"], ["echo", "batch-b"], ["sh", "-c", "exit 1"]])
    assert [r.output for r in res.results[:2]] == ["batch-a\n", "batch-b\n"], res
    assert res.results[2].error is None and res.results[2].output == ""


def stream(c: AgentKernel) -> None:
    seen = []
    t0 = time.monotonic()
    for event in c.run_stream(["sh", "-c", "echo first; sleep 2; echo second >&2; exit 4"]):
        seen.append((time.monotonic() - t0, event.type, event.data))
    kinds = [k for _, k, _ in seen]
    assert kinds[0] == "started" and kinds[-1] == "done", kinds
    outputs = [(t, d) for t, k, d in seen if k == "output"]
    assert outputs[0][1] == {"data": "first\n", "stream": "stdout"}, outputs
    assert {"data": "second\n", "stream": "stderr"} in [d for _, d in outputs], outputs
    done_at = seen[-1][0]
    assert done_at - outputs[0][0] > 1.5, f"output was not streamed live: {seen}"
    assert seen[-1][2]["exit_code"] == 4 and seen[-1][2]["success"] is False
    raises(ValidationError, lambda: list(c.run_stream([])))


def sandboxes(c: AgentKernel) -> None:
    name = f"{PREFIX}-sb"
    info = c.create_sandbox(name)
    assert info.name == name and info.status == "running" and info.backend, info
    try:
        raises(ServerError, c.create_sandbox, name)  # 409: exists already
        assert c.get_sandbox(name).name == name
        assert name in [s.name for s in c.list_sandboxes()]
        assert info.uuid and c.get_sandbox_by_uuid(info.uuid).name == name
        out = c.exec_in_sandbox(name, ["sh", "-c", "echo $PROBE_VAR; pwd"],
                                env=["PROBE_VAR=probe-value"], workdir="/tmp")
        assert out.output == "probe-value\n/tmp\n", out
        assert c.exec_in_sandbox(name, ["id", "-u"], sudo=True).output == "0\n"
        assert c.exec_in_sandbox(name, ["sh", "-c", "echo x; exit 7"]).output == "x\n"
        raises(ValidationError, c.exec_in_sandbox, name, ["true"], env=["NOEQUALS"])
        logs = c.get_sandbox_logs(name)
        assert isinstance(logs, list)
        expires = c.extend_ttl(name, by="30m")
        assert isinstance(expires, str) and expires, expires
        raises(ValidationError, c.extend_ttl, name, by="soon")
        discovery = c.get_backends()
        assert discovery.backends and any(b.usable for b in discovery.backends), discovery
    finally:
        c.remove_sandbox(name)
    raises(NotFoundError, c.get_sandbox, name)
    raises(NotFoundError, c.exec_in_sandbox, name, ["true"])
    raises(NotFoundError, c.remove_sandbox, name)
    raises(NotFoundError, c.get_sandbox_by_uuid, "00000000-0000-0000-0000-000000000000")
    raises(ValidationError, c.create_sandbox, "../../x")
    raises(ValidationError, c.get_sandbox, "bad name")


def files(c: AgentKernel) -> None:
    name = f"{PREFIX}-files"
    with c.sandbox(name) as sb:
        msg = c.write_file(name, "/tmp/ak-probe/a.txt", "héllo\n")
        assert isinstance(msg, str)
        got = c.read_file(name, "/tmp/ak-probe/a.txt")  # sent as files//tmp/...
        assert (got.content, got.encoding, got.size) == ("héllo\n", "utf8", 7), got
        blob = bytes([0, 1, 2, 255, 254])
        c.write_file(name, "tmp/ak-probe/bin.dat", base64.b64encode(blob).decode(),
                     encoding="base64")
        got = c.read_file(name, "/tmp/ak-probe/bin.dat")
        assert got.encoding == "base64" and base64.b64decode(got.content) == blob, got
        assert got.size == 5
        written = sb.write_files({"/tmp/ak-probe/b.txt": "B", "/tmp/ak-probe/c.txt": "C"})
        assert written.written == 2
        assert sb.run(["cat", "/tmp/ak-probe/b.txt", "/tmp/ak-probe/c.txt"]).output == "BC"
        assert isinstance(c.delete_file(name, "/tmp/ak-probe/b.txt"), str)
        raises(NotFoundError, c.read_file, name, "/tmp/ak-probe/b.txt")
        raises(ValidationError, c.write_file, name, "/tmp/x", "!!", encoding="base64")
        raises(ValidationError, c.write_files, name, {"../etc/x": "A"})
    raises(NotFoundError, c.get_sandbox, name)


def detached(c: AgentKernel) -> None:
    name = f"{PREFIX}-det"
    with c.sandbox(name):
        cmd = c.exec_detached(name, ["sh", "-c", "echo out; echo err >&2; sleep 30"])
        assert cmd.status == "running" and cmd.sandbox == name and cmd.pid > 0, cmd
        assert cmd.id in [d.id for d in c.detached_list(name)]
        assert c.detached_status(name, cmd.id).status == "running"
        deadline = time.monotonic() + 10
        while "out" not in (c.detached_logs(name, cmd.id).stdout or ""):
            assert time.monotonic() < deadline, "no detached output"
            time.sleep(0.05)
        assert "err" in (c.detached_logs(name, cmd.id, stream="stderr").stderr or "")
        assert isinstance(c.detached_kill(name, cmd.id), str)
        deadline = time.monotonic() + 10
        while c.detached_status(name, cmd.id).status == "running":
            assert time.monotonic() < deadline, "kill did not end the command"
            time.sleep(0.05)
        done = c.exec_detached(name, ["true"])
        deadline = time.monotonic() + 10
        while (st := c.detached_status(name, done.id)).status == "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert st.status == "completed" and st.exit_code == 0, st
        raises(NotFoundError, c.detached_status, name, "nosuchid")
        raises(NotFoundError, c.detached_logs, name, "nosuchid")


def snapshots(c: AgentKernel) -> None:
    name = f"{PREFIX}-snap"
    snap = f"{name}-s1"
    caps = {b.backend: b.capabilities.snapshots for b in c.get_backends().backends}
    with c.sandbox(name) as sb:
        c.write_file(name, "/tmp/kept.txt", "kept")
        if not any(caps.values()):
            raises(ServerError, c.take_snapshot, name, snapshot_name=snap)
            return
        meta = c.take_snapshot(name, snapshot_name=snap)
        assert meta.name == snap and meta.sandbox == name, meta
        assert snap in [s.name for s in c.list_snapshots()]
        assert c.get_snapshot(snap).name == snap
        sb.remove()
    restored = c.restore_snapshot(snap)
    try:
        assert restored.status == "running", restored
        assert c.read_file(restored.name, "/tmp/kept.txt").content == "kept"
    finally:
        c.remove_sandbox(restored.name)
    c.delete_snapshot(snap)
    raises(NotFoundError, c.get_snapshot, snap)


def sessions(c: AgentKernel) -> None:
    name = f"{PREFIX}-sess"
    with c.sandbox(name) as sb:
        assert sb.info().status == "running"
        assert sb.run(["echo", "in-session"]).output == "in-session\n"
    raises(NotFoundError, c.get_sandbox, name)
    try:
        with c.sandbox(name) as sb:
            raise KeyError("body failed")
    except KeyError:
        pass
    raises(NotFoundError, c.get_sandbox, name)


def durable(c: AgentKernel) -> None:
    for fn in (c.list_orchestrations, c.list_objects, c.list_schedules, c.list_stores):
        raises(NotFoundError, fn)
    raises(NotFoundError, c.create_orchestration, {"name": "x"})
    raises(NotFoundError, c.list_orchestration_definitions)


def async_client(_c: AgentKernel) -> None:
    async def main() -> None:
        async with agentkernel.AsyncAgentKernel() as ac:
            assert await ac.health() == "ok"
            assert (await ac.run(["echo", "async"])).output == "async\n"
            events = [e async for e in await ac.run_stream(["echo", "s"])]
            assert [e.type for e in events] == ["started", "output", "done"], events
            name = f"{PREFIX}-async"
            async with await ac.sandbox(name) as sb:
                assert (await sb.run(["echo", "a"])).output == "a\n"
            try:
                await ac.get_sandbox(name)
            except NotFoundError:
                pass
            else:
                raise AssertionError("async session did not remove its sandbox")
            info = await ac.create_sandbox(f"{name}2")  # async: sends every field, as null
            assert info.status == "running"
            await ac.remove_sandbox(f"{name}2")

    asyncio.run(main())


def network(_c: AgentKernel) -> None:
    from agentkernel import NetworkError

    with AgentKernel(base_url="http://127.0.0.1:9") as dead:
        raises(NetworkError, dead.health)


if __name__ == "__main__":
    with AgentKernel() as client:
        globals()[SCENARIO](client)
    print(f"ok {SCENARIO}")
